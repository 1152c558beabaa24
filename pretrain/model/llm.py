"""The Llama-architecture LLM built from megatron-core blocks (tensor/pipeline parallel).

This is the only module that knows megatron-core. It owns the word embedding (first pipeline stage),
a ``TransformerBlock`` holding this stage's layers, and the final norm + output layer (last stage).
It never sees token ids of images: the JanusFlow model hands it mixed input embeddings.

Input layout is megatron's packed "thd": every document of the micro-batch laid end to end on one
token axis, hidden states of shape [T, 1, H]. RoPE angles are computed here from explicit
``position_ids`` (restarting per document, or with gaps as in the released CFG sampler), once per
micro-step, and handed with the document boundaries to our core attention, which applies them to the
whole packed q/k (``pretrain.model.attention``; megatron-core's own packed RoPE reads every document
boundary back to the host).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from .attention import PackedAttentionParams, PackedCoreAttention
from .config import LLMConfig


def default_process_groups() -> ProcessGroupCollection:
    """megatron-core's own groups (its global state, set up by ``pretrain.runtime``): for models built
    without a layout (tests, samplers, tools). The trainer passes the layout's groups instead."""
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "pp", "cp"])


def build_transformer_config(
    cfg: LLMConfig, params_dtype: torch.dtype = torch.float32, groups: Optional[ProcessGroupCollection] = None
) -> TransformerConfig:
    """megatron-core settings equal to HF Llama: RMSNorm, SwiGLU, no biases, no dropout, unfused ops."""
    groups = groups or default_process_groups()
    tp, pp = dist.get_world_size(groups.tp), dist.get_world_size(groups.pp)
    if cfg.num_attention_heads % tp or cfg.query_groups % tp:
        raise ValueError(
            f"model.llm: {cfg.num_attention_heads} heads / {cfg.query_groups} key-value groups "
            f"cannot be split over tensor_parallel={tp}"
        )
    if cfg.vocab_size % tp:
        raise ValueError(f"model.llm.vocab_size={cfg.vocab_size} must be divisible by tensor_parallel={tp}")
    if cfg.num_layers % pp:
        raise ValueError(f"model.llm.num_layers={cfg.num_layers} must be divisible by pipeline_parallel={pp}")
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        init_method_std=0.02,
        # Full matrices are initialised on CPU then sliced: the initial weights do not depend on
        # the tensor-parallel layout, which keeps layouts comparable and replicas identical.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        sequence_parallel=False,
        deallocate_pipeline_outputs=False,
        **({"cpu_offloading": False} if on_cpu else {}),
    )


def build_layer_spec():
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    return spec


def rope_frequencies(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[T] positions -> [T, 1, 1, head_dim] angles in megatron's (and HF Llama's) half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    angles = position_ids.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


class LanguageModel(MegatronModule):
    """This pipeline stage's share of the LLM.

    ``forward`` takes the stage input [T, 1, H] (mixed embeddings on the first stage, the previous
    stage's output otherwise) and returns [T, 1, H]: after the final RMSNorm on the last stage.
    """

    def __init__(
        self,
        cfg: LLMConfig,
        pre_process: bool,
        post_process: bool,
        params_dtype=torch.float32,
        process_groups: Optional[ProcessGroupCollection] = None,
    ):
        groups = process_groups or default_process_groups()
        config = build_transformer_config(cfg, params_dtype, groups)
        super().__init__(config=config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config, tp_group=groups.tp
            )
        self.decoder = TransformerBlock(
            config=config, spec=build_layer_spec(), pre_process=pre_process, post_process=post_process,
            pg_collection=groups,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size,
                cfg.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=True,
                tp_group=groups.tp,
            )

    @property
    def layer_numbers(self) -> list[int]:
        """Global 1-based numbers of the transformer blocks on this stage."""
        return [layer.layer_number for layer in self.decoder.layers]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, H] word embeddings (first stage only)."""
        return self.embedding(input_ids[None, :])[0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        hidden_keys: Optional[torch.Tensor] = None,
        capture_layers: Iterable[int] = (),
        max_seqlen: Optional[int] = None,
        doc_lengths: Optional[tuple[int, ...]] = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run this stage's blocks. Returns the output and {layer number: output of that block}
        for the requested layers that live on this stage (REPA reads block 6).

        ``max_seqlen``: the longest document, a host int from the batch metadata; when omitted it is
        read from ``cu_seqlens`` (a device-to-host sync, fine for samplers, not for training).
        ``doc_lengths``: the documents' lengths on the host (batch metadata), for the dense backend's
        tiled layout; optional.
        """
        cu = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = int(torch.diff(cu).max()) if cu.numel() > 1 else 0
        packed = PackedAttentionParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
            hidden_keys=hidden_keys, doc_lengths=doc_lengths,
            rope_freqs=rope_frequencies(position_ids, self.cfg.head_dim, self.cfg.rope_theta),
        )
        captured: dict[int, torch.Tensor] = {}
        wanted = set(capture_layers) & set(self.layer_numbers)
        handles = []
        for layer in self.decoder.layers:
            if layer.layer_number in wanted:
                # A forward hook keeps megatron's block loop (and its recompute) untouched.
                handles.append(
                    layer.register_forward_hook(
                        lambda _m, _i, out, n=layer.layer_number: captured.__setitem__(n, out[0])
                    )
                )
        try:
            if not self.pre_process:
                self.decoder.set_input_tensor(hidden_states)
            # RoPE and the hidden keys travel in ``packed``: megatron gets neither (see the module doc).
            output = self.decoder(
                hidden_states=hidden_states, attention_mask=None, rotary_pos_emb=None, packed_seq_params=packed
            )
        finally:
            for handle in handles:
                handle.remove()
        return output, captured

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] final hidden states -> [N, V] logits (last stage only; gathered over TP)."""
        logits, _ = self.output_layer(hidden[:, None, :])
        return logits[:, 0, :]
