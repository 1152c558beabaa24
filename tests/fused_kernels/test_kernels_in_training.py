"""End to end: the training micro-step on the wired kernels equals the unwired PyTorch path.

``prepare_model_inputs -> model -> stage_loss_terms -> combine_losses -> backward`` on a tiny JanusFlow
with generation (REPA on) and understanding documents, once under the ``reference`` backend (plain
PyTorch everywhere: the ConvNeXt modules, z_t, L_RF, L_REPA) and once under ``triton`` on CPU in
Triton's interpreter (fused ConvNeXt block, ``flow_interpolate``, ``rf_loss_per_sample``,
``repa_loss_per_sample``, forward and backward). Same z_t, same losses, same gradients.
"""

import pytest
import torch

from datacontract.format import Task
from fused_kernels import _triton, kernel_backend
from pretrain.losses import combine_losses
from pretrain.step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from pretrain.synthetic import make_synthetic_batch
from tests.conftest import _tiny_model_config
from tests.fused_kernels.parity import record_launches

# Kernels the wired step must launch (forward and backward of the flow / REPA ops, the ConvNeXt block).
WIRED = {"_interpolate_kernel", "_rf_loss_fwd_kernel", "_scale_per_sample_kernel", "_cosine_fwd_kernel",
         "_cosine_bwd_kernel", "_rms_norm_fwd_kernel", "_grn_apply_kernel", "_modulate_fwd_kernel"}


def _micro_step(model, batch, backend: str):
    model.zero_grad(set_to_none=True)
    with kernel_backend(backend):
        inputs, endpoints = prepare_model_inputs(batch, batch.gen_latents, 0.5, torch.Generator().manual_seed(1))
        _, outputs = model(inputs)
        terms = stage_loss_terms(outputs, endpoints)
        loss, _ = combine_losses(terms, {"ar": 1.0, "rf": 1.0, "repa": 1.0}, batch_unit_counts(batch))
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return inputs.gen_z_t, {name: term.total.detach() for name, term in terms.items()}, grads


@pytest.mark.skipif(not _triton.HAVE_TRITON, reason="triton is not installed")
def test_wired_micro_step_equals_the_unwired_one(runtime, monkeypatch):
    from pretrain.model.janusflow import JanusFlowModel

    torch.manual_seed(0)
    model = JanusFlowModel(_tiny_model_config())
    with torch.no_grad():  # the GRNs start at zero (identity): make them matter
        for name, p in model.named_parameters():
            if "channelwise_norm" in name:
                p.normal_(0.0, 0.3)
    tasks = [Task.GENERATION, Task.UNDERSTANDING, Task.GENERATION, Task.TEXT, Task.GENERATION]
    batch = make_synthetic_batch(model.cfg, tasks, torch.Generator().manual_seed(4))

    z_ref, losses_ref, grads_ref = _micro_step(model, batch, "reference")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = record_launches(monkeypatch)
    z_wired, losses_wired, grads_wired = _micro_step(model, batch, "triton")

    assert WIRED <= set(launched), sorted(WIRED - set(launched))
    assert torch.equal(z_wired, z_ref)  # the same float32 arithmetic, element by element
    assert losses_wired.keys() == losses_ref.keys() == {"ar", "rf", "repa"}
    for name in losses_ref:  # measured: ar 0, rf 0, repa 6.9e-8 relative (one float32 ulp)
        torch.testing.assert_close(losses_wired[name], losses_ref[name], rtol=3e-7, atol=0.0,
                                   msg=lambda m: f"loss {name}: {m}")
    assert grads_wired.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        scale = float(ref.abs().max())
        error = float((grads_wired[name] - ref).abs().max())
        # measured: at most 4.1e-7 of the tensor's largest gradient (98 tensors; float32 sums in
        # another order, worst in the decoder block's RMSNorm weight)
        assert error <= 2e-6 * max(scale, 1e-12), f"grad of {name}: {error:.3g} vs max {scale:.3g}"


@pytest.mark.gpu
def test_the_losses_take_the_compiled_kernels_on_cuda(monkeypatch):
    """On CUDA under ``auto`` (the recipe default) the loss call sites run the Triton kernels, with the
    numbers of the reference backend, on one 1.3B micro-step's shapes (5 samples, bf16 model outputs)."""
    from pretrain.losses import interpolate_flow, rectified_flow_loss, repa_loss

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    x, z0 = (torch.randn(5, 4, 48, 48, generator=g).cuda() for _ in range(2))
    t = torch.rand(5, generator=g).cuda()
    v = torch.randn(5, 4, 48, 48, generator=g).cuda().bfloat16()
    p, f = (torch.randn(5, 576, 1024, generator=g).cuda().bfloat16() for _ in range(2))

    def run(backend):
        v_leaf, p_leaf = v.clone().requires_grad_(), p.clone().requires_grad_()
        with kernel_backend(backend):
            z_t = interpolate_flow(x, z0, t)
            rf, repa = rectified_flow_loss(v_leaf, x, z0), repa_loss(p_leaf, f)
            (rf.total + repa.total).backward()
        return z_t, rf.total, repa.total, v_leaf.grad, p_leaf.grad

    reference = run("reference")
    launched = record_launches(monkeypatch)
    wired = run("auto")
    assert {"_interpolate_kernel", "_rf_loss_fwd_kernel", "_cosine_fwd_kernel", "_cosine_bwd_kernel"} <= set(launched)
    for name, a, b in zip(("z_t", "L_RF", "L_REPA"), wired[:3], reference[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")  # float32 sums
    for name, a, b in zip(("dL_RF/dv", "dL_REPA/dp"), wired[3:], reference[3:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2 * float(b.float().abs().max()),
                                   msg=lambda m: f"{name}: {m}")  # bf16 gradients
