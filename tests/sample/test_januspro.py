"""The Janus-Pro sampler on a tiny random JanusProModel: the cache changes nothing, the released CFG
rows, guidance and filtering re-derived, and the CLIs (``pretrain.sample``, ``pretrain.chat``) on a
Janus-Pro checkpoint with a k-means patch codec (the VQ-16 numbers: tests/convert/test_januspro_conformance.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.sample.januspro import (
    filter_logits,
    guidance_rows,
    guided_logits,
    sample_codes,
)

PAD = 0
PROMPTS = [[1, 5, 6, 7, 8, 9, 21], [1, 10, 11, 21]]  # different lengths: packed side by side
NUM_CODES = 16  # 32 px, 8 px per code: a 4 x 4 grid


def tiny_januspro_config():
    from pretrain.model.config import ImageTokenConfig, LLMConfig, ModelConfig, UnderstandingEncoderConfig

    return ModelConfig(
        family="januspro",
        llm=LLMConfig(vocab_size=512, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                      num_query_groups=2),
        und_encoder=UnderstandingEncoderConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                               num_layers=1, num_attention_heads=2),
        image_tokens=ImageTokenConfig(codebook_size=32, embed_dim=8, downsample=8, codec="kmeans_patches"),
    )


@pytest.fixture(scope="module")
def model(runtime):
    from pretrain.model.januspro import JanusProModel

    torch.manual_seed(0)
    return JanusProModel(tiny_januspro_config()).eval()


def trace(store):
    return lambda step: store.append(step)


def test_cache_changes_neither_logits_nor_sampled_codes(model):
    runs = {}
    for use_cache in (True, False):
        steps = []
        codes = sample_codes(model, PROMPTS, NUM_CODES, cfg_weight=3.0, temperature=0.8, top_k=20, top_p=0.95,
                             pad_id=PAD, generator=torch.Generator().manual_seed(7), use_cache=use_cache,
                             on_step=trace(steps))
        runs[use_cache] = codes, steps
    (cached, cached_steps), (full, full_steps) = runs[True], runs[False]
    assert cached.shape == (2, NUM_CODES) and cached.dtype == torch.int64
    assert torch.equal(cached, full)
    for a, b in zip(cached_steps, full_steps):
        assert a.logits.shape == (4, 32)  # 2 images x (conditional, unconditional)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)  # float noise ~1e-7
    assert len(set(cached.flatten().tolist())) > 4  # real draws, not one code everywhere


def test_unconditional_rows_see_only_bos_pads_and_begin(model):
    """Two prompts of the same length: their unconditional rows are the same tokens, so the same
    logits at every step when fed the same codes; their conditional rows differ."""
    prompts = [[1, 5, 6, 7, 21], [1, 30, 31, 32, 21]]
    assert guidance_rows(prompts, PAD) == [prompts[0], [1, 0, 0, 0, 21], prompts[1], [1, 0, 0, 0, 21]]
    steps = []
    forced = torch.tensor([[3, 4, 5], [3, 4, 5]])
    sample_codes(model, prompts, 3, cfg_weight=5.0, pad_id=PAD, forced_codes=forced, on_step=trace(steps))
    for step in steps:
        torch.testing.assert_close(step.logits[1], step.logits[3], atol=1e-6, rtol=0)
        assert (step.logits[0] - step.logits[2]).abs().max() > 1e-3


def test_guidance_temperature_and_filters_re_derived():
    rows = torch.tensor([[2.0, 0.0, 1.0, -1.0], [1.0, 1.0, 0.0, 0.0]])  # conditional, unconditional
    torch.testing.assert_close(guided_logits(rows, 5.0), torch.tensor([[6.0, -4.0, 5.0, -5.0]]))
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    kept = filter_logits(logits, top_k=2)
    assert torch.isinf(kept).tolist() == [[True, False, True, False]]
    probs = torch.softmax(logits, -1)[0]  # 0.032, 0.644, 0.087, 0.237
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=float(probs[1] + 0.01))).tolist() == [[True, False, True, False]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_greedy_and_top_k_one_agree(model):
    greedy = sample_codes(model, PROMPTS, 4, temperature=0, pad_id=PAD)
    top1 = sample_codes(model, PROMPTS, 4, temperature=1.0, top_k=1, pad_id=PAD,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)


def test_one_generator_per_image_makes_images_independent_of_the_batch(model):
    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(2)]

    together = sample_codes(model, PROMPTS, 6, pad_id=PAD, generator=gens())
    alone = [sample_codes(model, [p], 6, pad_id=PAD, generator=[g]) for p, g in zip(PROMPTS, gens())]
    assert torch.equal(together, torch.cat(alone))


@pytest.fixture(scope="module")
def files(model, tokenizer_dir, tmp_path_factory):
    """Our state (config in its metadata), a k-means patch codec, an image."""
    from image_codecs.kmeans import KMeansPatchCodec
    from pretrain.convert.state import full_model_state, save_state

    root = tmp_path_factory.mktemp("januspro_cli")
    meta = {"model_config": json.dumps(dataclasses.asdict(model.cfg))}
    save_state(full_model_state(model), root / "ours" / "model.safetensors", meta)
    centroids = torch.rand(32, 8 * 8 * 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    KMeansPatchCodec(centroids, 8).save(str(root / "codec"))
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "image.png")
    return root, tokenizer_dir


def test_sample_cli(files, model, capsys):
    from safetensors.torch import load_file

    from datacontract.tokenizer import load_tokenizer, resolve_token_spec
    from image_codecs.kmeans import load_kmeans_codec
    from pretrain.sample.__main__ import main
    from pretrain.sample.januspro import codes_to_uint8, generation_prompt

    root, tok = files
    prompts = ["a red cat", "a blue cup on a table"]
    args = ["--checkpoint", str(root / "ours" / "model.safetensors"), "--tokenizer", tok, "--codec",
            str(root / "codec"), "--seed", "3", "--temperature", "0.7", "--top-k", "16", "--batch-size", "1",
            "--save-latents"] + [a for p in prompts for a in ("--prompt", p)]
    assert main(args + ["--out", str(root / "a")]) == 0
    assert "Janus-Pro" in capsys.readouterr().out
    assert main(args + ["--out", str(root / "b"), "--no-cache"]) == 0
    codes = load_file(str(root / "a" / "latents.safetensors"))["codes"]
    assert torch.equal(codes, load_file(str(root / "b" / "latents.safetensors"))["codes"])

    tokenizer = load_tokenizer(tok)
    spec = resolve_token_spec(tokenizer)
    ids = [generation_prompt(tokenizer, p, spec.bos_id, spec.begin_of_image_id) for p in prompts]
    gens = [torch.Generator().manual_seed(3 * 1_000_003 + i) for i in range(2)]
    expected = sample_codes(model, ids, NUM_CODES, 5.0, 0.7, 16, None, spec.pad_id, gens)
    assert torch.equal(codes, expected)  # the CLI's default guidance is the released 5
    images = codes_to_uint8(load_kmeans_codec(str(root / "codec")), expected, (4, 4))
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(root / "a" / f"{i:03d}.png")), images[i].numpy())


def test_sample_cli_errors(files, capsys):
    from pretrain.sample.__main__ import main

    root, tok = files
    args = ["--checkpoint", str(root / "ours"), "--tokenizer", tok, "--prompt", "x", "--out", str(root / "never")]
    assert main(args) == 1  # the model's codec is a k-means folder: the checkpoint folder is not one
    assert "fit-codec" in capsys.readouterr().err
    assert main(args + ["--codec", str(root / "codec"), "--prompt-template", "no placeholder"]) == 1
    assert "{prompt}" in capsys.readouterr().err


def test_chat_cli(files, capsys):
    from pretrain.chat import main

    root, tok = files
    base = ["--checkpoint", str(root / "ours"), "--tokenizer", tok, "--image", str(root / "image.png"),
            "--question", "What is in the picture?", "--max-new-tokens", "4"]
    answers = []
    for extra in ([], ["--no-cache"], ["--top-p", "0.9", "--seed", "1"], ["--top-p", "0.9", "--seed", "1"]):
        assert main(base + extra) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[2] == answers[3]


def test_sample_cli_refuses_a_damaged_codec(files, tmp_path, capsys):
    # Before: NaN centroids became black pixels (exit 0); a truncated codebook file a SafetensorError traceback.
    import shutil

    from image_codecs.kmeans import KMeansPatchCodec, load_kmeans_codec
    from pretrain.sample.__main__ import main

    root, tok = files
    centroids = load_kmeans_codec(str(root / "codec")).centroids.clone()
    centroids[0, 0] = float("nan")
    centroids[1:] = centroids[0]  # every code decodes to the NaN patch
    KMeansPatchCodec(centroids, 8).save(str(tmp_path / "nan_codec"))
    shutil.copytree(root / "codec", tmp_path / "cut_codec")
    weights = next((tmp_path / "cut_codec").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:50])
    args = ["--checkpoint", str(root / "ours"), "--tokenizer", tok, "--prompt", "x"]
    for codec, says in ((tmp_path / "nan_codec", "hold NaN or inf values; nothing was written for them: its weights "
                                                 "(--codec) may be damaged"),
                        (tmp_path / "cut_codec", "unreadable (truncated or damaged")):
        out = tmp_path / f"out_{codec.name}"
        assert main(args + ["--codec", str(codec), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and says in err and len([l for l in err.splitlines() if "error:" in l]) == 1
        assert not out.exists()


def test_sample_cli_refuses_non_finite_logits(files, tmp_path, capsys):
    # A finite but huge --cfg overflows the guided logits to +-inf: the probabilities become NaN. Before,
    # torch.multinomial stopped with "probability tensor contains either inf, nan or element < 0" (a
    # traceback), and greedy decoding (temperature 0) drew code 0 everywhere and wrote the images, exit 0.
    from pretrain.sample.__main__ import main

    root, tok = files
    args = ["--checkpoint", str(root / "ours"), "--tokenizer", tok, "--codec", str(root / "codec"),
            "--prompt", "a red cat", "--cfg", "1e300"]
    for extra in ([], ["--temperature", "0"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(args + extra + ["--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len([line for line in err.splitlines() if line]) == 1
        assert err.startswith("error: the probabilities of image code 0 hold NaN or inf values, so no code was drawn")
        assert not out.exists() or not any(out.iterdir())
