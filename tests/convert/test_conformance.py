"""Our importer + model reproduce the official JanusFlow forward pass on the janusflow_tiny fixture.

The fixture (``/work/shared/conformance/janusflow_tiny``) holds the official config.json, the key
list, a rule that regenerates every weight, and inputs/outputs computed by DeepSeek's modules. We
rebuild the weights, save them as an official-layout safetensors checkpoint, import that file through
our converter, and compare velocity, a 3-step CFG Euler loop and understanding logits (fp32, CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.convert.release import NOT_RELEASED, config_from_release, release_to_ours
from pretrain.convert.state import load_model_state, load_state, save_state
from datacontract.format import TokenKind
from tests.convert.fixture_weights import check_weight_checksums, rebuild_weights
from pretrain.model.janusflow import JanusFlowModel, ModelInputs

FIXTURE = Path("/work/shared/conformance/janusflow_tiny")
pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="conformance fixture not present")


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def fixture_model(runtime, tmp_path_factory):
    """(model, cases): the official-layout checkpoint imported through our converter, fp32, eval."""
    meta = json.loads((FIXTURE / "fixture_meta.json").read_text())
    weights = rebuild_weights(FIXTURE)
    check_weight_checksums(weights, meta)

    checkpoint = save_state(weights, tmp_path_factory.mktemp("release") / "model.safetensors")
    release = load_state(checkpoint)
    config = json.loads((FIXTURE / "config.json").read_text())
    shapes = {k: tuple(v.shape) for k, v in release.items()}
    cfg = config_from_release(config, meta["siglip_registry_entry"], latent_size=8, state_shapes=shapes)
    assert not cfg.repa.enabled
    siglip = cfg.und_encoder
    assert (siglip.num_layers, siglip.image_size, siglip.intermediate_size) == (1, 32, 1024)

    torch.manual_seed(0)
    model = JanusFlowModel(cfg).eval()
    fresh = load_model_state(model, release_to_ours(release, cfg), keep_fresh=NOT_RELEASED)
    assert fresh == []  # REPA is disabled: nothing is left uninitialised
    cases = load_state(FIXTURE / "cases.safetensors")
    return model, cases, meta["token_ids"]


def generation_inputs(prompts: torch.Tensor, z: torch.Tensor, t: torch.Tensor, hidden_keys=None):
    """One packed document per row: [prompt, GEN_TIME, latent tokens], positions from 0 in each."""
    rows, prompt_len = prompts.shape
    n_latent = (z.shape[-1] // 2) ** 2
    length = prompt_len + 1 + n_latent
    kind = [TokenKind.TEXT] * prompt_len + [TokenKind.GEN_TIME] + [TokenKind.GEN_LATENT] * n_latent
    ids = torch.cat([prompts, torch.zeros(rows, 1 + n_latent, dtype=torch.long)], dim=1)
    return ModelInputs(
        input_ids=ids.flatten(),
        position_ids=torch.arange(length).repeat(rows),
        cu_seqlens=torch.arange(rows + 1, dtype=torch.int32) * length,
        token_kind=torch.tensor(kind).repeat(rows),
        hidden_keys=hidden_keys,
        gen_z_t=z,
        gen_t=t,
    )


def capture_decoder_input(model):
    store = {}
    def hook(_module, args):
        store["dec_in"] = args[0]

    handle = model.gen_decoder.register_forward_pre_hook(hook)
    return store, handle


@torch.no_grad()
def test_velocity(fixture_model):
    model, cases, _ = fixture_model
    z, t = cases["velocity.z"], cases["velocity.t"]
    inputs = generation_inputs(cases["velocity.prompt_ids"], z, t)

    embeds, skip, t_emb = model._embed_inputs(inputs)
    close(t_emb, cases["velocity.t_emb"])
    close(skip, cases["velocity.enc_out"])
    close(embeds.reshape(2, 23, -1), cases["velocity.llm_inputs_embeds"])

    store, handle = capture_decoder_input(model)
    try:
        _, outputs = model(inputs)
    finally:
        handle.remove()
    close(store["dec_in"], cases["velocity.dec_in"])
    close(outputs.velocity, cases["velocity.v"])


@torch.no_grad()
def test_cfg_sampler(fixture_model):
    model, cases, _ = fixture_model
    tokens = cases["sampler.tokens"][:, :-1]  # the last prompt position gives way to the time token
    mask = cases["sampler.attention_mask"]
    steps, weight = 3, 2.0
    length = mask.shape[1]
    # The unconditional row hides its prompt after BOS, positions unchanged (as the released mask).
    hidden_keys = (mask == 0).flatten()
    assert hidden_keys.nonzero().flatten().tolist() == [length + 1, length + 2, length + 3, length + 4]

    z = cases["sampler.z0"]
    close(z, cases["sampler.z_per_step"][0])
    for k in range(steps):
        t = torch.full((2,), k / steps, dtype=torch.float32)
        close(t * 1000, cases["sampler.t_model_per_step"][k].expand(2))
        _, outputs = model(generation_inputs(tokens, torch.cat([z, z]), t, hidden_keys))
        v_cond, v_uncond = outputs.velocity.chunk(2)
        close(outputs.velocity, cases["sampler.v_cond_uncond_per_step"][k])
        z = z + (weight * v_cond - (weight - 1) * v_uncond) / steps
        close(z, cases["sampler.z_per_step"][k + 1])
    close(z, cases["sampler.z_final"])


@torch.no_grad()
def test_understanding(fixture_model):
    model, cases, token_ids = fixture_model
    ids = cases["understanding.input_ids"][0]
    kind = torch.full_like(ids, TokenKind.TEXT)
    kind[ids == token_ids["begin_of_image"]] = TokenKind.UND_IMAGE_BEGIN
    kind[ids == token_ids["image_placeholder"]] = TokenKind.UND_IMAGE
    assert kind.tolist()[3:8] == [TokenKind.UND_IMAGE_BEGIN] + [TokenKind.UND_IMAGE] * 4
    pixels = cases["understanding.pixel_values"][0]
    inputs = ModelInputs(
        input_ids=ids,
        position_ids=torch.arange(len(ids)),
        cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32),
        token_kind=kind,
        und_pixels=pixels,
    )
    close(model.und_aligner(model.und_encoder(pixels)), cases["understanding.aligned_image_features"][0:1])
    embeds, _, _ = model._embed_inputs(inputs)
    close(embeds, cases["understanding.inputs_embeds"][0])
    _, outputs = model(inputs)
    close(model.llm.compute_logits(outputs.final_hidden), cases["understanding.logits"][0])
