"""The data contract shared by the offline data tools (``data_tools``) and the trainer (``pretrain``).

Both sides import it and never each other: the packed multimodal sequence layout (``format``), the
Arrow shard layout and its reader (``shards``), the tokenizer and its special tokens (``tokenizer``)
and the per-task image rules (``images``), so a sample prepared offline and one prepared by a sampler
at inference are the same by construction.
"""
