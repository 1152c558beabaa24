"""Seeded random packings of both model families equal their documents run apart.

``test_packing.py`` checks one fixed packing of JanusFlow. Here every seed draws a packing: 1..8
documents in a random task order (plus, for some seeds, a 1-token text document first and a
generation document last), several generation documents in one row (empty prompts included), text
documents of 1 and 2 tokens, understanding documents with one or two images, sometimes a last text
document that fills the row exactly to a multiple of 8 tokens (the dense backend's tile size),
sometimes two rows through the loader's ``collate_packed``, sometimes a batch without host metadata
(built from the tensors), both L_AR normalisations, and CFG prompt drops. Packings long and short
enough take both dense paths (tiled and one [T, T] call; the seed's description says which).

The reference is each document built and run on its own; the packed run must give the same final
hidden states, logits at the targets, velocity and REPA (JanusFlow), image logits (Janus-Pro), loss
sums and unit counts (also counted from the documents' own masks), and the same gradients of the
summed loss w.r.t. every parameter as the sum over the documents run apart: a leak across documents
that the forward values hide still shows in the gradients. Not caught by this property, so checked
apart: that positions restart per document (RoPE is relative: a global offset changes no score) and
that a dropped prompt is hidden at all (both layouts would agree if neither hid it).

Tolerances: fp32 throughout. Measured max abs differences over seeds 0..63: final hidden 8e-7,
velocity 8e-7, logits 2.4e-7, REPA 4e-8, gradients 2.6e-6 (largest gradient ~8), loss sums 3.8e-6
(L_AR) and 3.1e-5 (Janus-Pro image loss, a sum of up to 128 code cross-entropies, ~400). Bounds: 1e-5
for values, 1e-5 x max(1, the parameter's largest gradient) for gradients, 1e-5 + 1e-6 x |sum| for
loss sums.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from datacontract.format import Task, TokenKind
from pretrain.data.batch import PackedRow, PackingMetadata, collate_packed
from pretrain.families import januspro as januspro_family
from pretrain.losses import FlowEndpoints
from pretrain.model.attention import dense_tiles
from pretrain.model.config import (
    GenerationVisionConfig, ImageTokenConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig,
)
from pretrain.model.janusflow import JanusFlowModel
from pretrain.model.januspro import JanusProModel
from pretrain.recipe import load_recipe
from pretrain import step as step_module
from pretrain.step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from pretrain.synthetic import SyntheticBatch, make_synthetic_batch

SEEDS = range(14)
# More draws of the same generator (~30 s more on the 2-core machine; 0..63 were all run once, see above).
SLOW_SEEDS = [pytest.param(seed, marks=pytest.mark.slow) for seed in range(14, 40)]
ATOL = 1e-5  # values; gradients: ATOL times max(1, the parameter's largest gradient)
LOSS_TOL = {"atol": 1e-5, "rtol": 1e-6}  # float32 sums of up to ~400 (128 code cross-entropies of ~3)
PAD_ID = januspro_family.SYNTHETIC_PAD_ID
TILE = 8  # pretrain.model.attention.dense_tiles' default multiple


def _flow_config() -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                      num_query_groups=2),
        und_encoder=UnderstandingEncoderConfig(image_size=16, patch_size=4, hidden_size=16,
                                               intermediate_size=32, num_layers=1, num_attention_heads=2),
        gen_vision=GenerationVisionConfig(latent_size=8, patch_size=2, channels=16, num_blocks=1, time_embed_dim=16),
        repa=RepaConfig(layer=2, projector_hidden_size=16),
    )


def _pro_config() -> ModelConfig:
    return ModelConfig(
        family="januspro",
        llm=LLMConfig(vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                      num_query_groups=2),
        und_encoder=UnderstandingEncoderConfig(image_size=16, patch_size=4, hidden_size=16,
                                               intermediate_size=32, num_layers=1, num_attention_heads=2),
        image_tokens=ImageTokenConfig(codebook_size=24, embed_dim=8, downsample=4, codec="kmeans_patches"),
    )


@pytest.fixture(scope="module")
def flow_model(runtime):
    torch.manual_seed(0)
    return JanusFlowModel(_flow_config())


@pytest.fixture(scope="module")
def pro_model(runtime):
    torch.manual_seed(1)
    return JanusProModel(_pro_config())


# ------------------------------------------------------------------------------------------------
# building packings (test side: each document is built on its own, the packing concatenates them)


def _quantised(pixels: torch.Tensor | None) -> torch.Tensor | None:
    """Pixels on the uint8 grid, in the loader's float32 formula, so ``collate_packed`` of their
    uint8 form gives the same floats."""
    if pixels is None:
        return None
    k = np.round((pixels.numpy() + 1) * 127.5).clip(0, 255).astype(np.float32)
    return torch.from_numpy(k / np.float32(127.5) - np.float32(1.0))


def _document(cfg: ModelConfig, task: Task, text_len: int, g: torch.Generator, images: int = 1) -> SyntheticBatch:
    """One document alone (its own batch). A text document may be 1 token (make_synthetic_batch's
    shortest is 2: keep its first token); an understanding document may hold two images (the
    contract's chat template allows several: ``[begin, UND_IMAGE x N, <end_of_image>]`` each)."""
    doc = make_synthetic_batch(cfg, [task], g, text_len=max(text_len, 2 if task == Task.TEXT else text_len))
    doc = replace(doc, und_pixels=_quantised(doc.und_pixels), gen_pixels=_quantised(doc.gen_pixels))
    if task == Task.UNDERSTANDING and images == 2:
        end = 3 + cfg.und_encoder.num_image_tokens  # BOS, text, begin, the image's slots
        block = torch.cat([torch.tensor([int(TokenKind.TEXT)], dtype=torch.uint8), doc.token_kind[2:end]])
        kinds = torch.cat([doc.token_kind[:end], block, doc.token_kind[end:]])
        ids = torch.cat([doc.input_ids[:end], torch.randint(0, cfg.llm.vocab_size, (len(block),), generator=g),
                         doc.input_ids[end:]])
        targets = torch.cat([doc.target_mask[:end], torch.zeros(len(block), dtype=torch.bool), doc.target_mask[end:]])
        second = _quantised(torch.randn(1, *doc.und_pixels.shape[1:], generator=g).clamp(-1, 1))
        doc = replace(doc, input_ids=ids, position_ids=torch.arange(len(ids)), token_kind=kinds, target_mask=targets,
                      cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32),
                      und_pixels=torch.cat([doc.und_pixels, second]))
    if task == Task.TEXT and text_len == 1:
        doc = replace(doc, input_ids=doc.input_ids[:1], position_ids=doc.position_ids[:1],
                      cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), token_kind=doc.token_kind[:1],
                      target_mask=doc.target_mask[:1])
    lengths = np.diff(doc.cu_seqlens.numpy())
    meta = PackingMetadata.from_arrays(lengths, doc.token_kind.numpy(), doc.target_mask.numpy(), doc.doc_tasks.numpy())
    return replace(doc, metadata=meta)


def _cat(xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs) if xs else None


def _concat(docs: list[SyntheticBatch], with_metadata: bool) -> SyntheticBatch:
    """The documents laid end to end (positions restart in each)."""
    lengths = [len(d.input_ids) for d in docs]
    kinds, targets = _cat([d.token_kind for d in docs]), _cat([d.target_mask for d in docs])
    tasks = _cat([d.doc_tasks for d in docs])
    return SyntheticBatch(
        input_ids=_cat([d.input_ids for d in docs]), position_ids=_cat([d.position_ids for d in docs]),
        cu_seqlens=torch.tensor(np.r_[0, np.cumsum(lengths)], dtype=torch.int32), token_kind=kinds,
        target_mask=targets, doc_tasks=tasks, und_pixels=_cat([d.und_pixels for d in docs]),
        gen_pixels=_cat([d.gen_pixels for d in docs]), gen_latents=_cat([d.gen_latents for d in docs]),
        metadata=PackingMetadata.from_arrays(np.array(lengths), kinds.numpy(), targets.numpy(), tasks.numpy())
        if with_metadata else None,
    )


def _uint8(pixels: torch.Tensor | None) -> list[np.ndarray]:
    if pixels is None:
        return []
    return list(np.round((pixels.numpy() + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1))


def _collate(docs: list[SyntheticBatch], rows: list[list[int]], cfg: ModelConfig):
    """The documents as packed rows (``rows``: document indices of each row, in order) through the
    loader's ``collate_packed``."""
    packed_rows = []
    for row in rows:
        part = [docs[i] for i in row]
        latents = [z.numpy() for d in part if d.gen_latents is not None for z in d.gen_latents]
        packed_rows.append(PackedRow(
            input_ids=_cat([d.input_ids for d in part]).numpy(), token_kind=_cat([d.token_kind for d in part]).numpy(),
            target_mask=_cat([d.target_mask for d in part]).numpy(),
            doc_lengths=np.array([len(d.input_ids) for d in part]), doc_tasks=_cat([d.doc_tasks for d in part]).numpy(),
            und_images=[im for d in part for im in _uint8(d.und_pixels)],
            gen_images=[im for d in part for im in _uint8(d.gen_pixels)],
            gen_latents=latents if cfg.family == "janusflow" else None,
            resolution=cfg.und_encoder.image_size,
            latent_shape=None,
        ))
    if cfg.family == "janusflow":  # every row carries the layout's latent shape, as decode_row sets it
        gv = cfg.gen_vision
        for r in packed_rows:
            r.latent_shape = (gv.latent_channels, gv.latent_size, gv.latent_size)
    batch = collate_packed(packed_rows)
    if batch.gen_latents is not None and not len(batch.gen_latents):
        batch.gen_latents = None
    return batch


def random_packing(cfg: ModelConfig, seed: int):
    """(documents, packed batch, description) of one seed."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    n_docs = rnd.randint(1, 8)
    tasks = [rnd.choice([Task.UNDERSTANDING, Task.GENERATION, Task.GENERATION, Task.TEXT]) for _ in range(n_docs)]
    if seed % 3 == 0 and n_docs > 1:  # several generation documents side by side
        tasks[:2] = [Task.GENERATION, Task.GENERATION]
    lens = [rnd.choice([1, 2, 2, 3, 5, 9, 17]) if t == Task.TEXT else rnd.randint(0, 6) for t in tasks]
    # Some generation prompts are empty (BOS then the image); understanding needs 2+ text tokens.
    lens = [max(n, 2) if t == Task.UNDERSTANDING else n for n, t in zip(lens, tasks)]
    docs = [_document(cfg, t, n, g, images=rnd.choice([1, 1, 2])) for t, n in zip(tasks, lens)]
    if seed % 7 == 4:  # a 1-token text document first, a generation document last
        docs = [_document(cfg, Task.TEXT, 1, g)] + docs + [_document(cfg, Task.GENERATION, rnd.randint(0, 4), g)]
        tasks = [Task.TEXT] + tasks + [Task.GENERATION]
    if seed % 4 == 1:  # fill the row exactly to a multiple of the tile size with a last text document
        total = sum(len(d.input_ids) for d in docs)
        fill = (-total) % TILE or TILE
        docs.append(_document(cfg, Task.TEXT, fill, g))
        tasks.append(Task.TEXT)
    if seed % 5 == 2 and len(docs) > 1:  # several rows through the loader's collate
        cut = rnd.randint(1, len(docs) - 1)
        batch, layout = _collate(docs, [list(range(cut)), list(range(cut, len(docs)))], cfg), f"rows cut at {cut}"
    else:
        batch = _concat(docs, with_metadata=seed % 4 != 3)
        layout = "one row" + ("" if batch.metadata is not None else ", no host metadata")
    lengths = [len(d.input_ids) for d in docs]
    images = [len(d.und_pixels) if d.und_pixels is not None else 0 for d in docs]
    desc = (f"seed {seed}: {[Task(t).name[:3] for t in tasks]} lengths {lengths} understanding images {images}, "
            f"{layout}, tiled attention {dense_tiles(lengths, 'cpu') is not None}")
    return docs, batch, desc


def draw_drops(n_gen: int, seed: int) -> torch.Tensor:
    return torch.rand(n_gen, generator=torch.Generator().manual_seed(77 + seed)) < 0.5


@contextlib.contextmanager
def fixed_drops(module, queue: list[torch.Tensor]):
    """Replace ``module.draw_prompt_drop`` by the next decisions of ``queue``.

    The step draws the CFG drop once per generation document from the micro-batch's generator,
    after the flow draws, so which documents drop depends on how many generation documents the
    batch holds and where: the packed batch and a lone document cannot draw the same decisions.
    The test draws them once per packing and hands each layout the same ones (all of them to the
    packed run, each document its own to the run apart)."""
    original = module.draw_prompt_drop

    def draw(n, prob, generator=None, device=None):
        decisions = queue.pop(0)
        assert len(decisions) == n, (len(decisions), n)
        return decisions

    module.draw_prompt_drop = draw
    try:
        yield
    finally:
        module.draw_prompt_drop = original


def expected_prompt(kinds: torch.Tensor, family: str) -> torch.Tensor:
    """Bool [L] of ONE generation document: its droppable prompt, after BOS and before the image start
    (JanusFlow: the time token; Janus-Pro: <begin_of_image>, the token before the first code)."""
    kinds = kinds.long()
    if family == "janusflow":
        start = int((kinds == TokenKind.GEN_TIME).nonzero()[0])
    else:
        start = int((kinds == TokenKind.GEN_CODE).nonzero()[0]) - 1
    mask = torch.zeros(len(kinds), dtype=torch.bool)
    mask[1:start] = True
    return mask


def expected_counts(docs: list[SyntheticBatch], normalisation: str) -> dict[str, int]:
    """Units counted from the documents' own masks (a document's first token never a target)."""
    per_doc = [int(d.target_mask[1:][d.token_kind[1:].long() != TokenKind.GEN_CODE].sum()) for d in docs]
    ar = sum(per_doc) if normalisation == "pooled_tokens" else sum(1 for n in per_doc if n)
    return {"ar": ar, "gen": sum(int((d.doc_tasks == Task.GENERATION).sum()) for d in docs),
            "image": sum(int(d.target_mask[1:][d.token_kind[1:].long() == TokenKind.GEN_CODE].sum()) for d in docs)}


# ------------------------------------------------------------------------------------------------
# comparing


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _backward(model, total: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    total.backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def _close(actual, expected, what, desc, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{desc}: {what}: {m}")


def _close_loss(actual, expected, what, desc):
    _close(actual, expected, what, desc, **LOSS_TOL)


def _close_grads(packed: dict, apart: dict, desc: str):
    assert packed.keys() == apart.keys()
    bad = {n: (packed[n] - apart[n]).abs().max().item() for n in packed}
    bad = {n: d for n, d in bad.items() if d > ATOL * max(1.0, apart[n].abs().max().item())}
    assert not bad, f"{desc}: gradients differ: " + ", ".join(f"{n} by {d:.3g}" for n, d in bad.items())[:800]


def _doc_slices(docs):
    bounds = np.r_[0, np.cumsum([len(d.input_ids) for d in docs])]
    return [slice(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])]


def check_prompt_drop_hides(model, doc_inputs, out, dropped: bool, desc: str):
    """Packed and apart agree even if both ignore the hidden keys, so check the drop itself on the
    lone document: with the prompt hidden, other prompt ids change no visible token's output; kept,
    they change the image tokens' outputs."""
    prompt = expected_prompt(doc_inputs.token_kind, "janusflow")
    if not prompt.any():
        return
    ids = doc_inputs.input_ids.clone()
    ids[prompt] = (ids[prompt] + 1) % model.cfg.llm.vocab_size
    with torch.no_grad():
        _, other = model(replace(doc_inputs, input_ids=ids))
    image = doc_inputs.token_kind.long() == TokenKind.GEN_LATENT
    if dropped:
        _close(other.final_hidden[~prompt], out.final_hidden[~prompt].detach(), "visible tokens, other hidden prompt",
               desc)
        _close(other.velocity, out.velocity.detach(), "velocity, other hidden prompt", desc)
    else:
        assert (other.final_hidden[image] - out.final_hidden[image]).abs().max() > 1e-3, desc


# ------------------------------------------------------------------------------------------------
# JanusFlow


@pytest.mark.parametrize("seed", [*SEEDS, *SLOW_SEEDS])
def test_janusflow_random_packing_equals_documents_apart(flow_model, seed):
    model, cfg = flow_model, flow_model.cfg
    docs, batch, desc = random_packing(cfg, seed)
    norm = ("pooled_tokens", "per_document")[seed % 2]
    n_gen = sum(int((d.doc_tasks == Task.GENERATION).sum()) for d in docs)
    drops = draw_drops(n_gen, seed)
    prob = 0.5  # any value: the decisions come from ``drops``

    with fixed_drops(step_module, [drops]):
        inputs, ends = prepare_model_inputs(batch, batch.gen_latents, prob, torch.Generator().manual_seed(seed))
    _, packed = model(inputs)
    terms = stage_loss_terms(packed, ends, inputs.packing(), norm)
    packed_grads = _backward(model, sum(term.total for term in terms.values()))

    positions = torch.cat([torch.arange(len(d.input_ids)) for d in docs])
    assert torch.equal(batch.position_ids.long(), positions), desc  # RoPE is relative: check them apart
    expected = expected_counts(docs, norm)
    want_counts = {"ar": expected["ar"], "rf": expected["gen"], "repa": expected["gen"]}
    assert batch_unit_counts(batch, norm) == want_counts, desc
    assert terms["ar"].count == expected["ar"], desc

    # Each document apart: its own batch, its own drop decision; the flow draws (t, noise) depend on
    # the batch's generation count, so the packed run's z_t, t and noise are fed (as test_packing does).
    g = 0
    ar_total, rf_total, repa_total, ar_count = 0.0, 0.0, 0.0, 0
    model.zero_grad(set_to_none=True)
    logits, labels = [], []
    for doc, sl in zip(docs, _doc_slices(docs)):
        is_gen = bool((doc.doc_tasks == Task.GENERATION).any())
        with fixed_drops(step_module, [drops[g:g + 1]] if is_gen else []):
            doc_inputs, doc_ends = prepare_model_inputs(doc, doc.gen_latents, prob, torch.Generator().manual_seed(seed))
        if is_gen:
            # The hidden keys are the prompt of a dropped document, from its own token kinds.
            want = expected_prompt(doc.token_kind, "janusflow") & drops[g]
            assert torch.equal(doc_inputs.hidden_keys, want), desc
            assert torch.equal(inputs.hidden_keys[sl], want), desc
            doc_inputs.gen_z_t, doc_inputs.gen_t = inputs.gen_z_t[g:g + 1], inputs.gen_t[g:g + 1]
            doc_ends = FlowEndpoints(ends.data[g:g + 1], ends.noise[g:g + 1])
        _, out = model(doc_inputs)
        _close(packed.final_hidden[sl], out.final_hidden, "final hidden", desc)
        logits.append(out.logits)
        labels.append(out.labels)
        if is_gen:
            check_prompt_drop_hides(model, doc_inputs, out, bool(drops[g]), desc)
            _close(packed.velocity[g:g + 1], out.velocity, "velocity", desc)
            _close(packed.repa_projected[g:g + 1], out.repa_projected, "REPA projection", desc)
            _close(packed.repa_target[g:g + 1], out.repa_target, "REPA target", desc)
            g += 1
        doc_terms = stage_loss_terms(out, doc_ends, doc_inputs.packing(), norm)
        ar_total = ar_total + doc_terms["ar"].total
        ar_count += doc_terms["ar"].count
        if is_gen:
            rf_total, repa_total = rf_total + doc_terms["rf"].total, repa_total + doc_terms["repa"].total
        doc_total = sum(term.total for term in doc_terms.values())
        doc_total.backward()  # gradients accumulate over the documents
    apart_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    _close(packed.logits, torch.cat(logits), "logits at the targets", desc)
    assert torch.equal(packed.labels, torch.cat(labels)), desc
    _close_loss(terms["ar"].total, ar_total, "L_AR sum", desc)
    assert ar_count == terms["ar"].count, desc
    if n_gen:
        assert terms["rf"].count == terms["repa"].count == n_gen, desc
        _close_loss(terms["rf"].total, rf_total, "L_RF sum", desc)
        _close_loss(terms["repa"].total, repa_total, "L_REPA sum", desc)
    else:
        assert "rf" not in terms and "repa" not in terms, desc
    _close_grads(packed_grads, apart_grads, desc)


# ------------------------------------------------------------------------------------------------
# Janus-Pro


@pytest.fixture(scope="module")
def pro_steps():
    """Janus-Pro's real ``ModelStep`` (prepare: the CFG drop; forward: the loss terms) for both L_AR
    normalisations. The tiny recipe only supplies the step's settings; the model is ``_pro_config``."""
    return {norm: januspro_family.JanusProStep(
        load_recipe("recipes/tiny_januspro_cpu.yaml", [f"loss.ar_normalisation={norm}", "data.prompt_drop_prob=0.5"]),
        None) for norm in ("pooled_tokens", "per_document")}


@pytest.mark.parametrize("seed", [*SEEDS, *SLOW_SEEDS])
def test_januspro_random_packing_equals_documents_apart(pro_model, pro_steps, seed):
    model, cfg = pro_model, pro_model.cfg
    docs, batch, desc = random_packing(cfg, seed)
    norm = ("pooled_tokens", "per_document")[seed % 2]
    step = pro_steps[norm]
    n_gen = sum(int((d.doc_tasks == Task.GENERATION).sum()) for d in docs)
    drops = draw_drops(n_gen, seed)

    with fixed_drops(januspro_family, [drops] if n_gen else []):
        prepared = step.prepare(batch, torch.Generator().manual_seed(seed))
    result = step.forward(model, prepared, None)
    _, packed = model(prepared.inputs)  # the outputs (forward returned only the terms)
    terms = result.terms
    packed_grads = _backward(model, sum(term.total for term in terms.values()))

    expected = expected_counts(docs, norm)
    assert step.unit_counts(batch) == {"ar": expected["ar"], "image": expected["image"]}, desc
    assert terms["ar"].count == expected["ar"], desc

    model.zero_grad(set_to_none=True)
    g, logits, image_logits = 0, [], []
    sums = {"ar": 0.0, "image": 0.0}
    for doc, sl in zip(docs, _doc_slices(docs)):
        is_gen = bool((doc.doc_tasks == Task.GENERATION).any())
        with fixed_drops(januspro_family, [drops[g:g + 1]] if is_gen else []):
            doc_prepared = step.prepare(doc, torch.Generator().manual_seed(seed))
        ids = doc_prepared.inputs.input_ids
        if is_gen:
            # A dropped prompt is overwritten by the pad id (positions kept), from the document's own kinds.
            want = torch.where(expected_prompt(doc.token_kind, "januspro") & drops[g], PAD_ID, doc.input_ids)
            assert torch.equal(ids, want), desc
            g += 1
        assert torch.equal(prepared.inputs.input_ids[sl], ids), desc
        doc_result = step.forward(model, doc_prepared, None)
        _, out = model(doc_prepared.inputs)
        _close(packed.final_hidden[sl], out.final_hidden, "final hidden", desc)
        logits.append(out.logits)
        if out.image_logits is not None:
            image_logits.append(out.image_logits)
        for name, term in doc_result.terms.items():
            sums[name] = sums[name] + term.total
        sum(term.total for term in doc_result.terms.values()).backward()
    apart_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    _close(packed.logits, torch.cat(logits), "logits at the text targets", desc)
    _close_loss(terms["ar"].total, sums["ar"], "L_AR sum", desc)
    if expected["image"]:
        assert terms["image"].count == expected["image"], desc
        _close(packed.image_logits, torch.cat(image_logits), "image logits", desc)
        _close_loss(terms["image"].total, sums["image"], "image loss sum", desc)
    else:
        assert "image" not in terms, desc
    _close_grads(packed_grads, apart_grads, desc)
