"""Understanding decoding: the cache changes nothing; nucleus sampling; the prompt as trained."""

import numpy as np
import torch

from datacontract.format import TokenKind
from pretrain.sample.understanding import choose_token, generate_answer, understanding_prompt

NEVER = -1  # an end-of-sentence id the model cannot produce: decode the full length


def tiny_prompt(model):
    n_img = model.cfg.und_encoder.num_image_tokens
    ids = torch.tensor([1, 30, 31] + [3] + [5] * n_img + [4] + [40, 41, 42])
    kind = torch.tensor([0] * 3 + [TokenKind.UND_IMAGE_BEGIN] + [TokenKind.UND_IMAGE] * n_img + [0] * 4)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return ids, kind, pixels


def test_greedy_with_cache_equals_recompute(tiny_model):
    ids, kind, pixels = tiny_prompt(tiny_model)
    runs = {}
    for use_cache in (True, False):
        logits = []
        tokens = generate_answer(tiny_model, ids, kind, pixels, NEVER, max_new_tokens=6,
                                 use_cache=use_cache, on_logits=logits.append)
        runs[use_cache] = tokens, logits
    assert len(runs[True][0]) == 6 and runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_top_p_is_seeded_and_stops_at_eos(tiny_model):
    ids, kind, pixels = tiny_prompt(tiny_model)

    def draw(use_cache, seed=5):
        return generate_answer(tiny_model, ids, kind, pixels, NEVER, max_new_tokens=5, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed), use_cache=use_cache)

    first = draw(True)
    assert first == draw(True) == draw(False)
    stop = first[2]  # that token as end of sentence: the answer stops before it
    cut = generate_answer(tiny_model, ids, kind, pixels, stop, max_new_tokens=5, top_p=0.9,
                          generator=torch.Generator().manual_seed(5))
    assert cut == first[: first.index(stop)]


def test_choose_token_nucleus():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    assert choose_token(logits) == 1
    assert choose_token(logits, top_p=0.3, generator=torch.Generator().manual_seed(0)) == 1
    g = torch.Generator().manual_seed(0)
    drawn = {choose_token(logits, top_p=0.6, generator=g) for _ in range(200)}
    assert drawn == {1, 3}  # 0.4 + 0.3 reaches 0.6: the two most likely tokens only


def test_prompt_matches_the_training_documents(tokenizer_dir):
    """The understanding document built by data_tools, up to its answer."""
    from PIL import Image

    from data_tools.documents import DocumentBuilder, LayoutOptions
    from datacontract.images import encode_image
    from data_tools.sources import RawRecord
    from datacontract.tokenizer import load_tokenizer, resolve_token_spec
    from datacontract.format import Task

    tokenizer = load_tokenizer(tokenizer_dir)
    spec = resolve_token_spec(tokenizer)
    image = encode_image(Image.fromarray(np.full((32, 48, 3), 90, np.uint8)), "png")
    for system in ("", "You are a helpful assistant."):
        layout = LayoutOptions(seq_length=256, resolution=32, system_prompt=system)
        doc = DocumentBuilder(tokenizer, spec, layout).build(
            RawRecord("s", "k", Task.UNDERSTANDING, [image], "a grey square")
        )
        answer_start = int(np.flatnonzero(doc.target_mask)[0])
        ids, kind = understanding_prompt(tokenizer, spec, layout.und_question, layout.und_tokens, system)
        assert ids.tolist() == doc.input_ids[:answer_start].tolist()
        assert kind.tolist() == doc.token_kind[:answer_start].tolist()
