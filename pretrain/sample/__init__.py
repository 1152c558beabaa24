"""Inference: text-to-image sampling and image understanding with a key/value cache.

Modules: ``cache`` (per-layer keys/values of earlier tokens, attached to the attention layers),
``text_to_image`` (Euler + classifier-free guidance, prompt prefix cached), ``understanding``
(prompt, greedy / top-p decoding), ``decode`` (latents -> PNG), ``loading`` (a model from a released
checkpoint or our full state). CLIs: ``python -m pretrain.sample --help`` (prompts -> images) and
``python -m pretrain.chat --help`` (image + question -> answer).

Nothing is imported here, so that ``--help`` answers without loading torch or megatron-core.
"""
