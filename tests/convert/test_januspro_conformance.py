"""Our converter, JanusProModel, cached sampler and VQ-16 reproduce DeepSeek's Janus-Pro modules on the
januspro_tiny fixture.

The fixture (``/work/shared/conformance/januspro_tiny``) holds the official config.json, the key list,
a rule that regenerates every weight, and inputs/outputs computed by the official modules. We rebuild
the weights, save them as an official-layout safetensors checkpoint, import it with
``python -m pretrain.convert import-release`` (our state + vq16.safetensors), load both the way the
samplers do, and compare every stored tensor at the README's tolerances (float32, CPU):
understanding, the teacher-forced CFG generation loop (through our cached sampler, and without the
cache), and the VQ tokenizer. Export then gives back the release file bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from datacontract.format import TokenKind
from tests.convert.fixture_weights import check_weight_checksums, rebuild_weights

FIXTURE = Path("/work/shared/conformance/januspro_tiny")
pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="conformance fixture not present")

# The README's tolerances (absolute, rtol 0): legitimate differences stay 5-14x below them, the
# common mistakes it lists at least 20x above.
LLM_ATOL = 1e-5  # understanding.* and generation.* float tensors except generation.decoded
VQ_ATOL = 1e-4  # vq.* float tensors and generation.decoded


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = LLM_ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def imported(runtime, tmp_path_factory):
    """(model, vq, cases, meta, paths): the rebuilt official checkpoint imported through our CLI."""
    from image_codecs.vq16 import load_vq16
    from pretrain.convert.__main__ import main as convert
    from pretrain.convert.state import load_state, save_state
    from pretrain.sample.loading import build_inference_model, resolve_model

    meta = json.loads((FIXTURE / "fixture_meta.json").read_text())
    weights = rebuild_weights(FIXTURE)
    check_weight_checksums(weights, meta)
    assert sum(v.numel() for v in weights.values()) == meta["parameter_count"]

    root = tmp_path_factory.mktemp("januspro")
    release = root / "release"
    save_state(weights, release / "model.safetensors")
    shutil.copy(FIXTURE / "config.json", release / "config.json")
    (root / "siglip.json").write_text(json.dumps(meta["siglip_registry_entry"]))
    ours = root / "ours" / "model.safetensors"
    assert convert(["import-release", "--checkpoint", str(release), "--siglip", str(root / "siglip.json"),
                    "--out", str(ours)]) == 0

    cfg, state = resolve_model(ours)  # the config travels in the file's metadata
    assert cfg.family == "januspro" and cfg.image_tokens.codebook_size == 64
    assert (cfg.und_encoder.num_layers, cfg.und_encoder.image_size, cfg.und_encoder.intermediate_size) == (1, 32, 256)
    model = build_inference_model(cfg, state)
    vq = load_vq16(ours.parent / "vq16.safetensors")
    cases = load_state(FIXTURE / "cases.safetensors")
    return model, vq, cases, meta, {"root": root, "release": release, "ours": ours}


@torch.no_grad()
def test_understanding(imported):
    from pretrain.model.januspro import JanusProInputs

    model, _, cases, meta, _ = imported
    ids = cases["understanding.input_ids"][0]
    kind = torch.full_like(ids, int(TokenKind.TEXT))
    kind[ids == meta["token_ids"]["image_placeholder"]] = int(TokenKind.UND_IMAGE)
    # only the placeholders take image features: begin/end-of-image keep their token embeddings
    assert torch.equal(kind == TokenKind.UND_IMAGE, cases["understanding.images_seq_mask"][0])
    assert bool(cases["understanding.attention_mask"].all())
    pixels = cases["understanding.pixel_values"][0]
    features = model.und_encoder(pixels)
    close(features, cases["understanding.siglip_features"][0:1])
    close(model.und_aligner(features), cases["understanding.aligned_image_features"][0:1])
    inputs = JanusProInputs(input_ids=ids, position_ids=torch.arange(len(ids)),
                            cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32), token_kind=kind,
                            und_pixels=pixels)
    close(model.embed_inputs(inputs), cases["understanding.inputs_embeds"][0])
    _, outputs = model(inputs)
    close(model.llm.compute_logits(outputs.final_hidden), cases["understanding.logits"][0])


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_teacher_forced_cfg_generation(imported, use_cache):
    """The released generate() loop (parallel_size 2, cfg 5, temperature 0.5) with the fixture's codes
    fed back: every step's hidden states, head logits, guided logits and probabilities."""
    from pretrain.sample.januspro import guidance_rows, sample_codes

    model, _, cases, meta, _ = imported
    call, ids = meta["generate_call"], meta["token_ids"]
    image_ids = cases["generation.image_ids"]
    prompt = cases["generation.tokens"][0].tolist()
    assert prompt[0] == ids["bos"] and prompt[-1] == ids["begin_of_image"]
    rows = guidance_rows([prompt] * call["parallel_size"], ids["pad"])
    assert torch.equal(torch.tensor(rows), cases["generation.tokens"])  # interleaved, BOS and begin kept
    close(model.llm.embed_tokens(torch.tensor(rows).flatten()).reshape(4, 7, -1), cases["generation.prompt_embeds"])

    steps = []
    codes = sample_codes(model, [prompt] * call["parallel_size"], call["image_token_num_per_image"],
                         cfg_weight=call["cfg_weight"], temperature=call["temperature"], pad_id=ids["pad"],
                         use_cache=use_cache, forced_codes=image_ids, on_step=steps.append)
    assert torch.equal(codes, image_ids)
    close(torch.stack([s.hidden for s in steps], 1), cases["generation.hidden"])
    close(torch.stack([s.logits for s in steps], 1), cases["generation.logits"])
    close(torch.stack([s.guided for s in steps], 1), cases["generation.cfg_logits"])
    close(torch.stack([s.probs for s in steps], 1), cases["generation.probs"])
    close(model.embed_codes(image_ids), cases["generation.img_embeds"])


@torch.no_grad()
def test_generated_codes_decode_to_the_released_pixels(imported):
    from pretrain.sample.januspro import codes_to_uint8

    _, vq, cases, _, _ = imported
    grid = (2, 2)  # img_size 32 / patch 16
    close(vq.decode(cases["generation.image_ids"], grid), cases["generation.decoded"], VQ_ATOL)
    image = codes_to_uint8(vq, cases["generation.image_ids"], grid)
    assert image.dtype == torch.uint8 and image.shape == (2, 32, 32, 3)
    # truncating cast: a pixel near an integer may land on either side (1 off at most)
    assert (image.int() - cases["generation.image_uint8"].int()).abs().max() <= 1


@torch.no_grad()
def test_vq_encode_and_decode(imported):
    _, vq, cases, _, _ = imported
    h = vq.encode_latent(cases["vq.image"])
    close(h, cases["vq.h"], VQ_ATOL)
    codes = vq.encode(cases["vq.image"])
    assert codes.dtype == torch.int64 and torch.equal(codes, cases["vq.codes"])
    close(vq.quantize.entries(codes, (2, 2)), cases["vq.quant"], VQ_ATOL)
    close(vq.quantize.entries(cases["vq.codes"], (2, 2)), cases["vq.codebook_entries"], VQ_ATOL)
    close(vq.decode(cases["vq.codes"], (2, 2)), cases["vq.reconstruction"], VQ_ATOL)
    close(vq.decode(cases["vq.wide_codes"], (2, 4)), cases["vq.wide_decoded"], VQ_ATOL)  # h=2, w=4


def test_samplers_read_the_release_folder_as_the_import(imported):
    from pretrain.sample.loading import resolve_model

    _, _, _, meta, paths = imported
    cfg, state = resolve_model(paths["ours"])
    cfg_release, state_release = resolve_model(paths["release"], siglip=meta["siglip_registry_entry"])
    assert cfg_release == cfg and sorted(state_release) == sorted(state)
    for key, value in state.items():
        assert torch.equal(state_release[key], value), key


def test_export_gives_the_release_back_bit_for_bit(imported):
    from pretrain.convert.__main__ import main as convert
    from pretrain.convert.state import load_state

    _, _, _, _, paths = imported
    out = paths["root"] / "exported"
    assert convert(["export-release", "--state", str(paths["ours"]), "--config", str(paths["release"]),
                    "--siglip", str(paths["root"] / "siglip.json"), "--extras", str(paths["release"]),
                    "--out", str(out)]) == 0
    original, exported = load_state(paths["release"]), load_state(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    assert json.loads((out / "config.json").read_text()) == json.loads((FIXTURE / "config.json").read_text())


def test_outputs_that_would_replace_an_input_or_each_other_are_refused(imported, capsys):
    # Before: --out .../vq16.safetensors was replaced by the VQ right after the model was written there,
    # and export-release into the state's own folder replaced the state (its REPA projector lost).
    from pretrain.convert.__main__ import main as convert
    from pretrain.convert.state import load_state

    _, _, _, _, paths = imported
    root, release = paths["root"], paths["release"]
    clash = root / "clash" / "vq16.safetensors"
    assert convert(["import-release", "--checkpoint", str(release), "--siglip", str(root / "siglip.json"),
                    "--out", str(clash)]) == 1
    assert capsys.readouterr().err.startswith(f"error: --out {clash}: also where the VQ-16 tokenizer goes")
    assert not clash.exists()
    before = load_state(paths["ours"])
    assert convert(["export-release", "--state", str(paths["ours"]), "--config", str(release),
                    "--siglip", str(root / "siglip.json"), "--out", str(paths["ours"].parent)]) == 1
    assert capsys.readouterr().err == (f"error: --out {paths['ours'].parent}: its model.safetensors would replace "
                                       f"--state {paths['ours']}, which it is made from; write the release to "
                                       "another folder\n")
    after = load_state(paths["ours"])
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
