"""Documents follow datacontract/format.py token by token."""

import numpy as np
import pytest

from data_tools.documents import DocumentBuilder, LayoutOptions
from data_tools.sources import RawRecord, Reject
from data_tools.synthetic import encode, make_image
from datacontract.tokenizer import resolve_token_spec
from datacontract.format import Task, TokenKind


@pytest.fixture(scope="module")
def builder(tokenizer):
    return DocumentBuilder(tokenizer, resolve_token_spec(tokenizer), LayoutOptions(seq_length=256, resolution=32))


def _img(seed=0):
    return encode(make_image(50, 40, seed))


def test_token_counts_follow_the_options():
    lo = LayoutOptions(resolution=384)
    assert (lo.und_tokens, lo.gen_tokens, lo.latent_size) == (576, 576, 48)
    lo = LayoutOptions(resolution=32)
    assert (lo.und_tokens, lo.gen_tokens, lo.latent_size) == (4, 4, 4)
    with pytest.raises(ValueError):
        LayoutOptions(resolution=40)


def test_understanding_caption_layout(builder, tokenizer):
    sp = builder.spec
    doc = builder.build(RawRecord("s.tar", "k", Task.UNDERSTANDING, images=[_img()], caption="a red cat"))
    ids, kinds, tgt = doc.input_ids, doc.token_kind, doc.target_mask
    assert ids[0] == sp.bos_id and kinds[0] == TokenKind.TEXT and tgt[0] == 0
    b = int(np.flatnonzero(kinds == TokenKind.UND_IMAGE_BEGIN)[0])
    assert ids[b] == sp.begin_of_image_id
    assert (kinds[b + 1 : b + 5] == TokenKind.UND_IMAGE).all() and (ids[b + 1 : b + 5] == sp.image_placeholder_id).all()
    assert ids[b + 5] == sp.end_of_image_id and kinds[b + 5] == TokenKind.TEXT
    assert tokenizer.decode(ids[1:b].tolist()) == "User: "
    prompt_end = int(np.flatnonzero(tgt)[0])
    assert tokenizer.decode(ids[b + 6 : prompt_end].tolist()) == "\nGenerate the caption of this picture.\n\nAssistant:"
    assert tokenizer.decode(ids[tgt.astype(bool)].tolist()) == " a red cat<eos>"
    assert ids[-1] == sp.eos_id and tgt[-1] == 1
    assert len(doc.und_images) == 1 and not doc.gen_images


def test_understanding_system_prompt_and_multi_turn(tokenizer):
    b = DocumentBuilder(tokenizer, resolve_token_spec(tokenizer),
                        LayoutOptions(seq_length=256, resolution=32, system_prompt="Be brief."))
    rec = RawRecord("c.json", "k", Task.UNDERSTANDING, images=[_img(1), _img(2)],
                    turns=[("<image>\nwhat is it?", "a dog"), ("and <image>?", "a cat")])
    doc = b.build(rec)
    text = tokenizer.decode(doc.input_ids[doc.token_kind == TokenKind.TEXT].tolist())
    assert text.startswith("<bos>Be brief.\n\nUser: <end_of_image>\nwhat is it?\n\nAssistant: a dog<eos>User: and ")
    assert (doc.token_kind == TokenKind.UND_IMAGE_BEGIN).sum() == 2 and len(doc.und_images) == 2
    assert tokenizer.decode(doc.input_ids[doc.target_mask.astype(bool)].tolist()) == " a dog<eos> a cat<eos>"


def test_generation_layout(builder, tokenizer):
    sp = builder.spec
    doc = builder.build(RawRecord("g.tar", "k", Task.GENERATION, images=[_img()], caption="a blue car"))
    ids, kinds = doc.input_ids, doc.token_kind
    t = int(np.flatnonzero(kinds == TokenKind.GEN_TIME)[0])
    assert tokenizer.decode(ids[:t].tolist()) == "<bos>User: a blue car\n\nAssistant:"
    assert ids[t] == sp.begin_of_image_id
    assert (kinds[t + 1 : t + 5] == TokenKind.GEN_LATENT).all() and (ids[t + 1 : t + 5] == sp.image_placeholder_id).all()
    assert ids[t + 5] == sp.end_of_image_id and len(ids) == t + 6
    assert not doc.target_mask.any()
    assert len(doc.gen_images) == 1 and doc.gen_pixels[0].shape == (32, 32, 3)


def test_text_layout(builder, tokenizer):
    doc = builder.build(RawRecord("t.jsonl", "line1", Task.TEXT, text="hello world"))
    assert tokenizer.decode(doc.input_ids.tolist()) == "<bos>hello world<eos>"
    assert doc.target_mask[0] == 0 and doc.target_mask[1:].all() and (doc.token_kind == 0).all()


def test_too_long_understanding_is_cut_after_the_images_or_rejected(tokenizer):
    b = DocumentBuilder(tokenizer, resolve_token_spec(tokenizer), LayoutOptions(seq_length=40, resolution=32))
    long_answer = " ".join(["cat"] * 100)
    doc = b.build(RawRecord("s", "k", Task.UNDERSTANDING, images=[_img()], caption=long_answer))
    assert len(doc) == 40 and doc.truncated and doc.target_mask.any()
    assert (doc.token_kind == TokenKind.UND_IMAGE).sum() == 4
    b = DocumentBuilder(tokenizer, resolve_token_spec(tokenizer), LayoutOptions(seq_length=12, resolution=32))
    r = b.build(RawRecord("s", "k", Task.UNDERSTANDING, images=[_img()], caption="a cat"))
    assert isinstance(r, Reject) and r.reason == "too_long"


def test_too_long_generation_cuts_the_caption(tokenizer):
    b = DocumentBuilder(tokenizer, resolve_token_spec(tokenizer), LayoutOptions(seq_length=30, resolution=32))
    doc = b.build(RawRecord("g", "k", Task.GENERATION, images=[_img()], caption=" ".join(["dog"] * 50)))
    assert len(doc) <= 30 and doc.truncated
    assert (doc.token_kind == TokenKind.GEN_LATENT).sum() == 4
    assert tokenizer.decode(doc.input_ids[doc.token_kind == 0].tolist()).endswith("\n\nAssistant:<end_of_image>")


def test_bad_image_becomes_a_reject(builder):
    r = builder.build(RawRecord("s", "k", Task.GENERATION, images=[b""], caption="x"))
    assert isinstance(r, Reject) and r.reason == "empty_file"
