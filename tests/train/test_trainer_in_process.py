"""The trainer's step in a world of one, in this process (no launcher): a skipped step changes
nothing, the EMA follows its definition, and each training stage trains exactly the modules the paper
names, leaving the others bit-identical."""

from __future__ import annotations


import pytest
import torch

from pretrain.losses import LossTerm
from pretrain.train.trainer import Trainer

def poison_next_step(trainer: Trainer, monkeypatch) -> None:
    """Make every loss term of the next step NaN (its gradients are then NaN too)."""
    forward = trainer.step_fn.forward

    def poisoned(model, prepared, received):
        result = forward(model, prepared, received)
        result.terms = {k: LossTerm(t.total * float("nan"), t.count) for k, t in result.terms.items()}
        return result

    monkeypatch.setattr(trainer.step_fn, "forward", poisoned)


def tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor in a nested state (dicts, lists), cloned, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors_of(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def snapshot(trainer: Trainer) -> dict[str, list[torch.Tensor]]:
    return {
        "weights": tensors_of(dict(trainer.model.named_parameters())),
        "optimizer": tensors_of(trainer.engine.optimizer.state_dict()),
        "ema": tensors_of(trainer.ema.shadow),
    }


def test_a_skipped_step_leaves_weights_optimizer_and_ema_bit_identical(make_trainer, monkeypatch):
    trainer = make_trainer()
    assert trainer.train_step() and trainer.train_step()
    before = snapshot(trainer)
    poison_next_step(trainer, monkeypatch)
    assert trainer.train_step() is False
    assert trainer.skipped_total == 1
    after = snapshot(trainer)
    for part in before:
        assert len(before[part]) == len(after[part]) > 0
        for a, b in zip(before[part], after[part]):
            assert torch.equal(a, b), part


def test_ema_follows_its_definition_over_steps_with_a_skipped_one(make_trainer, monkeypatch):
    decay = 0.9
    trainer = make_trainer(f"train.ema_decay={decay}")
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    # e_0 = initial weights; after every applied update e <- decay * e + (1 - decay) * w (float64 here).
    reference = {n: p.detach().double().clone() for n, p in params.items()}
    for step in range(4):
        if step == 2:
            poison_next_step(trainer, monkeypatch)
        applied = trainer.train_step()
        monkeypatch.undo()
        assert applied == (step != 2)
        if applied:
            for n, p in params.items():
                reference[n] = decay * reference[n] + (1 - decay) * p.detach().double()
    worst = max(float((trainer.ema.shadow[n].double() - reference[n].reshape(-1)).abs().max()) for n in params)
    # float32 running average vs float64 re-derivation: rounding only (measured 1.3e-7).
    assert worst < 3e-7, worst


# From the JanusFlow paper, section 3.3: stage 1 trains "only the randomly initialized components: the
# linear layers, generation encoder, and generation decoder" (the understanding aligner and the
# begin-of-image embedding are new linear/embedding parameters; the REPA projector is ours and new);
# stage 2 trains "the entire model except for the visual encoder" (SigLIP); stage 3 "also unfreezes
# the SigLIP encoder".
PAPER_TRAINABLE = {
    "new_modules": {"und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner", "gen_dec_aligner_norm",
                    "gen_dec_aligner", "gen_decoder", "repa_projector"},
    "all_but_und_encoder": {"llm", "und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner",
                            "gen_dec_aligner_norm", "gen_dec_aligner", "gen_decoder", "repa_projector"},
    "all": {"llm", "und_encoder", "und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner",
            "gen_dec_aligner_norm", "gen_dec_aligner", "gen_decoder", "repa_projector"},
}


@pytest.mark.parametrize("trainable", sorted(PAPER_TRAINABLE))
def test_stage_trainable_sets_are_the_papers(trainable, runtime, tiny_model_config):
    from pretrain.model.janusflow import JanusFlowModel

    model = JanusFlowModel(tiny_model_config())
    model.set_trainable(trainable)
    modules = {name.split(".")[0] for name, _ in model.named_parameters()}
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert trained == PAPER_TRAINABLE[trainable]
    assert frozen == modules - PAPER_TRAINABLE[trainable]  # no module is half trained


def test_stage_one_changes_only_the_new_modules(make_trainer):
    trainer = make_trainer("train.trainable=new_modules")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.train_step()
    changed = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    unchanged_frozen = all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()
                           if n.split(".")[0] not in PAPER_TRAINABLE["new_modules"])
    assert unchanged_frozen
    assert changed and changed <= PAPER_TRAINABLE["new_modules"]


def test_shards_with_latents_train_without_loading_a_vae(make_trainer, monkeypatch):
    """An SDXL-VAE recipe whose batches carry latents (precomputed in the shards; here synthetic)
    never builds the VAE: no diffusers weights are needed to train."""
    from pretrain.model import latent_codec

    def refuse(*_args, **_kwargs):
        raise AssertionError("the trainer built the SDXL-VAE although every batch carries latents")

    monkeypatch.setattr(latent_codec.SDXLVAECodec, "__init__", refuse)
    trainer = make_trainer("model.gen_vision.latent_codec=sdxl_vae", "model.gen_vision.latent_scale=0.13025",
                           "train.image_interval=1")
    assert trainer.train_step()
    trainer.sample_grid.maybe_log(1, trainer.model, trainer.ema, trainer.monitor)  # off: nothing to decode with
    assert not trainer.sample_grid.enabled


def test_an_update_that_would_make_weights_nonfinite_is_skipped(make_trainer):
    """A damaged optimizer state (a negative second moment: sqrt < 0) with finite gradients: the
    update would be NaN. The step is skipped like a NaN gradient and the weights stay as they were."""
    trainer = make_trainer()
    assert trainer.train_step()
    inner = trainer.engine.optimizer.optimizer
    for state in inner.state.values():
        state["exp_avg_sq"].fill_(-1.0)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ema = {n: v.clone() for n, v in trainer.ema.shadow.items()}
    assert trainer.train_step() is False
    assert trainer.skipped_total == 1
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(v, ema[n]) for n, v in trainer.ema.shadow.items())
    assert all(torch.isfinite(p).all() for g in inner.param_groups for p in g["params"])


# bf16 (DeepSpeed's BF16 optimizer: bf16 weights, fp32 masters and fp32 gradient accumulation) runs
# the same path on the CPU as on a GPU, only slower.
@pytest.mark.parametrize("global_batch", [2, 4])
def test_bf16_gradient_accumulation_matches_fp32(make_trainer, global_batch):
    norms = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(f"train.precision={precision}", f"parallel.global_batch_size={global_batch}")
        assert trainer.train_step()
        norms[precision] = float(trainer.engine.get_global_grad_norm())
    # bf16 forward/backward rounding only (measured 7.3e-4 relative at 2 micro-steps, 3.3e-4 at 4); a
    # micro-batch counted twice would be off by tens of percent.
    assert abs(norms["bf16"] - norms["fp32"]) <= 3e-3 * norms["fp32"], norms


def test_bf16_ema_averages_the_fp32_masters(make_trainer, monkeypatch):
    decay = 0.5
    trainer = make_trainer("train.precision=bf16", f"train.ema_decay={decay}")
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    masters = lambda: {n: p._hp_mapping.hp_fragment.detach().double().clone() for n, p in params.items()}  # noqa: E731
    weights = lambda: {n: p.detach().double().reshape(-1).clone() for n, p in params.items()}  # noqa: E731
    of_masters, of_weights = masters(), weights()
    for step in range(3):
        if step == 1:
            poison_next_step(trainer, monkeypatch)
        applied = trainer.train_step()
        monkeypatch.undo()
        assert applied == (step != 1)  # the NaN step is skipped under bf16 too
        if applied:
            m, w = masters(), weights()
            of_masters = {n: decay * of_masters[n] + (1 - decay) * m[n] for n in params}
            of_weights = {n: decay * of_weights[n] + (1 - decay) * w[n] for n in params}
    gap = lambda ref: max(float((trainer.ema.shadow[n].double() - ref[n]).abs().max()) for n in params)  # noqa: E731
    # The EMA is the fp32 running average of the fp32 masters (rounding only, measured 9e-8), not of the
    # bf16-rounded weights (measured 8.8e-4 away from that).
    assert gap(of_masters) < 3e-7, gap(of_masters)
    assert gap(of_weights) > 1e-4, gap(of_weights)


def test_the_learning_rate_warms_up_stays_then_decays_linearly_to_the_last_step(make_trainer):
    peak, warmup, decay, steps = 1e-3, 2, 3, 7
    trainer = make_trainer(f"optim.lr={peak}", f"optim.warmup_steps={warmup}", f"optim.decay_steps={decay}",
                           f"optim.steps={steps}")
    used = []
    for _ in range(steps):
        used.append(trainer.engine.get_lr()[0])  # what the optimizer applies in this step
        trainer.train_step()
    # Re-derived: (k+1)/warmup for k < warmup, then 1, then (steps-k)/decay over the last `decay` steps.
    expected = [peak * m for m in (1 / 2, 2 / 2, 1, 1, 3 / 3, 2 / 3, 1 / 3)]
    assert used == pytest.approx(expected, rel=1e-12)
