"""Unit tests for ``pretrain.losses``: each objective against an independently written reference,
the stop-gradient of REPA, the empty-AR case, the flow interpolation, the samplers, and the key
property of ``combine_losses`` (micro-batch / rank splits give exactly the full-batch gradient)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.losses import (
    LossTerm,
    autoregressive_loss,
    combine_losses,
    draw_prompt_drop,
    interpolate_flow,
    rectified_flow_loss,
    repa_loss,
    sample_logit_normal_t,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# L_AR
# --------------------------------------------------------------------------------------------------


def test_ar_matches_mean_cross_entropy_times_n():
    g = _gen(1)
    n, v = 13, 37
    logits = torch.randn(n, v, generator=g, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    term = autoregressive_loss(logits, labels)
    ref = F.cross_entropy(logits, labels, reduction="mean") * n
    assert isinstance(term, LossTerm)
    assert term.count == n
    assert term.total.dim() == 0 and term.total.dtype == torch.float32
    torch.testing.assert_close(term.total, ref)
    (g_term,) = torch.autograd.grad(term.total, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_term, g_ref)


def test_ar_matches_explicit_log_softmax_loop():
    g = _gen(2)
    n, v = 6, 11
    logits = torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    ref = 0.0
    for i in range(n):
        row = logits[i].double()
        log_z = math.log(sum(math.exp(x) for x in row.tolist()))
        ref += log_z - row[labels[i]].item()
    term = autoregressive_loss(logits, labels)
    assert term.total.item() == pytest.approx(ref, rel=1e-5)


def test_ar_computes_in_float32_for_bf16_logits():
    g = _gen(3)
    logits = torch.randn(9, 50, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 50, (9,), generator=g)
    term = autoregressive_loss(logits, labels)
    assert term.total.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), labels, reduction="sum")
    torch.testing.assert_close(term.total, ref)


def test_ar_empty_backpropagates_zero_gradients():
    head = nn.Linear(8, 20)
    hidden = torch.randn(0, 8)
    logits = head(hidden)
    labels = torch.empty(0, dtype=torch.long)
    term = autoregressive_loss(logits, labels)
    assert term.count == 0
    assert term.total.item() == 0.0
    assert term.total.grad_fn is not None
    loss, logs = combine_losses({"ar": term}, {"ar": 1.0}, {"ar": 0})
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert torch.count_nonzero(head.weight.grad) == 0
    assert torch.count_nonzero(head.bias.grad) == 0
    assert logs["ar"].item() == 0.0


def test_ar_rejects_bad_shapes():
    with pytest.raises(ValueError):
        autoregressive_loss(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        autoregressive_loss(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# L_RF
# --------------------------------------------------------------------------------------------------


def test_interpolate_flow_endpoints():
    g = _gen(4)
    x = torch.randn(4, 3, 5, 5, generator=g)
    z0 = torch.randn(4, 3, 5, 5, generator=g)
    assert torch.equal(interpolate_flow(x, z0, torch.zeros(4)), z0)
    assert torch.equal(interpolate_flow(x, z0, torch.ones(4)), x)
    assert interpolate_flow(x, z0, torch.ones(4), torch.bfloat16).dtype == torch.bfloat16


def test_interpolate_flow_per_sample_times_and_derivative():
    g = _gen(5)
    x = torch.randn(3, 2, 4, 4, generator=g)
    z0 = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    z_t = interpolate_flow(x, z0, t)
    for b in range(3):
        tb = t[b].item()
        torch.testing.assert_close(z_t[b], x[b] * tb + z0[b] * (1.0 - tb))
    # The velocity target x - z0 is d z_t / d t of the straight path (the reference path is differentiable).
    (dt,) = torch.autograd.grad(z_t.sum(), t)
    torch.testing.assert_close(dt, (x - z0).flatten(1).sum(1))


def test_interpolate_flow_rejects_bad_shapes():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError):
        interpolate_flow(x, torch.randn(2, 3, 4, 5), torch.rand(2))
    with pytest.raises(ValueError):
        interpolate_flow(x, torch.randn_like(x), torch.rand(3))
    with pytest.raises(ValueError):
        interpolate_flow(x, torch.randn_like(x), torch.rand(2, 1))


def test_rf_matches_per_sample_loop():
    g = _gen(6)
    b, c, h, w = 3, 4, 5, 6
    v_pred = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    x, z0 = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    term = rectified_flow_loss(v_pred, x, z0)
    assert term.count == b
    target = x - z0
    ref = torch.zeros(())
    for i in range(b):
        diff = v_pred[i] - target[i]
        ref = ref + (diff * diff).sum() / (c * h * w)
    torch.testing.assert_close(term.total, ref)
    (grad,) = torch.autograd.grad(term.total, v_pred)
    torch.testing.assert_close(grad, 2.0 * (v_pred - target).detach() / (c * h * w))


def test_rf_target_is_constant_and_bf16_runs_in_float32():
    g = _gen(7)
    v_pred = torch.randn(2, 4, 3, 3, generator=g).to(torch.bfloat16).requires_grad_()
    x = torch.randn(2, 4, 3, 3, generator=g).requires_grad_()
    z0 = torch.randn(2, 4, 3, 3, generator=g).requires_grad_()
    term = rectified_flow_loss(v_pred, x, z0)
    assert term.total.dtype == torch.float32
    ref = F.mse_loss(v_pred.float(), (x - z0).float(), reduction="none").flatten(1).mean(1).sum()
    torch.testing.assert_close(term.total, ref.detach())
    term.total.backward()
    assert v_pred.grad is not None
    assert x.grad is None and z0.grad is None


def test_rf_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        rectified_flow_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 4))
    with pytest.raises(ValueError):
        rectified_flow_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 4))


# --------------------------------------------------------------------------------------------------
# Logit-normal time sampler
# --------------------------------------------------------------------------------------------------


def _ks_statistic_vs_standard_normal(samples: torch.Tensor) -> float:
    """Two-sided Kolmogorov-Smirnov statistic of ``samples`` against N(0, 1)."""
    x, _ = torch.sort(samples.double())
    n = x.numel()
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d_plus = (i / n - cdf).max()
    d_minus = (cdf - (i - 1) / n).max()
    return float(torch.maximum(d_plus, d_minus))


N_KS = 20_000
# Asymptotic KS critical value at the 0.1% level is 1.949 / sqrt(n).
KS_CRITICAL = 1.949 / math.sqrt(N_KS)


def test_logit_normal_matches_its_distribution():
    t = sample_logit_normal_t(N_KS, generator=_gen(8))
    assert t.shape == (N_KS,) and t.dtype == torch.float32
    assert bool((t > 0).all()) and bool((t < 1).all())
    logit = torch.log(t.double()) - torch.log1p(-t.double())
    assert _ks_statistic_vs_standard_normal(logit) < KS_CRITICAL
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)


def test_logit_normal_mean_and_std_parameters():
    mean, std = 0.7, 1.6
    t = sample_logit_normal_t(N_KS, generator=_gen(9), mean=mean, std=std)
    logit = torch.log(t.double()) - torch.log1p(-t.double())
    assert _ks_statistic_vs_standard_normal((logit - mean) / std) < KS_CRITICAL


def test_ks_check_has_power():
    # The same check rejects a normal shifted by 0.1 standard deviations: the tests above mean something.
    shifted = torch.randn(N_KS, generator=_gen(10), dtype=torch.float64) + 0.1
    assert _ks_statistic_vs_standard_normal(shifted) > KS_CRITICAL


def test_logit_normal_is_strictly_inside_unit_interval_and_seeded():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = sample_logit_normal_t(5_000, generator=_gen(11), std=60.0, dtype=dtype)
        assert t.dtype == dtype
        assert bool((t > 0).all()) and bool((t < 1).all())
    a = sample_logit_normal_t(100, generator=_gen(12))
    b = sample_logit_normal_t(100, generator=_gen(12))
    assert torch.equal(a, b)
    assert sample_logit_normal_t(0).shape == (0,)
    with pytest.raises(ValueError):
        sample_logit_normal_t(4, std=0.0)


# --------------------------------------------------------------------------------------------------
# L_REPA
# --------------------------------------------------------------------------------------------------


def test_repa_matches_cosine_similarity_loop():
    g = _gen(13)
    b, p, d = 3, 7, 16
    projected = torch.randn(b, p, d, generator=g, requires_grad=True)
    target = torch.randn(b, p, d, generator=g)
    term = repa_loss(projected, target)
    assert term.count == b
    ref = torch.zeros(())
    for i in range(b):
        sims = torch.stack([F.cosine_similarity(projected[i, j], target[i, j], dim=0) for j in range(p)])
        ref = ref - sims.mean()
    torch.testing.assert_close(term.total, ref)
    (g_term,) = torch.autograd.grad(term.total, projected)
    (g_ref,) = torch.autograd.grad(ref, projected)
    torch.testing.assert_close(g_term, g_ref)


def test_repa_explicit_formula_and_bounds():
    g = _gen(14)
    projected = torch.randn(2, 5, 8, generator=g)
    target = torch.randn(2, 5, 8, generator=g)
    dots = (projected * target).sum(-1)
    norms = projected.norm(dim=-1) * target.norm(dim=-1)
    ref = -(dots / norms).mean(dim=1).sum()
    term = repa_loss(projected, target)
    torch.testing.assert_close(term.total, ref)
    # Perfect alignment (any positive scaling) gives -1 per sample.
    aligned = repa_loss(3.0 * target, target)
    assert aligned.total.item() == pytest.approx(-2.0, abs=1e-5)


def test_repa_gradient_never_reaches_target_features():
    g = _gen(15)
    encoder = nn.Linear(8, 12)  # stands in for the understanding encoder f_enc
    images = torch.randn(2, 4, 8, generator=g)
    target = encoder(images)
    target.retain_grad()
    raw_target = torch.randn(2, 4, 12, generator=g, requires_grad=True)
    projected = torch.randn(2, 4, 12, generator=g, requires_grad=True)
    (repa_loss(projected, target).total + repa_loss(projected, raw_target).total).backward()
    assert projected.grad is not None and torch.count_nonzero(projected.grad) > 0
    assert raw_target.requires_grad and raw_target.grad is None
    assert target.grad is None
    assert encoder.weight.grad is None and encoder.bias.grad is None


def test_repa_bf16_inputs_run_in_float32_and_reject_bad_shapes():
    g = _gen(16)
    projected = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    target = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    term = repa_loss(projected, target)
    assert term.total.dtype == torch.float32
    ref = -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(1).sum()
    torch.testing.assert_close(term.total, ref)
    with pytest.raises(ValueError):
        repa_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError):
        repa_loss(torch.randn(6, 4), torch.randn(6, 4))


# --------------------------------------------------------------------------------------------------
# CFG prompt drop
# --------------------------------------------------------------------------------------------------


def test_prompt_drop_rate_and_determinism():
    drop = draw_prompt_drop(20_000, 0.1, generator=_gen(17))
    assert drop.dtype == torch.bool and drop.shape == (20_000,)
    # Binomial std of the rate is sqrt(0.09 / 20000) ~ 0.0021.
    assert drop.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(drop, draw_prompt_drop(20_000, 0.1, generator=_gen(17)))
    assert not draw_prompt_drop(1000, 0.0, generator=_gen(18)).any()
    assert draw_prompt_drop(1000, 1.0, generator=_gen(18)).all()
    assert draw_prompt_drop(0, 0.5).shape == (0,)
    with pytest.raises(ValueError):
        draw_prompt_drop(4, 1.5)


# --------------------------------------------------------------------------------------------------
# combine_losses
# --------------------------------------------------------------------------------------------------


class _TinyJanus(nn.Module):
    """Just enough parameters to produce all three objectives from one graph."""

    def __init__(self, vocab: int = 23, hidden: int = 10, latent: int = 3, enc_dim: int = 6) -> None:
        super().__init__()
        self.trunk = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab)
        self.velocity = nn.Conv2d(latent, latent, kernel_size=1)
        self.repa_proj = nn.Linear(latent, enc_dim)

    def ar_term(self, h: torch.Tensor, labels: torch.Tensor) -> LossTerm:
        return autoregressive_loss(self.lm_head(torch.tanh(self.trunk(h))), labels)

    def gen_terms(self, x, z0, t, enc_feats) -> tuple[LossTerm, LossTerm]:
        v = self.velocity(interpolate_flow(x, z0, t))
        patches = v.flatten(2).transpose(1, 2)  # [B, H*W, C]
        return rectified_flow_loss(v, x, z0), repa_loss(self.repa_proj(patches), enc_feats)


def _make_batch(seed: int = 19):
    g = _gen(seed)
    n_tok, n_gen = 10, 5
    return {
        "h": torch.randn(n_tok, 10, generator=g),
        "labels": torch.randint(0, 23, (n_tok,), generator=g),
        "x": torch.randn(n_gen, 3, 4, 4, generator=g),
        "z0": torch.randn(n_gen, 3, 4, 4, generator=g),
        "t": torch.rand(n_gen, generator=g),
        "enc": torch.randn(n_gen, 16, 6, generator=g),
    }


WEIGHTS = {"ar": 1.0, "rf": 1.0, "repa": 0.5, "unused": 3.0}


def _micro_terms(model: _TinyJanus, batch: dict, tok: slice, gen: slice) -> dict[str, LossTerm]:
    rf, repa = model.gen_terms(batch["x"][gen], batch["z0"][gen], batch["t"][gen], batch["enc"][gen])
    return {"ar": model.ar_term(batch["h"][tok], batch["labels"][tok]), "rf": rf, "repa": repa}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _full_batch_reference(model: _TinyJanus, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Gradient of the plain global-batch means, written without combine_losses."""
    model.zero_grad()
    logits = model.lm_head(torch.tanh(model.trunk(batch["h"])))
    ar = F.cross_entropy(logits, batch["labels"])  # mean over all tokens
    tb = batch["t"].view(-1, 1, 1, 1)
    v = model.velocity(tb * batch["x"] + (1 - tb) * batch["z0"])
    rf = F.mse_loss(v, batch["x"] - batch["z0"])  # equal-size samples: element mean == mean of means
    proj = model.repa_proj(v.flatten(2).transpose(1, 2))
    repa = -F.cosine_similarity(proj, batch["enc"], dim=-1).mean()
    (WEIGHTS["ar"] * ar + WEIGHTS["rf"] * rf + WEIGHTS["repa"] * repa).backward()
    return _grads(model), {"ar": ar.item(), "rf": rf.item(), "repa": repa.item()}


# Uneven splits are the point: a mean per micro-batch would weigh these units differently.
# The second micro-batch has no understanding token at all.
SPLITS = [
    [(slice(0, 7), slice(0, 1)), (slice(7, 10), slice(1, 5))],
    [(slice(0, 10), slice(0, 3)), (slice(10, 10), slice(3, 5))],
]


@pytest.mark.parametrize("split", SPLITS)
def test_combine_micro_batches_with_deepspeed_scaling_equal_full_batch(split):
    torch.manual_seed(0)
    model = _TinyJanus()
    batch = _make_batch()
    ref_grads, ref_values = _full_batch_reference(model, batch)

    gas = len(split)
    counts = {"ar": 10, "rf": 5, "repa": 5}
    model.zero_grad()
    summed_logs = {k: 0.0 for k in counts}
    for tok, gen in split:
        terms = _micro_terms(model, batch, tok, gen)
        loss, logs = combine_losses(terms, WEIGHTS, counts, grad_scale=gas)
        assert not any(v.requires_grad for v in logs.values())
        (loss / gas).backward()  # what DeepSpeed's engine.backward does with gradient accumulation
        for k in counts:
            summed_logs[k] += logs[k].item()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)
    for k in counts:
        assert summed_logs[k] == pytest.approx(ref_values[k], rel=1e-5)


def test_combine_plain_accumulation_uses_grad_scale_one():
    torch.manual_seed(0)
    model = _TinyJanus()
    batch = _make_batch()
    ref_grads, _ = _full_batch_reference(model, batch)
    model.zero_grad()
    for tok, gen in SPLITS[0]:
        terms = _micro_terms(model, batch, tok, gen)
        loss, _ = combine_losses(terms, WEIGHTS, {"ar": 10, "rf": 5, "repa": 5})
        loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


def test_combine_emulated_data_parallel_average_with_grad_accumulation():
    # 2 ranks x 2 micro-batches, uneven everywhere; gradients are averaged over ranks like DeepSpeed.
    torch.manual_seed(0)
    model = _TinyJanus()
    batch = _make_batch()
    ref_grads, _ = _full_batch_reference(model, batch)
    ranks = [
        [(slice(0, 2), slice(0, 1)), (slice(2, 3), slice(1, 1))],
        [(slice(3, 9), slice(1, 4)), (slice(9, 10), slice(4, 5))],
    ]
    dp, gas = len(ranks), 2
    counts = {"ar": torch.tensor(10), "rf": torch.tensor(5.0), "repa": 5}  # tensors, as from an all-reduce
    per_rank = []
    for micro_batches in ranks:
        model.zero_grad()
        for tok, gen in micro_batches:
            terms = _micro_terms(model, batch, tok, gen)
            loss, _ = combine_losses(terms, WEIGHTS, counts, grad_scale=dp * gas)
            (loss / gas).backward()
        per_rank.append(_grads(model))
    for name in ref_grads:
        averaged = sum(g[name] for g in per_rank) / dp
        torch.testing.assert_close(averaged, ref_grads[name], msg=name)


def test_combine_formula_zero_count_and_missing_keys():
    a = torch.tensor(6.0, requires_grad=True)
    b = torch.tensor(4.0, requires_grad=True)
    terms = {"ar": LossTerm(a * 1.0, 3), "rf": LossTerm(b * 1.0, 2)}
    loss, logs = combine_losses(terms, {"ar": 2.0, "rf": 0.5}, {"ar": 12, "rf": 0}, grad_scale=3.0)
    assert loss.item() == pytest.approx(3.0 * 2.0 * 6.0 / 12)
    assert logs["ar"].item() == pytest.approx(0.5) and logs["rf"].item() == 0.0
    loss.backward()
    assert a.grad.item() == pytest.approx(3.0 * 2.0 / 12)
    assert b.grad is not None and b.grad.item() == 0.0  # connected, contributes nothing

    # Tensor global counts, including a zero one, stay exact.
    tensor_counts = {"ar": torch.tensor(12), "rf": torch.tensor(0)}
    loss_t, _ = combine_losses(terms, {"ar": 2.0, "rf": 0.5}, tensor_counts, 3.0)
    assert loss_t.item() == pytest.approx(loss.item())

    with pytest.raises(KeyError):
        combine_losses(terms, {"ar": 1.0}, {"ar": 1, "rf": 1})
    with pytest.raises(KeyError):
        combine_losses(terms, {"ar": 1.0, "rf": 1.0}, {"ar": 1})
    with pytest.raises(ValueError):
        combine_losses({}, {}, {})
