"""The FLOP model (``pretrain.flops``) against the FLOPs a training micro-step actually executes.

A tiny model of each family (``recipes/tiny_cpu.yaml``, ``recipes/tiny_januspro_cpu.yaml``) runs one
micro-step as the trainer does (the family's ``ModelStep``: ``prepare`` -> ``forward`` -> the
trainer's ``micro_batch_loss`` -> ``backward``) on CPU in fp32 under ``torch.utils.flop_counter``'s
``FlopCounterMode`` (2 m n k per matmul, convolutions likewise, SDPA as dense attention). A second
dispatch mode splits the same count by module: forward ops by the module running them, backward ops
by the module whose forward created the autograd node being run (``_current_autograd_node`` and the
nodes' sequence numbers, recorded around every module's forward), so both passes land on their part.
The parts are the FLOP model's (``sequence_flops``: LLM blocks, attention core, output layer, SigLIP
on understanding images and on REPA targets, aligners, generation modules, REPA projector, image head)
and the model's figure is for the same batch (``SequenceShape.from_batch``) and trainable set.

Every part agrees exactly (integer FLOPs, no tolerance) but one, a convention:

* Attention core. The model counts causal query-key pairs per document,
  ``sum d(d+1)/2``; the CPU backend (``dense``) runs SDPA over dense ``[C, C]`` tiles of whole
  documents (``dense_tiles``), or one dense ``[T, T]`` call when tiling would not halve the work, and
  the counter counts what runs. Both are ``(4 + 8) x width x layers`` FLOPs per pair (forward QK^T
  and PV; backward dV, dP, dQ, dK); the test checks each side against its own pair count, so
  ``measured / model = executed pairs / causal pairs`` exactly. (GPU kernels, flash and flex, skip
  the masked blocks and come close to the causal count.)

This test found three counting errors, since fixed: the model applied its rule ("an input gradient
where anything before the layer trains") per part instead of per layer. It counted an input
gradient for SigLIP's patch embedding in stage 3 (it reads pixels) and for JanusFlow's ``in_conv``
and ``time_embed.linear_1`` (they read z_t and the sinusoidal features of t), and none for the
second layer of Janus-Pro's understanding aligner in stages 1 and 2 (its input comes from the
trained first layer). The largest effect on a paper-size sequence: Janus-Pro-1B stage 1
understanding rows, +0.10 %; whole three-stage schedules, at most +0.013 % (Janus-Pro-1B).

Counting fix: torch's formula for ``convolution_backward`` ignores ``groups`` in the weight gradient
(it counts a depthwise conv's weight gradient ``channels`` times over: 32x the forward's FLOPs instead
of 1x for 32 channels). The depthwise convolutions of the ConvNeXt blocks are grouped, so the counter
here uses a corrected formula (``test_torch_counts_grouped_weight_gradients_groups_times_over``
shows the difference). SDPA's CPU kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward) have no formula in torch at all; they get the dense one, grouped-query heads included.

Measured vs model on the 82-token mixed batch: attention 3.0x (3,072 executed pairs against 1,022
causal ones: tiny documents in 32-slot tiles); every other part 0 (with the grouped-conv fix; before
the three fixes: SigLIP on understanding images -8.3 % in stage 3, JanusFlow generation modules
-3.0 %, Janus-Pro understanding aligner +33 % in stages 1 and 2). Runtime: about 7 s for the file on
the 2-core machine, mostly imports.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, shape_wrapper

from datacontract.format import Task
from pretrain.flops import SequenceShape, causal_pairs, sequence_flops
from pretrain.model.attention import dense_tiles
from pretrain.recipe import load_recipe
from pretrain.synthetic import make_synthetic_batch
from pretrain.train.forward_backward import LossContext, micro_batch_loss

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# counting rules the counter lacks (see the module docstring)
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    """Dense attention, [B, Hq, Sq, D] queries against [B, Hkv, Sk, D] keys (Hkv may divide Hq):
    QK^T and PV per query head, 2 FLOPs per multiply-add."""
    b, heads, s_q, d_qk = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * heads * s_q * s_k * (d_qk + d_v)


def _sdpa_cpu_backward_flops(_grad_out_shape, query_shape, key_shape, value_shape, *_args, out_shape=None,
                             **_kwargs) -> int:
    """dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward. Torch's formula for its GPU
    kernels adds the recomputation of QK^T (a fifth matmul); the FLOP model counts no recomputation,
    and neither does this."""
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def _conv_backward_flops(grad_out_shape, _x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **_kwargs) -> int:
    """Input and weight gradients of a (grouped) convolution: each as many multiply-adds as the
    forward, ``batch x output positions x weight elements`` (``w_shape`` holds in/groups)."""
    assert not transposed, "no transposed convolution in these models"
    forward = 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * math.prod(w_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


CUSTOM_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    aten.convolution_backward: _conv_backward_flops,
}


class FlopsByModule(TorchDispatchMode):
    """FLOPs of every counted op by (module path, pass): the forward ops by the innermost module
    running, the backward ops by the innermost module whose forward created the node being run.
    Paths of modules called under ``no_grad`` end in ``#no_grad`` (REPA's SigLIP targets)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules()}
        self.registry = {**flop_registry, **{op: shape_wrapper(f) for op, f in CUSTOM_FLOPS.items()}}
        self.stack: list[tuple[str, int]] = []
        self.spans: list[tuple[int, int, str]] = []  # [first, last) autograd sequence numbers of a call
        self.flops: dict[tuple[str, str], int] = defaultdict(int)

    def _pre(self, module, _args):
        if id(module) in self.names:
            name = self.names[id(module)] + ("" if torch.is_grad_enabled() else "#no_grad")
            self.stack.append((name, torch._C._autograd._get_sequence_nr()))

    def _post(self, module, _args, _out):
        if id(module) in self.names:
            name, first = self.stack.pop()
            self.spans.append((first, torch._C._autograd._get_sequence_nr(), name))

    def __enter__(self):
        self._hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _creator(self, seq: int) -> str:
        inside = [(last - first, name) for first, last, name in self.spans if first <= seq < last]
        return min(inside)[1] if inside else "<no module>"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            node = torch._C._current_autograd_node()
            if node is None:
                key = (self.stack[-1][0] if self.stack else "<no module>", "fwd")
            else:
                key = (self._creator(node._sequence_nr()), "bwd")
            self.flops[key] += formula(*args, **kwargs, out_val=out)
        return out


_GEN_MODULES = ("gen_encoder", "gen_enc_aligner", "gen_dec_aligner", "gen_dec_aligner_norm", "gen_decoder",
                "gen_embed", "gen_aligner")


def part_of(path: str) -> str:
    """The ``sequence_flops`` part a module's FLOPs belong to."""
    top = path.split(".")[0]
    if path.startswith("llm.decoder."):
        return "llm_attention" if ".core_attention" in path else "llm_blocks"
    if path.startswith("llm.output_layer"):
        return "output_layer"
    if top.startswith("und_encoder"):
        return "siglip_repa" if path.endswith("#no_grad") else "siglip_und"
    if top in _GEN_MODULES:
        return "gen_modules"
    if top in ("und_aligner", "repa_projector"):
        return top
    if top == "gen_head":
        return "image_head"
    return f"unexpected: {path}"


# ---------------------------------------------------------------------------------------------
RECIPES = {"janusflow": "recipes/tiny_cpu.yaml", "januspro": "recipes/tiny_januspro_cpu.yaml"}
MIXED = (Task.UNDERSTANDING, Task.GENERATION, Task.TEXT, Task.GENERATION)


def measure_micro_step(layout, family: str, overrides: tuple[str, ...], tasks, text_len: int = 6):
    """One micro-step under both counters -> (recipe, model, step, batch, FLOPs by part, FlopCounterMode's
    total)."""
    from pretrain.families.janusflow import JANUSFLOW, JanusFlowStep
    from pretrain.families.januspro import JANUSPRO, JanusProStep

    spec, step_class = (JANUSPRO, JanusProStep) if family == "januspro" else (JANUSFLOW, JanusFlowStep)
    recipe = load_recipe(RECIPES[family], list(overrides))
    torch.manual_seed(0)
    model = spec.build_model(recipe, layout, lambda _: None)  # train.trainable applied
    step = step_class(recipe, layout)
    batch = make_synthetic_batch(recipe.model, tasks, torch.Generator().manual_seed(3), text_len=text_len)
    prepared = step.prepare(batch, torch.Generator().manual_seed(4))
    ctx = LossContext(spec.objectives, spec.loss_weights(recipe), step.unit_counts(batch), grad_scale=1.0)
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter, FlopsByModule(model) as split:
        result = step.forward(model, prepared, None)
        loss, _ = micro_batch_loss(result.terms, ctx)
        loss.backward()
    by_part: dict[str, int] = defaultdict(int)
    for (path, _pass), flops in split.flops.items():
        by_part[part_of(path)] += flops
    return recipe, model, step, batch, dict(by_part), counter.get_total_flops()


CASES = [
    ("janusflow", ("train.trainable=new_modules",), MIXED, 6),
    ("janusflow", ("train.trainable=all_but_und_encoder",), MIXED, 6),
    ("janusflow", ("train.trainable=all",), MIXED, 6),
    # Grouped-query attention, and documents long enough that the backend makes one dense [T, T] call.
    ("janusflow", ("train.trainable=all", "model.llm.num_query_groups=2"), (Task.UNDERSTANDING, Task.TEXT), 40),
    ("januspro", ("train.trainable=new_modules",), MIXED, 6),
    ("januspro", ("train.trainable=all_but_und_encoder",), MIXED, 6),
    ("januspro", ("train.trainable=all",), MIXED, 6),
]


@pytest.mark.parametrize("family,overrides,tasks,text_len", CASES,
                         ids=[f"{c[0]}-{c[1][0].split('=')[1]}{'-gqa-untiled' if len(c[1]) > 1 else ''}"
                              for c in CASES])
def test_sequence_flops_equal_the_counted_flops_of_a_micro_step(runtime, family, overrides, tasks, text_len):
    recipe, _, step, batch, measured, counter_total = measure_micro_step(runtime, family, overrides, tasks,
                                                                         text_len)
    cfg, seq = recipe.model, SequenceShape.from_batch(batch)
    model_flops = sequence_flops(cfg, step.flop_sizes, step.flop_grads, seq)

    # The split covers exactly what FlopCounterMode counted, and nothing runs outside the model's parts
    # (losses, zero-touch terms, RoPE and norms carry no counted op).
    assert sum(measured.values()) == counter_total
    assert not [p for p in measured if p.startswith("unexpected")], measured
    assert set(measured) <= set(model_flops), (measured.keys(), model_flops.keys())
    assert step.flops(batch) == sum(model_flops.values())  # what the trainer logs for this batch

    # Attention core: executed dense tiles vs the model's causal pairs, each exact (module docstring).
    llm = cfg.llm
    per_pair = 12 * llm.num_attention_heads * llm.head_dim * llm.num_layers  # fwd 4 + bwd 8 per pair
    tiles = dense_tiles(seq.doc_lengths, "cpu")
    executed_pairs = tiles.tiles * tiles.capacity**2 if tiles is not None else seq.tokens**2
    if text_len == 40:
        assert tiles is None  # the untiled [T, T] call
    assert measured["llm_attention"] == per_pair * executed_pairs
    assert model_flops["llm_attention"] == per_pair * causal_pairs(seq.doc_lengths)
    assert 2 * causal_pairs(seq.doc_lengths) == sum(d * d + d for d in seq.doc_lengths)

    # Every other part: exactly the model's figure.
    expected = dict(model_flops, llm_attention=per_pair * executed_pairs)
    expected = {part: flops for part, flops in expected.items() if flops}
    assert measured == expected, {p: (measured.get(p, 0), expected.get(p, 0), model_flops.get(p, 0))
                                  for p in expected.keys() | measured.keys()}


def test_frozen_parts_run_no_weight_gradient_and_siglip_targets_run_forward_only(runtime):
    """Stage 1 of JanusFlow, pass by pass: the frozen LLM costs 2 N forward + 2 N input gradient per
    token (no weight gradient), the output layer likewise at the targets only, SigLIP forward only
    (both on understanding images and, under no_grad, on the REPA targets)."""
    recipe, _, step, batch, measured, _ = measure_micro_step(runtime, "janusflow", ("train.trainable=new_modules",),
                                                             MIXED)
    seq = SequenceShape.from_batch(batch)
    n, out = step.flop_sizes.llm_per_token, step.flop_sizes.output_per_token
    assert measured["llm_blocks"] == (2 + 2) * n * seq.tokens
    assert measured["output_layer"] == (2 + 2) * out * seq.targets
    assert seq.targets == int(batch.target_mask.sum())  # logits at the L_AR targets only
    und = recipe.model.und_encoder
    siglip_forward = 2 * step.flop_sizes.siglip_per_patch * und.num_image_tokens \
        + 4 * und.num_image_tokens**2 * und.hidden_size * und.num_layers
    assert measured["siglip_und"] == siglip_forward * seq.und_images
    assert measured["siglip_repa"] == siglip_forward * seq.gen_images


def test_torch_counts_grouped_weight_gradients_groups_times_over():
    """Why ``convolution_backward`` has its own formula here: torch's counts a depthwise conv's weight
    gradient as if the convolution were dense (x groups); ours counts what runs."""
    conv = nn.Conv2d(32, 32, kernel_size=7, padding=3, groups=32)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    forward = 2 * 2 * 16 * conv.weight.numel()
    for mapping, weight_gradient in (({}, 32 * forward), (CUSTOM_FLOPS, forward)):
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            conv(x).sum().backward()
        assert counter.get_total_flops() == forward + forward + weight_gradient  # input gradient = forward


def test_sdpa_cpu_formula_is_torchs_dense_formula_with_grouped_heads():
    """The CPU kernels' formula equals torch's dense SDPA formula (its GPU kernels') on repeated
    key/value heads, less the backward's recomputation of QK^T (half the forward), and
    FlopCounterMode picks it up for the CPU kernel."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q, k = (2, 4, 24, 16), (2, 2, 40, 16)
    dense_k = (2, 4, 40, 16)
    forward = sdpa_flop_count(q, dense_k, dense_k)
    assert _sdpa_cpu_flops(q, k, k) == forward
    assert _sdpa_cpu_backward_flops(q, q, k, k) == 2 * forward == sdpa_backward_flop_count(q, q, k, k) - forward // 2
    query = torch.randn(q, requires_grad=True)
    key, value = torch.randn(k, requires_grad=True), torch.randn(k, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        F.scaled_dot_product_attention(query, key, value, enable_gqa=True).sum().backward()
    assert counter.get_total_flops() == 3 * _sdpa_cpu_flops(q, k, k)
