"""Janus-Pro inference: text-to-image by next-code prediction with classifier-free guidance, and the
understanding prompt (image + question) of its family.

Text-to-image, as the released sampler (``generation_inference.py``):
- each prompt is ``BOS, template text, <begin_of_image>``; with guidance it gets an unconditional
  twin: the same length, every token replaced by the pad id except the first (BOS) and the last
  (``<begin_of_image>``), and ATTENDED to (no mask). Rows are interleaved: 2k conditional, 2k+1
  unconditional for image k;
- the logits of code i are the image head on the final (normed) hidden state of the token before
  it (``<begin_of_image>`` for code 0); guidance on logits, ``uncond + w * (cond - uncond)``, then
  temperature: ``softmax(guided / T)``; optional top-k / top-p filtering after the temperature; one
  draw per image (on the CPU with a seeded generator: the same codes on any device);
- the drawn code goes to both rows of its image as ``gen_aligner(gen_embed(code))`` (NOT the VQ
  codebook); the last code is never fed;
- the codes, row-major, decode through the image codec (VQ-16) to pixels in [-1, 1], then to uint8 by
  ``clip((x + 1) / 2 * 255, 0, 255)`` and truncation, as released.

With ``use_cache`` (default) the prompts run once into a key/value cache and every step runs one
token per row; without, every step recomputes whole documents through the model's training forward
(``JanusProModel.forward`` with GEN_CODE slots): the reference the cache is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from datacontract.format import TokenKind
from ..model.januspro import JanusProInputs
from .cache import KVCache, attach_kv_cache
from .text_to_image import GENERATION_TEMPLATE

# What the released Janus-Pro examples put around the prompt (roles of their "deepseek" template).
RELEASED_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"


def generation_prompt(tokenizer, prompt: str, bos_id: int, begin_of_image_id: int,
                      template: str = GENERATION_TEMPLATE) -> list[int]:
    """``BOS + tokens(template with the prompt) + <begin_of_image>``: what the first code follows.
    The default template is the generation document's of the data tools (what our runs train on);
    checkpoints converted from the release were trained on ``RELEASED_TEMPLATE``."""
    text = template.format(prompt=prompt)
    return [int(bos_id)] + list(tokenizer.encode(text, add_special_tokens=False)) + [int(begin_of_image_id)]


def guidance_rows(prompts: Sequence[Sequence[int]], pad_id: int) -> list[list[int]]:
    """Interleaved rows: for each prompt, itself, then its unconditional twin (pads between its
    first and last token)."""
    rows = []
    for prompt in prompts:
        if len(prompt) < 2:
            raise ValueError("a generation prompt needs at least BOS and <begin_of_image>")
        rows += [list(prompt), [prompt[0]] + [int(pad_id)] * (len(prompt) - 2) + [prompt[-1]]]
    return rows


def guided_logits(row_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """Interleaved [2B, K] (conditional, unconditional) -> [B, K]: uncond + w * (cond - uncond)."""
    cond, uncond = row_logits[0::2], row_logits[1::2]
    return uncond + weight * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """[B, K] logits with -inf outside the ``top_k`` largest and outside the smallest set of most likely
    codes whose probability reaches ``top_p`` (the most likely code always stays)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: must be at least 1")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p}: must be in (0, 1]")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        above = torch.cumsum(probs, dim=-1) - probs  # mass of the codes ranked above each one
        drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class CodeStep:
    """What one step saw (for tests and diagnostics): hidden [R, H] and logits [R, K] of every row
    (R = 2B interleaved with guidance, else B), guided logits and probabilities [B, K] (float32,
    after temperature and filtering), and the codes [B] it chose or was given."""

    index: int
    hidden: torch.Tensor
    logits: torch.Tensor
    guided: torch.Tensor
    probs: torch.Tensor
    codes: torch.Tensor


class _Rows:
    """The LLM over packed rows that grow by one image code per step, cached or recomputed."""

    def __init__(self, model: nn.Module, rows: list[list[int]], use_cache: bool) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.rows = rows
        self.lengths = torch.tensor([len(r) for r in rows])
        self.codes: list[torch.Tensor] = []  # fed codes, one [R] tensor per step
        self.cache = KVCache() if use_cache else None

    def _cu(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32).to(self.device)

    def _llm(self, embeds: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, H] of the packed tokens (appended to the cache)."""
        with attach_kv_cache(self.model, self.cache):
            hidden, _ = self.model.llm(embeds[:, None, :], positions.to(self.device), self._cu(lengths))
        return hidden[:, 0, :]

    def _full(self) -> torch.Tensor:
        """Whole documents through the training forward; the last hidden state of each [R, H]."""
        fed = torch.stack(self.codes, 1) if self.codes else torch.zeros(len(self.rows), 0, dtype=torch.long)
        ids, kinds = [], []
        for row, codes in zip(self.rows, fed.tolist()):
            ids += row + codes
            kinds += [int(TokenKind.TEXT)] * len(row) + [int(TokenKind.GEN_CODE)] * len(codes)
        lengths = self.lengths + fed.shape[1]
        inputs = JanusProInputs(
            input_ids=torch.tensor(ids, device=self.device),
            position_ids=torch.cat([torch.arange(int(n)) for n in lengths]).to(self.device),
            cu_seqlens=self._cu(lengths),
            token_kind=torch.tensor(kinds, device=self.device),
        )
        _, outputs = self.model(inputs)
        return outputs.final_hidden[self._cu(lengths)[1:].long() - 1]

    def start(self) -> torch.Tensor:
        """Run the prompts; the hidden state at each row's last token [R, H]."""
        if self.cache is None:
            return self._full()
        ids = torch.tensor([t for r in self.rows for t in r], device=self.device)
        positions = torch.cat([torch.arange(int(n)) for n in self.lengths])
        hidden = self._llm(self.model.llm.embed_tokens(ids), positions, self.lengths)
        return hidden[self._cu(self.lengths)[1:].long() - 1]

    def feed(self, codes: torch.Tensor) -> torch.Tensor:
        """Append one code per row [R]; the hidden state at it [R, H]."""
        codes = codes.to(self.device)
        self.codes.append(codes.cpu())
        if self.cache is None:
            return self._full()
        positions = self.lengths + len(self.codes) - 1
        return self._llm(self.model.embed_codes(codes), positions, torch.ones_like(self.lengths))


Generators = Optional[torch.Generator | Sequence[torch.Generator]]


def _draw(probs: torch.Tensor, greedy: bool, generator: Generators) -> torch.Tensor:
    """One code per image [B] from probs [B, K], on the CPU; a sequence of generators draws image b
    from generator b (so an image does not depend on the others of its batch)."""
    if greedy:
        return probs.argmax(dim=-1).cpu()
    probs = probs.cpu()
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)])


def _require_finite_probs(probs: torch.Tensor, index: int) -> None:
    """NaN logits (weights or activations that overflowed) make NaN probabilities: torch.multinomial
    would stop with an internal error, and argmax would pick code 0 for every image, silently."""
    if not bool(torch.isfinite(probs).all()):  # the draw below syncs with the host anyway
        from .decode import NonFiniteError

        raise NonFiniteError(f"the probabilities of image code {index} hold NaN or inf values, so no code was "
                             "drawn: the model's logits overflowed or its weights hold NaN")


@torch.no_grad()
def sample_codes(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    num_codes: int,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    pad_id: int = 0,
    generator: Generators = None,
    use_cache: bool = True,
    forced_codes: Optional[torch.Tensor] = None,
    on_step: Optional[Callable[[CodeStep], None]] = None,
) -> torch.Tensor:
    """Image codes [B, num_codes] (int64, CPU, row-major) for B tokenized prompts
    (``generation_prompt``: BOS ... <begin_of_image>).

    ``cfg_weight`` 1 runs the conditional rows alone; ``temperature`` 0 takes the most likely code.
    ``generator``: one for all draws, or one per prompt (images then independent of the batching).
    ``forced_codes`` [B, num_codes]: teacher forcing, these codes are fed instead of drawn (the
    logits are computed all the same). The model: a whole single-stage ``JanusProModel`` in eval mode.
    """
    if num_codes < 1:
        raise ValueError(f"num_codes={num_codes}: need at least one code")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    guided = float(cfg_weight) != 1.0
    rows = guidance_rows(prompts, pad_id) if guided else [list(p) for p in prompts]
    per_image = 2 if guided else 1
    if forced_codes is not None and tuple(forced_codes.shape) != (len(prompts), num_codes):
        raise ValueError(f"forced_codes has shape {list(forced_codes.shape)}, expected [{len(prompts)}, {num_codes}]")
    runner = _Rows(model, rows, use_cache)
    hidden = runner.start()
    chosen = []
    for i in range(num_codes):
        logits = model.gen_head(hidden).float()
        mixed = guided_logits(logits, cfg_weight) if guided else logits
        greedy = temperature == 0
        scaled = filter_logits(mixed if greedy else mixed / temperature, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        if forced_codes is None:
            _require_finite_probs(probs, i)
        codes = forced_codes[:, i].cpu().long() if forced_codes is not None else _draw(probs, greedy, generator)
        chosen.append(codes)
        if on_step is not None:
            on_step(CodeStep(i, hidden, logits, mixed, probs, codes))
        if i + 1 < num_codes:  # the last code is never fed
            hidden = runner.feed(codes.repeat_interleave(per_image))
    return torch.stack(chosen, dim=1)


def codes_to_uint8(codec, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Codes [B, h*w] -> images [B, 16h, 16w, 3] uint8 (channels last), the released post-processing:
    ``clip((x + 1) / 2 * 255, 0, 255)`` then truncation (not rounding)."""
    pixels = codec.decode(codes, grid).float().cpu()
    return ((pixels + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_uint8_png(images: torch.Tensor, paths: Sequence) -> list:
    """Write [B, H, W, 3] uint8 images as PNG files (parent folders created)."""
    from pathlib import Path

    from PIL import Image

    written = []
    for image, path in zip(images, paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image.numpy()), "RGB").save(path)
        written.append(path)
    return written


def understanding_prompt(tokenizer, spec, question: str, num_image_tokens: int,
                         system_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [L], token_kind [L]): the understanding prompt of ``sample.understanding`` with
    Janus-Pro's image slots: ``<begin_of_image>`` is a plain token (no learned begin embedding)."""
    from .understanding import understanding_prompt as common_prompt

    ids, kinds = common_prompt(tokenizer, spec, question, num_image_tokens, system_prompt)
    return ids, kinds.masked_fill(kinds == int(TokenKind.UND_IMAGE_BEGIN), int(TokenKind.TEXT))
