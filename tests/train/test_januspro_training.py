"""Janus-Pro through the trainer in a world of one, in this process: the family is picked from the
recipe, a step trains and a resumed run equals the uninterrupted one, the losses equal a plain
re-derivation from the model's logits, the CFG prompt drop writes the pad id where the released
sampler's unconditional row has it, and each training stage trains exactly what the paper names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datacontract.format import Task, TokenKind
from pretrain.families import train_spec_for
from pretrain.families.januspro import JANUSPRO, JanusProStep
from pretrain.recipe import load_recipe
from pretrain.synthetic import make_synthetic_batch
from pretrain.train.trainer import Trainer

RECIPE = "recipes/tiny_januspro_cpu.yaml"


@pytest.fixture
def make_trainer(runtime, tmp_path):
    made = []

    def make(*overrides: str, out: str | None = None) -> Trainer:
        trainer = Trainer(recipe(tmp_path, *overrides, out=out or f"run{len(made)}"))
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.close()


def recipe(tmp_path, *overrides: str, out: str = "run"):
    return load_recipe(RECIPE, [f"train.output_dir={tmp_path / out}", "parallel.global_batch_size=3", *overrides])


def test_the_recipe_family_picks_the_spec(tmp_path):
    assert train_spec_for(recipe(tmp_path)) is JANUSPRO
    assert train_spec_for(load_recipe("recipes/tiny_cpu.yaml")).name == "janusflow"
    assert JANUSPRO.objectives == ("ar", "image")
    assert JANUSPRO.loss_weights(recipe(tmp_path, "loss.image_weight=0.25")) == {"ar": 1.0, "image": 0.25}


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"w.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for i, (param, st) in enumerate(trainer.engine.optimizer.optimizer.state.items()):
        out.update({f"opt.{i}.{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    out.update({f"ema.{n}": v.clone() for n, v in trainer.ema.shadow.items()})
    return out


@pytest.mark.slow  # three trainers (DeepSpeed engines) in a row
def test_a_resumed_run_equals_the_uninterrupted_one(make_trainer):
    straight = make_trainer(out="straight")
    before = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    for _ in range(3):
        assert straight.train_step()
    after = state_of(straight)
    assert all(not torch.equal(p, before[n]) for n, p in straight.model.named_parameters())  # all trained

    first = make_trainer(out="resumed")
    assert first.train_step()
    first.save()
    first.close()
    resumed = make_trainer(out="resumed")
    assert resumed.step == 1
    for _ in range(2):
        assert resumed.train_step()
    again = state_of(resumed)
    assert sorted(again) == sorted(after)
    for key in after:
        assert torch.equal(after[key], again[key]), key


def reference_drop(batch, prob: float, seed: int, pad_id: int) -> torch.Tensor:
    """The released unconditional row, re-derived from the token kinds: in every generation
    document whose draw (``torch.rand < prob``, one per document in order) drops it, the tokens after
    BOS and before ``<begin_of_image>`` (the token before the first code) become ``pad_id``."""
    ids, kinds = batch.input_ids.clone(), batch.token_kind.tolist()
    bounds = batch.cu_seqlens.tolist()
    starts = [(a, kinds.index(TokenKind.GEN_CODE, a, b)) for a, b in zip(bounds[:-1], bounds[1:])
              if TokenKind.GEN_CODE in kinds[a:b]]
    draws = torch.rand(len(starts), generator=torch.Generator().manual_seed(seed)) < prob
    for (doc_start, first_code), dropped in zip(starts, draws.tolist()):
        if dropped:
            ids[doc_start + 1:first_code - 1] = pad_id
    return ids


def test_losses_equal_plain_cross_entropy_and_the_prompt_drop_is_the_released_one(runtime, tmp_path):
    rec = recipe(tmp_path, "data.prompt_drop_prob=0.5")
    step = JanusProStep(rec, None)
    torch.manual_seed(0)
    model = JANUSPRO.build_model(rec, runtime, lambda _: None)
    tasks = [Task.GENERATION, Task.UNDERSTANDING, Task.GENERATION, Task.TEXT, Task.GENERATION, Task.GENERATION]
    batch = make_synthetic_batch(rec.model, tasks, torch.Generator().manual_seed(5))

    prepared = step.prepare(batch, torch.Generator().manual_seed(11))
    expected_ids = reference_drop(batch, 0.5, 11, step.pad_id)
    assert torch.equal(prepared.inputs.input_ids, expected_ids)
    changed = int((expected_ids != batch.input_ids).sum())
    assert changed == 3 * 6  # 3 of the 4 prompts (6 tokens after BOS each) dropped with this seed
    assert torch.equal(prepared.inputs.position_ids, batch.position_ids)  # positions kept

    result = step.forward(model, prepared, None)
    assert result.send is None and set(result.terms) == {"ar", "image"}
    # Re-derivation: the model's final hidden states through the LLM's output layer and the image head
    # at every position, then F.cross_entropy per target, predicted from the position before it.
    _, outputs = model(prepared.inputs)
    final, ids, kinds = outputs.final_hidden, prepared.inputs.input_ids, batch.token_kind
    text_logits, image_logits = model.llm.compute_logits(final), model.gen_head(final)
    bounds = batch.cu_seqlens.tolist()
    ar, image, n_ar, n_image = 0.0, 0.0, 0, 0
    per_doc: dict[int, list[float]] = {}  # text-target losses by document
    for i in range(1, len(ids)):
        doc = int(np.searchsorted(bounds, i, side="right")) - 1
        if i == bounds[doc] or not batch.target_mask[i]:
            continue
        if kinds[i] == TokenKind.GEN_CODE:
            image += F.cross_entropy(image_logits[i - 1].double(), ids[i]).item()
            n_image += 1
        else:
            loss = F.cross_entropy(text_logits[i - 1].double(), ids[i]).item()
            ar, n_ar = ar + loss, n_ar + 1
            per_doc.setdefault(doc, []).append(loss)
    assert (result.terms["ar"].count, result.terms["image"].count) == (n_ar, n_image)
    assert step.unit_counts(batch) == {"ar": n_ar, "image": n_image}
    assert n_image == 4 * 16
    # float32 sums vs the float64 re-derivation: measured 2.2e-8 (ar, 8 targets) and 3.7e-8 (image, 64).
    assert result.terms["ar"].total.item() == pytest.approx(ar, rel=3e-7)
    assert result.terms["image"].total.item() == pytest.approx(image, rel=3e-7)
    assert result.terms["image"].total.dtype == torch.float32

    # loss.ar_normalisation per_document: each document with text targets counts once (its mean).
    step.recipe = recipe(tmp_path, "data.prompt_drop_prob=0.5", "loss.ar_normalisation=per_document")
    term = step.forward(model, prepared, None).terms["ar"]
    assert term.count == step.unit_counts(batch)["ar"] == len(per_doc) == 2  # the understanding and text documents
    assert term.total.item() == pytest.approx(sum(sum(v) / len(v) for v in per_doc.values()), rel=3e-7)


def test_batches_without_codes_or_images_reach_every_trainable_parameter(runtime, tmp_path):
    rec = recipe(tmp_path)
    model = JANUSPRO.build_model(rec, runtime, lambda _: None)
    step = JanusProStep(rec, None)
    batch = make_synthetic_batch(rec.model, [Task.TEXT, Task.TEXT], torch.Generator().manual_seed(1))
    result = step.forward(model, step.prepare(batch, torch.Generator()), None)
    assert set(result.terms) == {"ar"}
    result.terms["ar"].total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # zero-touch: the same gradient buckets on every rank


# Janus-Pro paper, Sec. 2.2: "Stage I focuses on training the adaptors and the image head" (the
# image-code embedding table, which feeds the generation adaptor, is as new: pretrain.model.trainable);
# "Stage II ... all components except the understanding encoder and the generation encoder" (the VQ
# generation encoder is not part of the trained model: shards hold its codes); "Stage III ...
# further unlocking the parameters of the understanding encoder".
PAPER_TRAINABLE = {
    "new_modules": {"und_aligner", "gen_embed", "gen_aligner", "gen_head"},
    "all_but_und_encoder": {"llm", "und_aligner", "gen_embed", "gen_aligner", "gen_head"},
    "all": {"llm", "und_encoder", "und_aligner", "gen_embed", "gen_aligner", "gen_head"},
}


@pytest.mark.parametrize("trainable", sorted(PAPER_TRAINABLE))
def test_each_stage_trains_the_papers_modules_and_leaves_the_rest_bit_identical(make_trainer, trainable):
    trainer = make_trainer(f"train.trainable={trainable}")
    trained = {n.split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == PAPER_TRAINABLE[trainable]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.train_step()
    for name, param in trainer.model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == (name.split(".")[0] in PAPER_TRAINABLE[trainable]), name


def test_host_side_accounting_reads_the_metadata(tmp_path):
    rec = recipe(tmp_path)
    step = JanusProStep(rec, None)
    batch = make_synthetic_batch(rec.model, [Task.GENERATION, Task.TEXT], torch.Generator().manual_seed(2))
    assert step.task_counts(batch) == {"understanding": 0, "generation": 1, "text": 1}
    assert step.flops(batch) > 0
    n_codes = int(np.count_nonzero(batch.token_kind.numpy() == TokenKind.GEN_CODE))
    assert step.unit_counts(batch)["image"] == n_codes == 16
