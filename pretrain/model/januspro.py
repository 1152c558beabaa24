"""Janus-Pro: one LLM for next-token prediction of text and of discrete image codes.

Same decoupled design as JanusFlow (``pretrain.model.janusflow``) and the same LLM and SigLIP, but
images are generated autoregressively as codes of a frozen VQ tokenizer (``image_codecs``), so the
generation path is three small modules around the LLM (names as in the released model, mapped by
``pretrain.convert.januspro``):
- ``und_aligner``: SigLIP features -> LLM width, Linear -> exact GELU -> Linear (released: ``aligner``);
- ``gen_embed``: a learned [codebook, embed_dim] table (NOT the VQ codebook) and ``gen_aligner``,
  Linear -> exact GELU -> Linear, turn each input code into an LLM input embedding;
- ``gen_head``: Linear -> exact GELU -> Linear to the codebook, on the LLM's final (normed) hidden
  state: the logits of code i are read at the position before it (``<begin_of_image>`` for code 0).

A ``JanusProModel`` is one pipeline stage: SigLIP, the aligners and ``gen_embed`` on the first, the
image head on the last; between stages travel the hidden states alone. There is no learned
begin-of-image embedding: ``<begin_of_image>`` and ``<end_of_image>`` are ordinary tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..data.batch import PackingMetadata
from .config import ModelConfig
from .llm import LanguageModel
from .parts import accept_missing_extra_state, drop_empty_extra_state, flatten_checked, zero_touch
from .trainable import trains
from .und_vision import UnderstandingEncoder


class GeluMLP(nn.Sequential):
    """Linear -> exact (erf) GELU -> Linear: the released ``MlpProjector`` (mlp_gelu, depth 2) and image head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


@dataclass
class JanusProInputs:
    """One micro-batch, documents laid end to end (T tokens, D documents).

    input_ids, position_ids, token_kind: [T] (``GEN_CODE`` slots hold the image codes);
    cu_seqlens: [D+1]; target_mask: optional bool [T], token i is predicted from position i-1 (text
    targets by the LLM head, code targets by the image head); und_pixels: [N_und, 3, R, R] in [-1, 1],
    one per understanding image in order; metadata: host-side ``PackingMetadata`` (built from the
    tensors, reading them back once, when None: fine for samplers and tests).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    token_kind: torch.Tensor
    target_mask: Optional[torch.Tensor] = None
    und_pixels: Optional[torch.Tensor] = None
    metadata: Optional[PackingMetadata] = None

    def packing(self) -> PackingMetadata:
        if self.metadata is None:
            self.metadata = PackingMetadata.from_tensors(self.cu_seqlens, self.token_kind, self.target_mask)
        return self.metadata


@dataclass
class JanusProOutputs:
    """Last stage only: final_hidden [T, H]; logits [N_ar, V] / labels [N_ar] at the text targets;
    image_logits [N_code, K] / image_labels [N_code] at the image-code targets."""

    final_hidden: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    image_logits: Optional[torch.Tensor] = None
    image_labels: Optional[torch.Tensor] = None


class JanusProModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        params_dtype: torch.dtype = torch.float32,
        process_groups=None,
    ) -> None:
        """``process_groups``: megatron-core's ``ProcessGroupCollection`` of the layout
        (``pretrain.runtime.mpu.megatron_process_groups``); None = megatron's defaults."""
        super().__init__()
        if cfg.family != "januspro":
            raise ValueError(f"model.family is {cfg.family!r}: JanusProModel needs 'januspro'")
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        hidden, tokens = cfg.llm.hidden_size, cfg.image_tokens
        self.llm = LanguageModel(cfg.llm, pre_process, post_process, params_dtype, process_groups)
        if pre_process:
            self.und_encoder = UnderstandingEncoder(cfg.und_encoder)
            self.und_aligner = GeluMLP(cfg.und_encoder.hidden_size, hidden, hidden)
            self.gen_embed = nn.Embedding(tokens.codebook_size, tokens.embed_dim)
            self.gen_aligner = GeluMLP(tokens.embed_dim, hidden, hidden)
        if post_process:
            head_hidden = tokens.head_hidden_size or hidden
            self.gen_head = GeluMLP(hidden, head_hidden, tokens.codebook_size)
        self.to(params_dtype)
        self._register_state_dict_hook(drop_empty_extra_state)
        self._register_load_state_dict_pre_hook(accept_missing_extra_state, with_module=True)

    def set_trainable(self, trainable: str) -> None:
        """'new_modules' (stage 1), 'all_but_und_encoder' (stage 2) or 'all' (stage 3): see
        ``pretrain.model.trainable``."""
        for name, param in self.named_parameters():
            param.requires_grad_(trains(name.split(".")[0], trainable, "januspro"))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes [...] -> LLM input embeddings [..., H] (the released ``prepare_gen_img_embeds``)."""
        return self.gen_aligner(self.gen_embed(codes))

    def embed_inputs(self, inputs: JanusProInputs) -> torch.Tensor:
        """Mixed input embeddings [T, H]: tokens, understanding features and image codes in their slots."""
        index = inputs.packing().on(inputs.input_ids.device)
        embeds = self.llm.embed_tokens(inputs.input_ids)
        unused: list[nn.Module] = []
        und_pos = index["und_positions"]
        if und_pos.numel():
            features = self.und_aligner(self.und_encoder(inputs.und_pixels))
            embeds = embeds.index_put((und_pos,), flatten_checked(features, und_pos, "understanding image"))
        else:
            unused += [self.und_encoder, self.und_aligner]
        code_pos = index["gen_code_positions"]
        if code_pos.numel():
            embeds = embeds.index_put((code_pos,), self.embed_codes(inputs.input_ids[code_pos]).to(embeds.dtype))
        else:
            unused += [self.gen_embed, self.gen_aligner]
        return embeds + zero_touch(unused)

    def forward(
        self, inputs: JanusProInputs, hidden_in: Optional[torch.Tensor] = None
    ) -> tuple[Optional[torch.Tensor], JanusProOutputs]:
        """Run this stage. ``hidden_in`` [T, 1, H]: the previous stage's output (later stages only).
        Returns (hidden states for the next stage, or None on the last; outputs)."""
        meta = inputs.packing()
        if self.pre_process:
            hidden_in = self.embed_inputs(inputs)[:, None, :]
        elif hidden_in is None:
            raise ValueError("a later pipeline stage needs the previous stage's hidden states")
        hidden, _ = self.llm(hidden_in, inputs.position_ids, inputs.cu_seqlens, None, (), max_seqlen=meta.max_seqlen,
                             doc_lengths=meta.doc_lengths)
        outputs = JanusProOutputs()
        if not self.post_process:
            return hidden, outputs
        index = meta.on(hidden.device)
        codes = index["gen_code_positions"]
        final = hidden[:, 0, :] + (0.0 if codes.numel() else zero_touch([self.gen_head]))
        outputs.final_hidden = final
        text_targets = index["ar_target_positions"]
        outputs.logits = self.llm.compute_logits(final[text_targets - 1])
        outputs.labels = inputs.input_ids[text_targets]
        # A code that starts its document has no position before it: never a target (the rule of
        # ``ar_target_flags``); the data tools never build one, so this only guards the index.
        if codes.numel():
            outputs.image_logits = self.gen_head(final[codes - 1])
            outputs.image_labels = inputs.input_ids[codes]
        return None, outputs
