"""VQ-16 loading and the codec interface (numbers against DeepSeek's modules: tests/convert/test_januspro_conformance.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from image_codecs import load_image_codec
from image_codecs.vq16 import CODEBOOK_USED_SIZE, RELEASE_PREFIX, VQ16, load_vq16, vq16_shapes

KEYS = Path("/work/shared/conformance/januspro_tiny/keys.json")


@pytest.fixture(scope="module")
def vq_state():
    """Random VQ-16 weights with a 64-code codebook (the architecture is fixed: 71.8M numbers)."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in VQ16(codebook_size=64).state_dict().items()}


@pytest.fixture(scope="module")
def files(vq_state, tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    save_file(vq_state, str(root / "bare.safetensors"))
    released = {RELEASE_PREFIX + k: v for k, v in vq_state.items()}
    released["language_model.lm_head.weight"] = torch.zeros(4, 4)  # the rest of a Janus-Pro checkpoint
    save_file(released, str(root / "release.safetensors"))
    return root


@pytest.mark.skipif(not KEYS.exists(), reason="conformance fixture not present")
def test_parameter_names_are_the_released_ones():
    released = {k[len(RELEASE_PREFIX):]: tuple(s) for k, s in json.loads(KEYS.read_text())
                if k.startswith(RELEASE_PREFIX)}
    assert vq16_shapes(64) == released
    assert sum(torch.Size(s).numel() for s in released.values()) == 71_818_379  # fixture_meta parameter_count_vq


def test_full_checkpoint_and_bare_keys_load_the_same(files, vq_state):
    bare, full = load_vq16(files / "bare.safetensors"), load_image_codec("vq16", str(files / "release.safetensors"))
    assert bare.codebook_size == 64 and bare.downsample == 16
    assert bare.describe() == full.describe()
    assert bare.describe()["fingerprint"]
    assert torch.equal(full.quantize.codebook_used, vq_state["quantize.codebook_used"])
    assert full.quantize.codebook_used.shape == (CODEBOOK_USED_SIZE,)
    for key, value in full.state_dict().items():
        assert torch.equal(value, vq_state[key]), key


def test_encode_decode_shapes_and_row_major_codes(files):
    vq = load_vq16(files / "bare.safetensors")
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = vq.encode(pixels)
    assert codes.dtype == torch.int64 and codes.shape == (2, 6)  # a 2 x 3 grid, row-major
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert vq.decode(codes, (2, 3)).shape == (2, 3, 32, 48)
    # each code is the nearest normalised codebook row of its 8-d latent
    h = vq.encode_latent(pixels)
    z = torch.nn.functional.normalize(h[0, :, 1, 2], dim=0)
    assert int(codes[0, 5]) == int((vq.quantize.normalised_codebook() @ z).argmax())
    with pytest.raises(ValueError, match="fill a 3x3 grid"):
        vq.decode(codes, (3, 3))
    with pytest.raises(ValueError, match="multiples of 16"):
        vq.encode(torch.zeros(1, 3, 20, 16))


def test_bf16_decodes_close_to_fp32(files):
    codes = torch.tensor([[3, 17, 40, 63]])
    fp32 = load_vq16(files / "bare.safetensors").decode(codes, (2, 2))
    bf16 = load_vq16(files / "bare.safetensors", dtype=torch.bfloat16).decode(codes, (2, 2))
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa through ~60 layers: measured 0.077 here (pixels up to 1.44)
    torch.testing.assert_close(bf16, fp32, atol=0.2, rtol=0)


def test_bad_files_get_one_clear_line(files, vq_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such VQ-16 weights file"):
        load_vq16(tmp_path / "absent.safetensors")
    pickled = tmp_path / "vq.pt"
    pickled.write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        load_vq16(pickled)
    save_file({"language_model.lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "janusflow.safetensors"))
    with pytest.raises(ValueError, match="no VQ-16 weights"):
        load_vq16(tmp_path / "janusflow.safetensors")
    broken = dict(vq_state)
    del broken["decoder.conv_out.bias"]
    broken["encoder.extra"] = torch.zeros(1)
    broken["quant_conv.weight"] = torch.zeros(8, 128, 1, 1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="3 problems") as err:
        load_vq16(tmp_path / "broken.safetensors")
    message = str(err.value)
    assert "missing decoder.conv_out.bias" in message and "unexpected encoder.extra" in message
    assert "wrong shape quant_conv.weight" in message


def test_damaged_or_unusable_weights_are_refused_naming_file_and_key(files, vq_state, tmp_path):
    """Files safetensors cannot parse, integer tensors, NaN/inf, an empty codebook and two copies of
    the weights in one folder: one ValueError each (the build reports those as one line), never a
    SafetensorError / RuntimeError from deep inside, never a codec that quietly gives wrong codes."""
    good = (files / "bare.safetensors").read_bytes()
    for name, data in [("zero", b""), ("truncated", good[: len(good) // 2]), ("random", bytes(range(256)) * 8)]:
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match=fr"{name}.safetensors: unreadable \(truncated or damaged"):
            load_vq16(tmp_path / f"{name}.safetensors")

    def refused(changes: dict, match: str) -> None:
        save_file({**vq_state, **changes}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=match):
            load_vq16(tmp_path / "bad.safetensors")

    conv = vq_state["encoder.conv_in.weight"]
    refused({"encoder.conv_in.weight": conv.to(torch.int64)}, "encoder.conv_in.weight is torch.int64")
    refused({"encoder.conv_in.weight": torch.full_like(conv, float("nan"))}, "encoder.conv_in.weight holds NaN")
    codebook = vq_state["quantize.embedding.weight"].clone()
    codebook[3, 0] = float("inf")
    refused({"quantize.embedding.weight": codebook}, "quantize.embedding.weight holds NaN or inf")
    refused({"quantize.embedding.weight": torch.zeros(0, 8)}, r"has shape \[0, 8\], expected \[K, 8\], K >= 1")
    # half precision is a legitimate export: cast, like the bf16 path
    save_file({k: v.half() for k, v in vq_state.items()}, str(tmp_path / "fp16.safetensors"))
    assert load_vq16(tmp_path / "fp16.safetensors").codebook_size == 64

    both = tmp_path / "both"
    both.mkdir()
    save_file(vq_state, str(both / "a.safetensors"))
    save_file({**vq_state, "quantize.embedding.weight": torch.randn(64, 8)}, str(both / "b.safetensors"))
    with pytest.raises(ValueError, match="also in another file"):
        load_vq16(both)
