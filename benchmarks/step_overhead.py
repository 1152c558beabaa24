"""Host round trips and kernel launches of one training micro-step, next to plain transformers Llama.

Ours: the JanusFlow-1.3B *structure* at tiny widths (24 LLM layers with 16 heads, REPA after block
6, SigLIP with its 24 layers, the generation encoder/decoder with the 24x24 latent grid), on one
packed micro-batch of 4,096 tokens: 5 generation documents and 1 text document, built by the
loader's own collate (``pretrain.data.batch.collate_packed``). One micro-step as the trainer runs it:
``prepare_model_inputs`` -> model -> ``stage_loss_terms`` -> ``combine_losses`` -> backward, in a
world of one. Baseline: ``transformers.LlamaForCausalLM`` of the same LLM shape (SDPA attention) on
the same 4,096 token ids and positions, as one causal sequence, loss on every token.

Counted exactly (``benchmarks/op_counts.py``), forward and backward apart:
- syncs: value reads into Python and ops whose output shape depends on data (device-to-host waits);
- launches: non-view ATen ops (one or more kernels each on a GPU).
Exact counts do not depend on the load of the machine: quote these, not times. The forward launches
are also broken down by module, which shows what Llama does not have (SigLIP, ConvNeXt heads).

Usage: python benchmarks/step_overhead.py [--json] [--device cpu|cuda] [--dtype fp32|bf16]
Targets (issue #10): at most 4 syncs per micro-step (fwd + bwd), at most 1.3x Llama's launches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from benchmarks.op_counts import OpCounts, count_ops, tag_modules  # noqa: E402
from pretrain.cli_args import finite_number, whole_number  # noqa: E402

SEQ_LEN = 4096
N_GEN = 5
PROMPT_LEN = 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def structure_config(layers: int = 24, heads: int = 16, siglip_layers: int = 24, repa_layer: int = 6):
    """The 1.3B structure at tiny widths: the same number of layers, heads and tokens per image."""
    from pretrain.model.config import (
        GenerationVisionConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig,
    )

    return ModelConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=4 * heads, ffn_hidden_size=8 * heads, num_layers=layers,
                      num_attention_heads=heads),
        und_encoder=UnderstandingEncoderConfig(image_size=384, patch_size=16, hidden_size=32, intermediate_size=64,
                                               num_layers=siglip_layers, num_attention_heads=16),
        gen_vision=GenerationVisionConfig(latent_size=48, patch_size=2, channels=16, num_blocks=2, time_embed_dim=16),
        repa=RepaConfig(layer=repa_layer, projector_hidden_size=32),
    )


def build_packed_batch(cfg, seq_len: int = SEQ_LEN, n_gen: int = N_GEN, prompt_len: int = PROMPT_LEN, seed: int = 0):
    """One packed micro-batch through the loader's collate: ``n_gen`` generation documents
    (BOS, prompt, time token, latent grid, end-of-image) and one text document filling ``seq_len``."""
    from pretrain.data.batch import PackedRow, collate_packed
    from datacontract.format import Task, TokenKind

    rng = np.random.default_rng(seed)
    grid = cfg.gen_vision.num_latent_tokens
    gen_doc = [TokenKind.TEXT] * (1 + prompt_len) + [TokenKind.GEN_TIME] + [TokenKind.GEN_LATENT] * grid + [TokenKind.TEXT]
    text_len = seq_len - n_gen * len(gen_doc)
    if text_len < 2:
        raise ValueError(f"{n_gen} generation documents of {len(gen_doc)} tokens do not fit in {seq_len}")
    kinds = np.array([int(k) for k in gen_doc] * n_gen + [int(TokenKind.TEXT)] * text_len, dtype=np.uint8)
    targets = np.array([0] * (n_gen * len(gen_doc)) + [0] + [1] * (text_len - 1), dtype=bool)
    res, gv = cfg.und_encoder.image_size, cfg.gen_vision
    row = PackedRow(
        input_ids=rng.integers(0, cfg.llm.vocab_size, seq_len).astype(np.int64),
        token_kind=kinds,
        target_mask=targets,
        doc_lengths=np.array([len(gen_doc)] * n_gen + [text_len], dtype=np.int64),
        doc_tasks=np.array([int(Task.GENERATION)] * n_gen + [int(Task.TEXT)], dtype=np.int64),
        und_images=[],
        gen_images=[rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(n_gen)],
        gen_latents=[rng.standard_normal((gv.latent_channels, gv.latent_size, gv.latent_size)).astype(np.float32)
                     for _ in range(n_gen)],
        resolution=res,
        latent_shape=(gv.latent_channels, gv.latent_size, gv.latent_size),
    )
    return collate_packed([row])


def count_ours(cfg, batch, device, dtype, drop_prob: float, seed: int = 3) -> tuple[OpCounts, dict]:
    from pretrain.losses import combine_losses
    from pretrain.model.janusflow import JanusFlowModel
    from pretrain.step import batch_unit_counts, prepare_model_inputs, stage_loss_terms

    torch.manual_seed(0)
    model = JanusFlowModel(cfg, params_dtype=dtype).to(device)
    model.set_trainable("all_but_und_encoder")
    weights = {"ar": 1.0, "rf": 1.0, "repa": 1.0}
    batch = batch.to(device)
    latents = batch.gen_latents * cfg.gen_vision.latent_scale

    accounting = OpCounts(phase="accounting")
    with count_ops(accounting):
        counts = batch_unit_counts(batch)
    # The trainer all-reduces the counts of the whole step once; a world of one keeps them as they are.
    global_counts = {k: float(v) for k, v in counts.items()}

    def step(counts_into: OpCounts | None):
        gen = torch.Generator().manual_seed(seed)
        ctx = count_ops(counts_into) if counts_into is not None else _null()
        modules = list(model.named_children())
        modules += [("llm core attention", m) for name, m in model.named_modules() if name.endswith("core_attention")]
        with ctx, (tag_modules(counts_into, modules) if counts_into is not None else _null()):
            inputs, target = prepare_model_inputs(batch, latents, drop_prob, gen)
            _, outputs = model(inputs)
            terms = stage_loss_terms(outputs, target)
            loss, _ = combine_losses(terms, weights, global_counts, grad_scale=1.0)
            if counts_into is not None:
                counts_into.phase = "bwd"
            loss.backward()
        model.zero_grad(set_to_none=True)
        hidden = inputs.hidden_keys
        return {"hidden_prompt_tokens": 0 if hidden is None else int(hidden.sum())}

    step(None)  # warm-up: lazy initialisation (caches, compiled kernels) is not a per-step cost
    counts_ours = OpCounts(phase="fwd")
    info = step(counts_ours)
    info["accounting_syncs"] = accounting.total_syncs()
    info["accounting_launches"] = accounting.total_launches()
    info["accounting_sync_ops"] = dict(accounting.syncs.get("accounting", {}))
    return counts_ours, info


def count_llama(cfg, batch, device, dtype) -> OpCounts:
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = cfg.llm
    config = LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.query_groups, rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta,
        max_position_embeddings=SEQ_LEN, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    ids = batch.input_ids[None].to(device)
    positions = batch.position_ids[None].to(device)

    def step(counts_into: OpCounts | None):
        with count_ops(counts_into) if counts_into is not None else _null():
            with tag_modules(counts_into, {"llm": model.model, "lm_head": model.lm_head}) if counts_into else _null():
                loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
            if counts_into is not None:
                counts_into.phase = "bwd"
            loss.backward()
        model.zero_grad(set_to_none=True)

    step(None)
    counts = OpCounts(phase="fwd")
    step(counts)
    return counts


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def summarise(counts: OpCounts) -> dict:
    return {
        "syncs_fwd": counts.total_syncs("fwd"), "syncs_bwd": counts.total_syncs("bwd"),
        "launches_fwd": counts.total_launches("fwd"), "launches_bwd": counts.total_launches("bwd"),
        "sync_ops": {p: dict(c) for p, c in counts.syncs.items()},
        "launches_fwd_by_module": dict(counts.launches_by_module.get("fwd", {})),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Bad values are refused here with one error line: a device name torch does not know, CUDA on a
    # host without it, a probability outside [0, 1] (NaN too) and threads < 1 were tracebacks.
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the micro-step runs (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype (default fp32)")
    parser.add_argument("--drop-prob", type=finite_number(0.0, 1.0), default=0.5,
                        help="CFG prompt drop probability (hidden keys), 0 to 1 (default 0.5)")
    parser.add_argument("--threads", type=whole_number(1), default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda: torch sees no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    from pretrain.runtime.distributed import init_runtime, shutdown_runtime

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    # With --json, stdout carries only the JSON: what the libraries print (DeepSpeed's extension
    # build, from C++ too) goes to stderr meanwhile.
    with _stdout_to_stderr(args.json):
        init_runtime(seed=1234)
        try:
            cfg = structure_config()
            batch = build_packed_batch(cfg)
            ours, info = count_ours(cfg, batch, device, dtype, args.drop_prob)
            llama = count_llama(cfg, batch, device, dtype)
        finally:
            shutdown_runtime()
    result = {
        "structure": {"layers": cfg.llm.num_layers, "heads": cfg.llm.num_attention_heads, "repa_layer": cfg.repa.layer,
                      "siglip_layers": cfg.und_encoder.num_layers, "tokens": batch.num_tokens,
                      "documents": int(len(batch.cu_seqlens) - 1), "generation_documents": N_GEN,
                      "device": str(device), "dtype": args.dtype},
        "ours": {**summarise(ours), **info},
        "llama": summarise(llama),
    }
    o, l_ = result["ours"], result["llama"]
    launches_o = o["launches_fwd"] + o["launches_bwd"]
    launches_l = l_["launches_fwd"] + l_["launches_bwd"]
    result["launch_ratio"] = launches_o / launches_l
    result["syncs_per_micro_step"] = o["syncs_fwd"] + o["syncs_bwd"]
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return result
    s = result["structure"]
    print(f"one micro-step: {s['tokens']} tokens, {s['documents']} documents ({s['generation_documents']} generation), "
          f"{s['layers']} layers x {s['heads']} heads, REPA at block {s['repa_layer']}, SigLIP {s['siglip_layers']} layers, "
          f"{s['device']} {s['dtype']}; hidden prompt tokens {o['hidden_prompt_tokens']}")
    print(f"{'':24}{'syncs fwd':>10}{'syncs bwd':>10}{'launch fwd':>12}{'launch bwd':>12}{'launches':>10}")
    for name, c in (("ours (JanusFlow step)", o), ("transformers Llama", l_)):
        print(f"{name:24}{c['syncs_fwd']:>10}{c['syncs_bwd']:>10}{c['launches_fwd']:>12}{c['launches_bwd']:>12}"
              f"{c['launches_fwd'] + c['launches_bwd']:>10}")
    print(f"launch ratio ours / Llama: {result['launch_ratio']:.2f}x (target <= 1.3x); "
          f"syncs per micro-step: {result['syncs_per_micro_step']} (target <= 4)")
    print(f"trainer accounting (batch_unit_counts): {o['accounting_syncs']} syncs, {o['accounting_launches']} launches")
    for name, c in (("ours", o), ("llama", l_)):
        if c["sync_ops"]:
            print(f"{name} sync ops: " + "; ".join(f"{p}: " + ", ".join(f"{k} x{v}" for k, v in ops.items())
                                                  for p, ops in c["sync_ops"].items()))
    print("forward launches by module (ours): " + ", ".join(
        f"{k} {v}" for k, v in sorted(o["launches_fwd_by_module"].items(), key=lambda kv: -kv[1])))
    print("forward launches by module (llama): " + ", ".join(
        f"{k} {v}" for k, v in sorted(l_["launches_fwd_by_module"].items(), key=lambda kv: -kv[1])))
    return result


if __name__ == "__main__":
    main()
