"""The LlamaGen VQ-16 image tokenizer of Janus-Pro (frozen): 16x16-pixel patches <-> one of K codes.

Architecture (fixed by the released code, whatever config.json says; only the codebook size K varies,
read from ``quantize.embedding.weight``): channels 128 x (1, 1, 2, 2, 4), latent 256 channels,
8-d codes, GroupNorm(32 groups, eps 1e-6) and swish everywhere.

- encoder: ``conv_in`` 3 -> 128; ``conv_blocks.0..4`` (highest resolution first), each 2 ResNet blocks
  (a 1x1 ``nin_shortcut`` when the width changes), 2 attention blocks after each ResNet block of the
  last level, a stride-2 ``downsample`` after levels 0-3 (padded on the right and bottom only);
  ``mid`` = [ResNet, attention, ResNet]; ``norm_out``, swish, ``conv_out`` 512 -> 256.
- ``quant_conv`` 256 -> 8 (1x1); codes: both the 8-d vector and every codebook row are
  l2-normalised, the nearest row wins (|z|^2 + |e|^2 - 2 z.e); codes are row-major per image.
- ``post_quant_conv`` 8 -> 256 (1x1) on the normalised codebook rows; decoder: ``conv_in`` 256 -> 512,
  ``mid``, ``conv_blocks.0..4`` (LOWEST resolution first: 512 channels with 3 attention blocks), 3
  ResNet blocks each, nearest x2 upsampling + 3x3 conv after blocks 0-3, ``norm_out``, swish,
  ``conv_out`` 128 -> 3.
- attention: one head over the h*w positions, 1x1 q/k/v/proj_out, scale channels^-0.5, residual.
- ``quantize.codebook_used`` ([65536], a training statistic) is kept so that the official code can
  load what we write strictly; inference never reads it.

Pixels are float [N, 3, H, W] in [-1, 1] (H, W multiples of 16). Parameter names are the released
``gen_vision_model.*`` names without that prefix, so released weights load directly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_PREFIX = "gen_vision_model."
CHANNELS = 128
CHANNEL_MULT = (1, 1, 2, 2, 4)
Z_CHANNELS = 256
EMBED_DIM = 8
DOWNSAMPLE = 2 ** (len(CHANNEL_MULT) - 1)  # 16 pixels per code along each side
CODEBOOK_USED_SIZE = 65536
_CODEBOOK_KEY = "quantize.embedding.weight"


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: Optional[int] = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2 if padding is None else padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv(cin, cout)
        self.norm2, self.conv2 = _norm(cout), _conv(cout, cout)
        self.nin_shortcut = _conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (_conv(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # [b, c, h, w] -> [b, 1 head, h*w positions, c]; sdpa scales by c^-0.5 as the release
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right and bottom only: not symmetric


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResNet blocks, each followed by an attention block when ``attention``, then
    an optional resampling (``downsample`` in the encoder, ``upsample`` in the decoder)."""

    def __init__(self, cin: int, cout: int, blocks: int, attention: bool, resample: Optional[str]) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(blocks if attention else 0))
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


def _mid(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = [CHANNELS * m for m in CHANNEL_MULT]
        last = len(widths) - 1
        self.conv_in = _conv(3, CHANNELS)
        self.conv_blocks = nn.ModuleList(
            Level(widths[i - 1] if i else CHANNELS, widths[i], 2, i == last, None if i == last else "down")
            for i in range(len(widths))
        )
        self.mid = _mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv(widths[-1], Z_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = [CHANNELS * m for m in reversed(CHANNEL_MULT)]  # lowest resolution first
        last = len(widths) - 1
        self.conv_in = _conv(Z_CHANNELS, widths[0])
        self.mid = _mid(widths[0])
        self.conv_blocks = nn.ModuleList(
            Level(widths[i - 1] if i else widths[0], widths[i], 3, i == 0, None if i == last else "up")
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv(widths[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.mid:
            x = block(x)
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, EMBED_DIM)
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_SIZE))

    def normalised_codebook(self) -> torch.Tensor:
        """[K, 8] float32, each row of unit length (the rows the codes stand for)."""
        return F.normalize(self.embedding.weight.float(), p=2, dim=-1)

    def nearest(self, h: torch.Tensor) -> torch.Tensor:
        """[N, 8, h, w] latents -> int64 codes [N, h*w] (row-major), in float32 whatever the dtype."""
        z = F.normalize(h.float().permute(0, 2, 3, 1).reshape(-1, EMBED_DIM), p=2, dim=-1)
        e = self.normalised_codebook()
        distance = (z * z).sum(1, keepdim=True) + (e * e).sum(1)[None, :] - 2.0 * z @ e.t()
        return distance.argmin(dim=1).reshape(h.shape[0], -1)

    def entries(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """int codes [N, h*w] (row-major) -> the normalised rows [N, 8, h, w], float32."""
        hh, ww = grid
        if codes.shape[-1] != hh * ww:
            raise ValueError(f"{codes.shape[-1]} codes per image do not fill a {hh}x{ww} grid")
        rows = self.normalised_codebook()[codes.long().reshape(codes.shape[0], -1)]
        return rows.reshape(codes.shape[0], hh, ww, EMBED_DIM).permute(0, 3, 1, 2)


class VQ16(nn.Module):
    """The VQ-16 tokenizer, an ``image_codecs.ImageCodec``. Build it with ``load_vq16``."""

    downsample = DOWNSAMPLE

    def __init__(self, codebook_size: int = 16384) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.quantize = VectorQuantizer(codebook_size)
        self.quant_conv = _conv(Z_CHANNELS, EMBED_DIM, 1)
        self.post_quant_conv = _conv(EMBED_DIM, Z_CHANNELS, 1)
        self.fingerprint = ""

    @property
    def codebook_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    @property
    def _dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.quant_conv.weight.device

    # the pieces (each a step of the released encode / decode_code)
    @torch.no_grad()
    def encode_latent(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> h [N, 8, H/16, W/16] (before any normalisation), float32."""
        _check_pixels(pixels)
        x = pixels.to(self._device, self._dtype)
        return self.quant_conv(self.encoder(x)).float()

    @torch.no_grad()
    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        """Normalised codebook rows [N, 8, h, w] -> pixels [N, 3, 16h, 16w] in about [-1, 1], float32."""
        x = quant.to(self._device, self._dtype)
        return self.decoder(self.post_quant_conv(x)).float()

    # ImageCodec
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize.nearest(self.encode_latent(pixels))

    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must be in [0, {self.codebook_size}); got {int(codes.min())}..{int(codes.max())}")
        return self.decode_latent(self.quantize.entries(codes.to(self._device), grid))

    def describe(self) -> dict:
        return {"kind": "vq16", "codebook_size": self.codebook_size, "downsample": self.downsample,
                "embed_dim": EMBED_DIM, "fingerprint": self.fingerprint}


def _check_pixels(pixels: torch.Tensor) -> None:
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [N, 3, H, W]; got {list(pixels.shape)}")
    if pixels.shape[2] % DOWNSAMPLE or pixels.shape[3] % DOWNSAMPLE:
        raise ValueError(f"image sides must be multiples of {DOWNSAMPLE}; got {pixels.shape[2]}x{pixels.shape[3]}")


# ---------------------------------------------------------------------------------------------
# weights
def vq16_shapes(codebook_size: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the VQ-16 state (without the release prefix); nothing is allocated."""
    with torch.device("meta"):
        model = VQ16(codebook_size)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors file in this folder (VQ-16 weights are read "
                                    "from safetensors only; convert pickled checkpoints first)")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VQ-16 weights file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: VQ-16 weights are read from .safetensors only (a pickled file can run code)")
    return [path]


def read_vq16_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The VQ-16 tensors (names without the release prefix) of a local safetensors file or folder:
    a whole released Janus-Pro checkpoint (``gen_vision_model.*``) or bare VQ keys."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), "pt") as f:
                keys = list(f.keys())
                released = [k for k in keys if k.startswith(RELEASE_PREFIX)]
                if released:
                    part = {k[len(RELEASE_PREFIX):]: f.get_tensor(k) for k in released}
                elif _CODEBOOK_KEY in keys:
                    part = {k: f.get_tensor(k) for k in keys}
                else:
                    continue
        except SafetensorError as err:  # empty, truncated or not safetensors: name the file, not a traceback
            raise ValueError(f"{file}: unreadable (truncated or damaged: {str(err).strip()}): re-export or "
                             "re-download it") from None
        # Two files of one folder holding the same tensor (e.g. two exports side by side): which one
        # would win is an accident of file names, so refuse rather than pick.
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValueError(f"{file}: VQ-16 tensors also in another file of {path}, e.g. {clash[0]}; keep one "
                             "VQ-16 checkpoint in the folder or pass the file itself")
        state.update(part)
    if _CODEBOOK_KEY not in state:
        raise ValueError(
            f"{path}: no VQ-16 weights (neither {RELEASE_PREFIX}{_CODEBOOK_KEY} nor {_CODEBOOK_KEY}); pass a "
            "released Janus-Pro checkpoint or the vq16.safetensors that 'python -m pretrain.convert "
            "import-release' writes"
        )
    return state


def check_vq16_state(state: Mapping[str, torch.Tensor], where: str) -> int:
    """The codebook size, after checking every key and shape (one error listing all problems)."""
    codebook = state[_CODEBOOK_KEY]
    if codebook.dim() != 2 or codebook.shape[1] != EMBED_DIM or codebook.shape[0] == 0:
        raise ValueError(f"{where}: {_CODEBOOK_KEY} has shape {list(codebook.shape)}, expected [K, {EMBED_DIM}], K >= 1")
    expected = vq16_shapes(codebook.shape[0])
    problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"wrong shape {k}: {list(state[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    if problems:
        raise ValueError(f"{where}: not the VQ-16 architecture ({len(problems)} problems):\n  " + "\n  ".join(problems))
    # Shapes right but values unusable: an integer tensor fails deep in load_state_dict, and NaN/inf
    # would give every image the same code without any error. ``codebook_used`` is a training
    # statistic inference never reads, so its values are not judged.
    for key, value in state.items():
        if not value.is_floating_point():
            raise ValueError(f"{where}: {key} is {value.dtype}, expected floating point weights; re-export the "
                             "VQ-16 checkpoint")
        if key != "quantize.codebook_used" and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {key} holds NaN or inf values: the VQ-16 weights are damaged; use another "
                             "checkpoint")
    return codebook.shape[0]


def state_fingerprint(state: Mapping[str, torch.Tensor], skip: Iterable[str] = ("quantize.codebook_used",)) -> str:
    """sha256 (first 16 hex digits) of the keys, dtypes, shapes and bytes of ``state``, sorted by key.
    The training-only ``codebook_used`` statistic is left out: it does not change a single code."""
    digest = hashlib.sha256()
    for key in sorted(set(state) - set(skip)):
        t = state[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def build_vq16(state: Mapping[str, torch.Tensor], device="cpu", dtype: torch.dtype = torch.float32,
               where: str = "VQ-16 state") -> VQ16:
    """A ``VQ16`` holding ``state`` (names without the release prefix), eval mode, on ``device``."""
    codebook_size = check_vq16_state(state, where)
    with torch.device("meta"):
        model = VQ16(codebook_size)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)
    model.fingerprint = state_fingerprint(state)
    return model.to(device).eval().requires_grad_(False)


def load_vq16(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> VQ16:
    """The VQ-16 tokenizer from a local safetensors file or folder (see ``read_vq16_state``), in
    ``dtype`` (float32, or bfloat16 on accelerators) on ``device``. Never reads a hub."""
    return build_vq16(read_vq16_state(path), device, dtype, where=str(path))
