"""JanusFlow: one LLM for next-token prediction and rectified-flow image generation.

A ``JanusFlowModel`` is one pipeline stage (the whole model when pipeline_parallel = 1):
- first stage: SigLIP understanding encoder + aligner, the learned begin-of-image embedding, the
  generation encoder (with the time embedding) + aligner, the word embedding, and the REPA projector
  (REPA reads LLM block ``repa.layer``, which must live on the first stage);
- every stage: its share of the LLM's transformer blocks;
- last stage: final norm, output layer, decoder aligner and the generation decoder.

Between stages travel ``StageActivations``: the LLM hidden states, plus the generation encoder's
long skip and the time embedding, which the decoder on the last stage needs.

Inputs follow ``datacontract.format``: every document of the micro-batch on one token axis with
``token_kind`` saying where each input embedding comes from. Where the slots are and how many there
are is read from the inputs' host-side ``PackingMetadata`` (positions as index tensors, counts as
python ints), so a forward never waits for the device to tell the host a shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..data.batch import PackingMetadata, ar_target_flags
from .config import ModelConfig
from .gen_vision import GenerationDecoder, GenerationEncoder, RMSNorm, grid_to_tokens, tokens_to_grid
from .llm import LanguageModel
from .parts import accept_missing_extra_state, drop_empty_extra_state, flatten_checked, zero_touch
from .trainable import trains
from .und_vision import RepaProjector, UnderstandingEncoder


@dataclass
class ModelInputs:
    """One micro-batch, documents laid end to end (T tokens, D documents).

    input_ids, position_ids, token_kind: [T]; cu_seqlens: [D+1];
    hidden_keys: optional bool [T], tokens nobody may attend to (dropped CFG prompts);
    target_mask: optional bool [T], token i is predicted from position i-1 (L_AR);
    und_pixels: [N_und, 3, R, R] in [-1, 1], one per UND_IMAGE_BEGIN, in order;
    gen_z_t, gen_t: [N_gen, C, S, S] noisy latents and their times in [0, 1], one per GEN_TIME;
    repa_pixels: [N_gen, 3, R, R] clean generation images for REPA's SigLIP targets, or None;
    metadata: host-side ``PackingMetadata`` of this packing (``prepare_model_inputs`` sets it; when
    None the model builds it from the tensors, reading them back once: fine for samplers).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    token_kind: torch.Tensor
    hidden_keys: Optional[torch.Tensor] = None
    target_mask: Optional[torch.Tensor] = None
    und_pixels: Optional[torch.Tensor] = None
    gen_z_t: Optional[torch.Tensor] = None
    gen_t: Optional[torch.Tensor] = None
    repa_pixels: Optional[torch.Tensor] = None
    metadata: Optional[PackingMetadata] = None

    def packing(self) -> PackingMetadata:
        """The metadata, built from the tensors (and kept) when none was given."""
        if self.metadata is None:
            self.metadata = PackingMetadata.from_tensors(self.cu_seqlens, self.token_kind, self.target_mask)
        return self.metadata


@dataclass
class StageActivations:
    """What one pipeline stage hands the next: hidden [T, 1, H], skip [N_gen, C, s, s], t_emb [N_gen, H]."""

    hidden: torch.Tensor
    gen_skip: Optional[torch.Tensor] = None
    gen_t_emb: Optional[torch.Tensor] = None


@dataclass
class ModelOutputs:
    """What a stage computed towards the losses (None where the stage does not own it).

    final_hidden [T, H] (last stage); logits [N, V] and labels [N] at the L_AR targets (last stage);
    velocity [N_gen, C, S, S] (last stage); repa_projected and repa_target [N_gen, P, D_enc]
    (stage owning the REPA layer).
    """

    final_hidden: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None
    repa_projected: Optional[torch.Tensor] = None
    repa_target: Optional[torch.Tensor] = None


# The L_AR target rule has one owner, next to the batch metadata; kept here under its old name.
target_flags = ar_target_flags


def target_positions(inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose output predicts a target token, and those targets."""
    if inputs.target_mask is None:
        empty = inputs.input_ids.new_zeros(0)
        return empty, empty
    targets = inputs.packing().on(inputs.input_ids.device)["ar_target_positions"]
    return targets - 1, inputs.input_ids[targets]


class JanusFlowModel(nn.Module):
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
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        hidden = cfg.llm.hidden_size
        self.llm = LanguageModel(cfg.llm, pre_process, post_process, params_dtype, process_groups)
        self.repa_on_this_stage = cfg.repa.enabled and cfg.repa.layer in self.llm.layer_numbers
        if cfg.repa.enabled and self.repa_on_this_stage != pre_process:
            raise ValueError(
                f"model.repa.layer={cfg.repa.layer} must be on the first pipeline stage, next to "
                "SigLIP which gives its targets: lower the REPA layer or pipeline_parallel"
            )
        if pre_process:
            self.und_encoder = UnderstandingEncoder(cfg.und_encoder)
            self.und_aligner = nn.Linear(cfg.und_encoder.hidden_size, hidden)
            self.beg_of_und_embed = nn.Parameter(torch.zeros(1, hidden))
            nn.init.normal_(self.beg_of_und_embed, std=0.02)
            self.gen_encoder = GenerationEncoder(cfg.gen_vision, hidden)
            self.gen_enc_aligner = nn.Linear(cfg.gen_vision.channels, hidden)
            if self.repa_on_this_stage:
                self.repa_projector = RepaProjector(
                    hidden, cfg.repa.projector_hidden_size, cfg.und_encoder.hidden_size
                )
        if post_process:
            self.gen_dec_aligner_norm = RMSNorm(hidden, cfg.gen_vision.norm_eps)
            self.gen_dec_aligner = nn.Linear(hidden, cfg.gen_vision.channels)
            self.gen_decoder = GenerationDecoder(cfg.gen_vision, hidden)
        self.to(params_dtype)
        self._register_state_dict_hook(drop_empty_extra_state)
        self._register_load_state_dict_pre_hook(accept_missing_extra_state, with_module=True)

    # ----------------------------------------------------------------------------------------
    # trainable sets of the three training stages
    def set_trainable(self, trainable: str) -> None:
        """'new_modules' (stage 1), 'all_but_und_encoder' (stage 2) or 'all' (stage 3): see
        ``pretrain.model.trainable``."""
        for name, param in self.named_parameters():
            param.requires_grad_(trains(name.split(".")[0], trainable, "janusflow"))

    # ----------------------------------------------------------------------------------------
    def _embed_inputs(self, inputs: ModelInputs) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Mixed input embeddings [T, H]; also the generation skip and t_emb for the decoder."""
        meta = inputs.packing()
        index = meta.on(inputs.input_ids.device)
        embeds = self.llm.embed_tokens(inputs.input_ids)
        gen_skip = gen_t_emb = None

        unused: list[nn.Module | nn.Parameter] = []
        und_pos = index["und_positions"]
        if und_pos.numel():
            features = self.und_aligner(self.und_encoder(inputs.und_pixels))
            embeds = embeds.index_put((und_pos,), flatten_checked(features, und_pos, "understanding image"))
        else:
            unused += [self.und_encoder, self.und_aligner]
        begin_pos = index["und_begin_positions"]
        if begin_pos.numel():
            embeds = embeds.index_put((begin_pos,), self.beg_of_und_embed.expand(len(begin_pos), -1))
        else:
            unused.append(self.beg_of_und_embed)

        latent_pos, time_pos = index["gen_latent_positions"], index["gen_time_positions"]
        if latent_pos.numel() or time_pos.numel():
            if inputs.gen_z_t is None or len(time_pos) != len(inputs.gen_z_t):
                raise ValueError(
                    f"{len(time_pos)} time tokens but "
                    f"{0 if inputs.gen_z_t is None else len(inputs.gen_z_t)} generation latents"
                )
            gen_skip, gen_t_emb = self.gen_encoder(inputs.gen_z_t.to(embeds.dtype), inputs.gen_t)
            latent_tokens = self.gen_enc_aligner(grid_to_tokens(gen_skip))
            embeds = embeds.index_put((latent_pos,), flatten_checked(latent_tokens, latent_pos, "latent"))
            embeds = embeds.index_put((time_pos,), gen_t_emb.to(embeds.dtype))
        else:
            unused += [self.gen_encoder, self.gen_enc_aligner]
        if self.repa_on_this_stage and (not time_pos.numel() or inputs.repa_pixels is None):
            unused.append(self.repa_projector)
        return embeds + zero_touch(unused), gen_skip, gen_t_emb

    def forward(
        self, inputs: ModelInputs, stage_input: Optional[StageActivations] = None
    ) -> tuple[Optional[StageActivations], ModelOutputs]:
        """Run this stage. Returns (activations for the next stage or None on the last, outputs)."""
        outputs = ModelOutputs()
        if self.pre_process:
            embeds, gen_skip, gen_t_emb = self._embed_inputs(inputs)
            hidden_in = embeds[:, None, :]
        else:
            if stage_input is None:
                raise ValueError("a later pipeline stage needs the previous stage's activations")
            hidden_in, gen_skip, gen_t_emb = stage_input.hidden, stage_input.gen_skip, stage_input.gen_t_emb

        capture = (self.cfg.repa.layer,) if self.repa_on_this_stage else ()
        meta = inputs.packing()
        hidden, captured = self.llm(
            hidden_in, inputs.position_ids, inputs.cu_seqlens, inputs.hidden_keys, capture, max_seqlen=meta.max_seqlen,
            doc_lengths=meta.doc_lengths,
        )
        latent_pos = meta.on(hidden.device)["gen_latent_positions"]
        n_gen = 0 if inputs.gen_z_t is None else len(inputs.gen_z_t)

        if self.repa_on_this_stage and n_gen and inputs.repa_pixels is not None:
            features = captured[self.cfg.repa.layer][latent_pos, 0].reshape(n_gen, -1, hidden.shape[-1])
            outputs.repa_projected = self.repa_projector(features)
            with torch.no_grad():  # stop-grad: REPA never trains SigLIP
                outputs.repa_target = self.und_encoder(inputs.repa_pixels)

        if not self.post_process:
            return StageActivations(hidden, gen_skip, gen_t_emb), outputs

        final = hidden[:, 0, :]
        if not n_gen:
            final = final + zero_touch([self.gen_dec_aligner_norm, self.gen_dec_aligner, self.gen_decoder])
        outputs.final_hidden = final
        positions, labels = target_positions(inputs)
        outputs.logits = self.llm.compute_logits(final[positions])
        outputs.labels = labels
        if n_gen:
            outputs.velocity = self.decode_velocity(final[latent_pos].reshape(n_gen, -1, final.shape[-1]), gen_skip, gen_t_emb)
        return None, outputs

    def decode_velocity(self, latent_hidden: torch.Tensor, gen_skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """LLM final hidden states at the latent positions [N, P, H] -> velocity [N, C, S, S]."""
        x = self.gen_dec_aligner(self.gen_dec_aligner_norm(latent_hidden))
        side = gen_skip.shape[-1]
        return self.gen_decoder(tokens_to_grid(x, side), gen_skip, t_emb)
