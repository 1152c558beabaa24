"""Image understanding: image + question -> answer, greedy or nucleus (top-p) sampling.

The prompt is the understanding document of ``data_tools/documents.py`` up to the answer (what the
model was trained on, DeepSeek chat style as released):
``BOS [system "\\n\\n"] "User: " [<begin_of_image>, N image positions, <end_of_image>] "\\n" question
"\\n\\nAssistant:"``; the model then writes " answer" and EOS. The begin-of-image position takes the
learned ``beg_of_und_embed``, the N positions the aligned SigLIP features.

Decoding prefills the prompt once into a key/value cache, then runs one token per forward, each
appended to the cache; ``use_cache=False`` recomputes the whole sequence every token (the reference).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from datacontract.format import TokenKind
from ..model.janusflow import ModelInputs
from .cache import KVCache, attach_kv_cache


def understanding_prompt(
    tokenizer, spec, question: str, num_image_tokens: int, system_prompt: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [L], token_kind [L]) of the prompt, one image before the question.

    ``spec``: the special token ids (``datacontract.tokenizer.TokenSpec``: bos, begin/end of image,
    image placeholder). Text pieces are tokenized separately, as the document builder does.
    """
    def tokens(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

    head = f"{system_prompt}\n\n" if system_prompt else ""
    before = [spec.bos_id] + tokens(head + "User: ")
    image = [spec.begin_of_image_id] + [spec.image_placeholder_id] * num_image_tokens + [spec.end_of_image_id]
    after = tokens(f"\n{question}\n\nAssistant:")
    kinds = (
        [TokenKind.TEXT] * len(before)
        + [TokenKind.UND_IMAGE_BEGIN] + [TokenKind.UND_IMAGE] * num_image_tokens + [TokenKind.TEXT]
        + [TokenKind.TEXT] * len(after)
    )
    return torch.tensor(before + image + after, dtype=torch.long), torch.tensor([int(k) for k in kinds])


def load_understanding_image(path: str, resolution: int) -> torch.Tensor:
    """An image file -> [1, 3, R, R] in [-1, 1]: long side to R (bicubic), padded to a square with
    (127, 127, 127), exactly the preprocessing of the training shards (``datacontract.images``)."""
    from datacontract.images import ImageRejected, open_image, prepare_und_image

    with open(path, "rb") as f:
        data = f.read()
    try:
        img = prepare_und_image(open_image(data), resolution)
    except ImageRejected as err:
        raise ValueError(f"{path}: {err}") from None
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return (pixels / 127.5 - 1.0)[None]


def choose_token(
    logits: torch.Tensor,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> int:
    """Next token from logits [V]: argmax when ``top_p`` is None or ``temperature`` is 0, else a draw
    from the smallest set of most likely tokens whose probability reaches ``top_p`` (on the CPU, so
    a seeded ``generator`` gives the same tokens on any device)."""
    if top_p is None or temperature == 0:
        return int(torch.argmax(logits))
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
    pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[pick])


@torch.no_grad()
def generate_answer(
    model: nn.Module,
    input_ids: torch.Tensor,
    token_kind: torch.Tensor,
    und_pixels: Optional[torch.Tensor],
    eos_id: int,
    max_new_tokens: int = 256,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    on_logits: Optional[Callable[[torch.Tensor], None]] = None,
) -> list[int]:
    """Token ids of the answer (without the EOS that ended it) for one prompt.

    input_ids, token_kind: [L] (``understanding_prompt``, or ``januspro.understanding_prompt`` for a
    ``JanusProModel``); und_pixels: [N_img, 3, R, R] in [-1, 1],
    one per UND_IMAGE_BEGIN. Stops at ``eos_id`` or after ``max_new_tokens``. ``on_logits(logits [V])``
    sees the float32 logits each token was chosen from.
    """
    device = next(model.parameters()).device
    prompt_ids = input_ids.to(device)
    prompt_kind = token_kind.to(device)
    pixels = None if und_pixels is None else und_pixels.to(device)
    answer: list[int] = []

    inputs_class = ModelInputs
    if model.cfg.family == "januspro":  # same fields for understanding; the other family's model
        from ..model.januspro import JanusProInputs as inputs_class

    def run(ids: torch.Tensor, kind: torch.Tensor, start: int, with_pixels: bool) -> torch.Tensor:
        inputs = inputs_class(
            input_ids=ids,
            position_ids=torch.arange(start, start + len(ids), device=device),
            cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32, device=device),
            token_kind=kind,
            und_pixels=pixels if with_pixels else None,
        )
        _, outputs = model(inputs)
        return model.llm.compute_logits(outputs.final_hidden[-1:])[0].float()

    cache = KVCache() if use_cache else None
    text = torch.full((1,), int(TokenKind.TEXT), dtype=prompt_kind.dtype, device=device)
    for step in range(max_new_tokens):
        if cache is None:
            new = torch.tensor(answer, dtype=prompt_ids.dtype, device=device)
            logits = run(torch.cat([prompt_ids, new]), torch.cat([prompt_kind, text.expand(len(answer))]), 0, True)
        elif step == 0:
            with attach_kv_cache(model, cache):
                logits = run(prompt_ids, prompt_kind, 0, True)
        else:
            last = torch.tensor([answer[-1]], dtype=prompt_ids.dtype, device=device)
            with attach_kv_cache(model, cache):
                logits = run(last, text, len(prompt_ids) + len(answer) - 1, False)
        if on_logits is not None:
            on_logits(logits)
        token = choose_token(logits, top_p, temperature, generator)
        if token == eos_id:
            break
        answer.append(token)
    return answer
