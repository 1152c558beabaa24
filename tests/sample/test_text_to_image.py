"""The text-to-image sampler: cache = no cache, guidance, the Euler loop, the conformance fixture."""

import json
import math

import numpy as np
import pytest
import torch

from datacontract.format import TokenKind
from pretrain.sample.text_to_image import (
    build_generation_layout,
    euler_integrate,
    generation_prompt_ids,
    guided_velocity,
    sample_latents,
)

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11]]  # different lengths: padded together in the cached step


def record_velocities(store):
    return lambda t, v: store.append((t, v.clone()))


def test_cache_equals_recompute_with_guidance(tiny_model):
    """cond + uncond rows (uncond prompts hidden after BOS): every step's pre-guidance velocities and
    the final latents agree with and without the prompt cache."""
    runs = {}
    for use_cache in (True, False):
        trace = []
        z = sample_latents(tiny_model, PROMPTS, steps=3, cfg_weight=2.0, generator=torch.Generator().manual_seed(0),
                           use_cache=use_cache, on_velocity=record_velocities(trace))
        runs[use_cache] = (trace, z)
    (cached, z_cached), (full, z_full) = runs[True], runs[False]
    assert [t for t, _ in cached] == [0.0, 1 / 3, 2 / 3]
    for (_, a), (_, b) in zip(cached, full):
        assert a.shape == (4, 4, 8, 8)  # 2 conditional rows, then 2 unconditional rows
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(z_cached, z_full, atol=1e-5, rtol=0)
    # the unconditional rows really differ from the conditional ones (the hidden keys act)
    v = cached[0][1]
    assert (v[:2] - v[2:]).abs().max() > 1e-3


def test_unconditional_rows_ignore_the_prompt(tiny_model):
    """Two prompts of the same length: their unconditional velocities are equal (only BOS and the
    positions are seen), their conditional ones are not."""
    trace = []
    sample_latents(tiny_model, [[1, 5, 6, 7], [1, 20, 21, 22]], steps=1, cfg_weight=3.0,
                   z0=torch.zeros(1, 4, 8, 8).expand(2, -1, -1, -1), on_velocity=record_velocities(trace))
    v = trace[0][1]
    torch.testing.assert_close(v[2], v[3], atol=1e-6, rtol=0)
    assert (v[0] - v[1]).abs().max() > 1e-4


def test_weight_one_is_the_conditional_branch(tiny_model):
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = sample_latents(tiny_model, PROMPTS, steps=2, cfg_weight=1.0, z0=z0)
    layout = build_generation_layout(PROMPTS, 16, with_uncond=False)

    def conditional(z, t):
        _, out = tiny_model(layout.full_inputs(z, torch.full((2,), t)))
        return out.velocity

    with torch.no_grad():
        torch.testing.assert_close(got, euler_integrate(conditional, z0, 2), atol=1e-5, rtol=0)
    v_cond, v_uncond = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(guided_velocity(v_cond, v_uncond, 1.0), v_cond)


def test_seeded_and_independent_of_the_batch(tiny_model):
    a = sample_latents(tiny_model, PROMPTS, steps=2, generator=torch.Generator().manual_seed(7))
    b = sample_latents(tiny_model, PROMPTS, steps=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    alone = sample_latents(tiny_model, PROMPTS[1:], steps=2, z0=z0[1:])
    torch.testing.assert_close(alone, a[1:], atol=1e-5, rtol=0)


def test_layout_positions_and_hidden_prompt():
    layout = build_generation_layout([[1, 5, 6]], num_latent_tokens=2, with_uncond=True)
    kinds = [TokenKind.TEXT] * 3 + [TokenKind.GEN_TIME] + [TokenKind.GEN_LATENT] * 2
    assert layout.token_kind.tolist() == kinds * 2
    assert layout.position_ids.tolist() == list(range(6)) * 2
    assert layout.hidden_keys.nonzero().flatten().tolist() == [7, 8]  # uncond row: prompt after BOS
    step = layout.step_inputs(torch.zeros(2, 4, 4, 4), torch.zeros(2))
    assert step.position_ids.tolist() == [3, 4, 5] * 2 and step.cu_seqlens.tolist() == [0, 3, 6]


def test_euler_reaches_a_gaussian_target():
    """The exact rectified-flow velocity from N(0,1) to N(mu, sigma^2), integrated by the loop:
    z_t = t x + (1-t) z0 ~ N(t mu, t^2 sigma^2 + (1-t)^2) and E[x - z0 | z_t] is linear in z_t."""
    mu, sigma = 2.0, 0.5

    def velocity(z, t):
        var = t**2 * sigma**2 + (1 - t) ** 2
        return mu + (t * sigma**2 - (1 - t)) / var * (z - t * mu)

    z0 = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    x = euler_integrate(velocity, z0, steps=200)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(sigma, abs=0.02)
    # too few steps land elsewhere (the test can fail)
    assert abs(euler_integrate(velocity, z0, steps=1).std().item() - sigma) > 0.2


def test_prompt_ids_match_the_training_documents(tokenizer_dir):
    """The prefix before the time token of a generation document built by data_tools."""
    from PIL import Image

    from data_tools.documents import DocumentBuilder, LayoutOptions
    from datacontract.images import encode_image
    from data_tools.sources import RawRecord
    from datacontract.tokenizer import load_tokenizer, resolve_token_spec
    from datacontract.format import Task

    tokenizer = load_tokenizer(tokenizer_dir)
    spec = resolve_token_spec(tokenizer)
    image = encode_image(Image.fromarray(np.full((32, 32, 3), 90, np.uint8)), "png")
    layout = LayoutOptions(seq_length=256, resolution=32)
    caption = "a red cat sitting on a wooden table"
    doc = DocumentBuilder(tokenizer, spec, layout).build(RawRecord("s", "k", Task.GENERATION, [image], caption))
    time_pos = int(np.flatnonzero(doc.token_kind == TokenKind.GEN_TIME)[0])
    assert generation_prompt_ids(tokenizer, caption, spec.bos_id) == doc.input_ids[:time_pos].tolist()


# --------------------------------------------------------------------------------------------
# the conformance fixture's 3-step CFG loop, through our sampler with the cache
@pytest.fixture(scope="module")
def fixture_model(runtime):
    from tests.convert.fixture_weights import rebuild_weights
    from tests.convert.test_conformance import FIXTURE

    if not FIXTURE.exists():
        pytest.skip("conformance fixture not present")
    from pretrain.convert.release import config_from_release, release_to_ours
    from pretrain.convert.state import load_model_state, load_state
    from pretrain.model.janusflow import JanusFlowModel

    meta = json.loads((FIXTURE / "fixture_meta.json").read_text())
    weights = rebuild_weights(FIXTURE)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    config = json.loads((FIXTURE / "config.json").read_text())
    cfg = config_from_release(config, meta["siglip_registry_entry"], latent_size=8, state_shapes=shapes)
    model = JanusFlowModel(cfg).eval()
    assert load_model_state(model, release_to_ours(weights, cfg)) == []
    return model, load_state(FIXTURE / "cases.safetensors")


def test_conformance_cfg_loop_with_cache(fixture_model):
    model, cases = fixture_model
    prompt = cases["sampler.prompt_ids"][0, :-1].tolist()  # the last position gives way to the time token
    trace = []
    z = sample_latents(model, [prompt], steps=3, cfg_weight=2.0, z0=cases["sampler.z0"],
                       on_velocity=record_velocities(trace))
    for k, (_, v) in enumerate(trace):
        torch.testing.assert_close(v, cases["sampler.v_cond_uncond_per_step"][k], atol=1e-4, rtol=0)
    torch.testing.assert_close(z, cases["sampler.z_final"], atol=1e-4, rtol=0)


def test_time_grid_uniform_and_at_the_training_quantiles():
    from statistics import NormalDist

    from pretrain.sample.text_to_image import time_grid

    assert time_grid(4) == [(0.0, 0.25), (0.25, 0.25), (0.5, 0.25), (0.75, 0.25)]
    grid = time_grid(30, "logit_normal")
    ends = [t + dt for t, dt in grid]
    assert grid[0][0] == 0.0 and ends[-1] == pytest.approx(1.0, abs=1e-12)
    assert all(abs(a - b) < 1e-12 for a, b in zip(ends[:-1], [t for t, _ in grid[1:]]))
    # each step covers 1/30 of the logit-normal(0, 1) training times: logit(t_k) = Phi^-1(k/30)
    for k, (t, _) in enumerate(grid[1:], 1):
        assert math.log(t / (1 - t)) == pytest.approx(NormalDist().inv_cdf(k / 30), abs=1e-9)
    assert grid[-1][0] == pytest.approx(0.86, abs=0.01)
    with pytest.raises(ValueError):
        time_grid(3, "cosine")


def test_logit_normal_steps_split_the_training_times_evenly_at_any_mean():
    # The schedule of a run trained with loss.rf_time_mean = -1.5: each of the 10 steps holds a tenth
    # of the times the trainer's sampler draws with those settings (binomial sd 0.003 at 10^4 draws).
    from pretrain.losses import sample_logit_normal_t
    from pretrain.sample.text_to_image import time_grid

    drawn = sample_logit_normal_t(10_000, generator=torch.Generator().manual_seed(0), mean=-1.5, std=0.8).double()
    grid = time_grid(10, "logit_normal", time_mean=-1.5, time_std=0.8)
    for t, dt in grid:
        share = ((drawn >= t) & (drawn < t + dt)).double().mean().item()
        assert abs(share - 0.1) < 0.012, (t, share)
    assert grid[1][0] < time_grid(10, "logit_normal")[1][0] / 2  # first step ends at 0.074 instead of 0.217
