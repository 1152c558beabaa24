"""Worker for the multi-process parity tests, launched by torchrun from test_parallel.py (the reference
runs ``run`` in the test process, in that process's runtime).

Modes:
  reference  one process: build the tiny model, save its full weights, the batch and, after one
             forward/backward, the loss, outputs and every parameter's gradient.
  tp         tensor_parallel = world size: load the reference weights (sharded by our converter),
             run the same batch, save this rank's loss, outputs and local gradients.
  pp         pipeline_parallel = world size (2): stage 0 sends (hidden, skip, t_emb) to stage 1,
             which computes the losses; gradients flow back by send/recv (a one-micro-batch
             pipeline: the DeepSpeed engine does the real schedule).
  dp         data parallel = world size: save the freshly built weights (seeded alike on every rank),
             then, as the control that proves the check can fail, weights built after seeding each
             rank differently.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from datacontract.format import Task
from pretrain.losses import combine_losses
from pretrain.model.config import (
    GenerationVisionConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig,
)
from pretrain.model.janusflow import JanusFlowModel, StageActivations
from pretrain.runtime.distributed import init_runtime, shutdown_runtime
from pretrain.step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from pretrain.synthetic import make_synthetic_batch

WEIGHTS = {"ar": 1.0, "rf": 1.0, "repa": 1.0}


def tiny_config() -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_layers=4,
                      num_attention_heads=4, num_query_groups=2),
        und_encoder=UnderstandingEncoderConfig(image_size=32, patch_size=8, hidden_size=32,
                                               intermediate_size=64, num_layers=1, num_attention_heads=2),
        gen_vision=GenerationVisionConfig(latent_size=8, patch_size=2, channels=16, num_blocks=1, time_embed_dim=16),
        repa=RepaConfig(layer=2, projector_hidden_size=32),
    )


def make_inputs(cfg: ModelConfig):
    batch = make_synthetic_batch(
        cfg, [Task.UNDERSTANDING, Task.GENERATION, Task.TEXT, Task.GENERATION], torch.Generator().manual_seed(7)
    )
    # prompt_drop_prob 0.5 with this seed hides one of the two prompts: hidden keys are exercised.
    inputs, target = prepare_model_inputs(batch, batch.gen_latents, 0.5, torch.Generator().manual_seed(11))
    return batch, inputs, target


def grads_of(model) -> dict[str, torch.Tensor]:
    return {f"grad/{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(mode: str, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = world if mode == "tp" else 1
    pp = world if mode == "pp" else 1
    rt = init_runtime(tensor_parallel=tp, pipeline_parallel=pp, seed=1234)
    cfg = tiny_config()
    model = JanusFlowModel(cfg, pre_process=rt.is_first_stage, post_process=rt.is_last_stage)
    meta = {"rank": rt.rank, "tp_rank": rt.tp_rank, "tp_size": rt.tp_size, "pp_rank": rt.pp_rank,
            "layer_numbers": model.llm.layer_numbers, "pre": model.pre_process, "post": model.post_process}
    (out / f"meta{rt.rank}.json").write_text(json.dumps(meta))

    if mode == "dp":
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, out / f"rank{rt.rank}.safetensors")
        init_runtime(seed=1000 + rt.rank)  # the runtime stands: this only reseeds, differently per rank
        unseeded = JanusFlowModel(cfg)
        save_file({n: p.detach().contiguous() for n, p in unseeded.named_parameters()},
                  out / f"unseeded_rank{rt.rank}.safetensors")
        return

    if mode == "reference":
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, out / "full_weights.safetensors")
    else:
        from pretrain.convert.state import load_model_state

        load_model_state(model, load_file(out / "full_weights.safetensors"), layout=rt)

    batch, inputs, target = make_inputs(cfg)
    counts = batch_unit_counts(batch)
    result: dict[str, torch.Tensor] = {}
    if mode in ("reference", "tp"):
        _, outputs = model(inputs)
        loss, _ = combine_losses(stage_loss_terms(outputs, target), WEIGHTS, counts)
        loss.backward()
        result.update(loss=loss.detach().reshape(1), velocity=outputs.velocity.detach(),
                      logits=outputs.logits.detach(), hidden=outputs.final_hidden.detach())
    else:  # pp, two stages
        from megatron.core import parallel_state as ps

        if rt.is_first_stage:
            activations, outputs = model(inputs)
            terms = stage_loss_terms(outputs, target)
            loss, _ = combine_losses(terms, WEIGHTS, counts)
            sent = [activations.hidden, activations.gen_skip, activations.gen_t_emb]
            for tensor in sent:
                torch.distributed.send(tensor.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in sent]  # p2p: contiguous only
            for g in grads:
                torch.distributed.recv(g, ps.get_pipeline_model_parallel_next_rank())
            torch.autograd.backward(sent + [loss], grads + [torch.ones_like(loss)])
            result["loss"] = loss.detach().reshape(1)
        else:
            n_gen = len(inputs.gen_z_t)
            gv = cfg.gen_vision
            side = gv.latent_size // gv.patch_size
            shapes = [(len(inputs.input_ids), 1, cfg.llm.hidden_size), (n_gen, gv.channels, side, side),
                      (n_gen, cfg.llm.hidden_size)]
            received = [torch.empty(s) for s in shapes]
            for tensor in received:
                torch.distributed.recv(tensor, ps.get_pipeline_model_parallel_prev_rank())
                tensor.requires_grad_(True)
            _, outputs = model(inputs, StageActivations(*received))
            loss, _ = combine_losses(stage_loss_terms(outputs, target), WEIGHTS, counts)
            loss.backward()
            for tensor in received:
                torch.distributed.send(tensor.grad.contiguous(), ps.get_pipeline_model_parallel_prev_rank())
            result.update(loss=loss.detach().reshape(1), velocity=outputs.velocity.detach(),
                          logits=outputs.logits.detach(), hidden=outputs.final_hidden.detach())
    result.update(grads_of(model))
    save_file({k: v.contiguous() for k, v in result.items()}, out / f"{mode}_rank{rt.rank}.safetensors")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["reference", "tp", "pp", "dp"])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.mode, args.out)
    shutdown_runtime()
