"""Benchmark the fused kernels against eager PyTorch and torch.compile of the reference, in one run.

    python benchmarks/kernels_bench.py                   # GPU: JanusFlow-1.3B shapes, bf16
    python benchmarks/kernels_bench.py --peak-gbps 3350  # override the peak bandwidth
    python benchmarks/kernels_bench.py --only rms_norm,grn --fwd-only --no-compile
    python benchmarks/kernels_bench.py --json kernels.json   # also the rows as JSON (rewritten per row)

Prints one row per (op, pass, implementation): median time, achieved bandwidth and its fraction
of the device's peak, and the speed-up over eager. Bandwidth counts the bytes the FUSED kernel has to
move (listed per op below, e.g. GRN reads x twice); the same byte count is used for every
implementation, so for eager and compiled it is an effective bandwidth. Targets from issues #5 and
#15: >= 1.5x over eager and >= 70% of peak bandwidth; the script reports them and asserts nothing.

The rule of issue #15: an op whose Triton kernel is slower than torch.compile of its reference (on
the pass training or sampling runs: forward + backward where there is a backward) is named under
"slower than torch.compile", with the line to change in ``fused_kernels/dispatch.py`` (``CUDA_CHOICE``);
``verdicts`` in the JSON holds the decision per op. Op names are those of ``CUDA_CHOICE``.

On a machine without a GPU it runs small shapes on the CPU, times eager and torch.compile only
and says so ("no GPU: skipping Triton timings"); the Triton interpreter is not a benchmark.
``--budget`` stops starting new rows once that many seconds have passed (compiling the references
is most of the time), so a time-limited caller keeps the rows finished; ops run in the order below,
the velocity head's first.

Shapes: the JanusFlow-1.3B defaults of ``pretrain.model.config`` (48x48x4 SDXL latent patchified by
2 into a 24x24 grid, generation width 768 in the encoder and 1536 in the decoder, MLP 4x, REPA on
576 positions x 1024 SigLIP-L features) for ``--batch`` generation samples: by default the 5 of one
micro-step of 4,096 packed tokens (as ``benchmarks/step_overhead.py`` packs it). At these sizes a
latent-sized op moves well under 1 MB per tensor, so its time is launch latency and its fraction of
the peak bandwidth is small for every implementation; ``--batch 32`` shows the bandwidth regime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_kernels import (  # noqa: E402
    cfg_euler_step, flow_interpolate, grn, kernel_backend, modulate, repa_cosine, rf_loss_per_sample, rms_norm,
)
from fused_kernels import reference as ref  # noqa: E402
from fused_kernels.dispatch import CUDA_CHOICE, triton_available  # noqa: E402
from pretrain.cli_args import finite_number, output_file, whole_number  # noqa: E402
from pretrain.model.config import ModelConfig  # noqa: E402

# Peak HBM bandwidth in GB/s, matched by substring of torch.cuda.get_device_name (first match wins).
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 2039.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100", 1555.0),  # 40GB
]


def peak_bandwidth(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


@dataclass
class Case:
    """One kernel: inputs, the fused op, the reference, and the bytes the fused kernel moves."""

    name: str
    make: Callable[[], tuple]  # -> (inputs tuple, indices of inputs that get gradients)
    fused: Callable
    reference: Callable
    bytes_fwd: int
    bytes_bwd: int  # 0: no backward (sampling / data ops)


# The ops build_cases times, in its order (what --only accepts).
OP_NAMES = ("flow_interpolate", "rf_loss", "repa_cosine", "cfg_euler_step", "rms_norm", "grn", "modulate")


def build_cases(device: torch.device, dtype: torch.dtype, batch: int, small: bool) -> list[Case]:
    """The ops in the order they are timed: the velocity head's (flow, REPA, sampler) first."""
    gv, und = ModelConfig().gen_vision, ModelConfig().und_encoder  # the 1.3B defaults
    side = 6 if small else gv.latent_size // gv.patch_size  # latent grid after the patchify
    enc, dec = (32, 64) if small else (gv.channels, 2 * gv.channels)  # decoder: LLM features + skip
    lat = (gv.latent_channels, gv.patch_size * side, gv.patch_size * side)
    repa_dim = 64 if small else und.hidden_size
    e = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device, dt)

    cases = []

    # z_t (float32 data and noise, model-dtype output)
    n = batch * lat[0] * lat[1] * lat[2]
    t = torch.rand(batch, generator=gen).to(device)
    cases.append(Case(
        "flow_interpolate",
        lambda: ((randn(batch, *lat, dt=torch.float32), randn(batch, *lat, dt=torch.float32), t), ()),
        lambda x, z0, tt: flow_interpolate(x, z0, tt, dtype),
        lambda x, z0, tt: ref.flow_interpolate_reference(x, z0, tt, dtype),
        bytes_fwd=n * (4 + 4 + e), bytes_bwd=0,
    ))

    # L_RF from (v, x, z0): v in the model dtype, data and noise float32
    cases.append(Case(
        "rf_loss",
        lambda: ((randn(batch, *lat), randn(batch, *lat, dt=torch.float32), randn(batch, *lat, dt=torch.float32)),
                 (0,)),
        rf_loss_per_sample,
        ref.rf_loss_per_sample_reference,
        bytes_fwd=n * (e + 4 + 4 + 4), bytes_bwd=n * (4 + e),
    ))

    # REPA cosine on [B, 576, 1024] (its backward included: the loss's gradient)
    n = batch * side * side * repa_dim
    cases.append(Case(
        "repa_cosine",
        lambda: ((randn(batch, side * side, repa_dim), randn(batch, side * side, repa_dim)), (0,)),
        repa_cosine,
        ref.repa_cosine_reference,
        bytes_fwd=2 * n * e, bytes_bwd=3 * n * e,
    ))

    # CFG + Euler at sampling: float32 z, model-dtype velocities from one batched forward
    n = batch * lat[0] * lat[1] * lat[2]
    cases.append(Case(
        "cfg_euler_step",
        lambda: ((randn(batch, *lat, dt=torch.float32), randn(2 * batch, *lat)), ()),
        lambda z, v: cfg_euler_step(z, *v.chunk(2), 2.0, 0.04),
        lambda z, v: ref.cfg_euler_step_reference(z, *v.chunk(2), 2.0, 0.04),
        bytes_fwd=n * (4 + 2 * e + 4), bytes_bwd=0,
    ))

    # RMSNorm on dwconv(x).permute(0, 2, 3, 1) (decoder width), as in ConvNeXtBlock
    n = batch * side * side * dec
    cases.append(Case(
        "rms_norm",
        lambda: ((randn(batch, dec, side, side), 1 + 0.1 * randn(dec)), (0, 1)),
        lambda x, w: rms_norm(x.permute(0, 2, 3, 1), w, 1e-6),
        lambda x, w: ref.rms_norm_reference(x.permute(0, 2, 3, 1), w, 1e-6),
        bytes_fwd=2 * n * e, bytes_bwd=3 * n * e,
    ))

    # GRN on the MLP activations [B, H, W, 4C] (encoder width)
    n = batch * side * side * 4 * enc
    cases.append(Case(
        "grn",
        lambda: ((randn(batch, side, side, 4 * enc), randn(1, 1, 1, 4 * enc), randn(1, 1, 1, 4 * enc)), (0, 1, 2)),
        lambda x, w, b: grn(x, w, b, 1e-6),
        lambda x, w, b: ref.grn_reference(x, w, b, 1e-6),
        bytes_fwd=3 * n * e, bytes_bwd=5 * n * e,
    ))

    # residual add + time-conditioned scale/shift (encoder width), residual channels-last
    n = batch * enc * side * side
    cases.append(Case(
        "modulate",
        lambda: ((randn(batch, enc, side, side), randn(batch, 2 * enc), randn(batch, side, side, enc)), (0, 1, 2)),
        lambda x, c, h: modulate(x, *c.chunk(2, dim=1), residual=h.permute(0, 3, 1, 2)),
        lambda x, c, h: ref.modulate_reference(x, *c.chunk(2, dim=1), residual=h.permute(0, 3, 1, 2)),
        bytes_fwd=3 * n * e, bytes_bwd=4 * n * e,
    ))
    return cases


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of one call."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=warmup, rep=iters, return_mode="median") / 1e3  # flushes L2 between runs
        except ImportError:
            pass
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(max(5, iters // 5)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    for _ in range(2):
        fn()
    times = []
    for _ in range(max(3, iters // 20)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_runner(op: Callable, inputs: tuple, grad_idx: tuple, backward: bool) -> Callable[[], object]:
    if not backward:
        def run_fwd():
            with torch.no_grad():
                return op(*inputs)
        return run_fwd
    leaves = [x.detach().requires_grad_(i in grad_idx) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for i, x in enumerate(inputs)]
    wrt = [leaves[i] for i in grad_idx]
    probe = op(*leaves)
    seed = torch.ones_like(probe) if probe.dim() <= 2 else torch.randn_like(probe)

    def run_fwd_bwd():
        out = op(*leaves)
        return torch.autograd.grad(out, wrt, seed)

    return run_fwd_bwd


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """Issue #15's rule, per op timed by both Triton and torch.compile: on the deciding pass (fwd+bwd
    where it was timed, else fwd) a kernel slower than the compiled reference should be replaced by it.

    Returns ``{op: {"pass", "triton_us", "compile_us", "slower_than_compile", "choice", "now"}}``:
    ``choice`` is what ``CUDA_CHOICE[op]`` should say by the timings, ``now`` what it says."""
    times = {(r["kernel"], r["pass"], r["impl"]): r["us"] for r in rows}
    out = {}
    for op in dict.fromkeys(r["kernel"] for r in rows):
        for pass_name in ("fwd+bwd", "fwd"):
            triton_us, compile_us = times.get((op, pass_name, "triton")), times.get((op, pass_name, "compile"))
            if triton_us is not None and compile_us is not None:
                slower = triton_us > compile_us
                out[op] = {"pass": pass_name, "triton_us": triton_us, "compile_us": compile_us,
                           "slower_than_compile": slower, "choice": "compile" if slower else "triton",
                           "now": CUDA_CHOICE.get(op)}
                break
    return out


def print_verdicts(found: dict[str, dict]) -> None:
    slower = {op: v for op, v in found.items() if v["slower_than_compile"]}
    print("\nslower than torch.compile (issue #15: such an op runs the compiled reference):")
    for op, v in slower.items():
        print(f"  {op:<16} {v['pass']:<8} triton {v['triton_us']:.1f} us > compile {v['compile_us']:.1f} us"
              f" -> fused_kernels/dispatch.py: CUDA_CHOICE[{op!r}] = 'compile'")
    if not slower:
        print(f"  none of the {len(found)} ops timed both ways")
    back = [op for op, v in found.items() if v["now"] == "compile" and not v["slower_than_compile"]]
    if back:
        print("  now faster than torch.compile, back to 'triton' in CUDA_CHOICE: " + ", ".join(back))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Bad values are refused while parsing, with one error line naming the option: --batch 0 was
    # silently replaced by the default and a negative one a traceback; a peak of 0, negative or NaN
    # printed no, negative or NaN fractions; a NaN budget timed everything, a negative one nothing;
    # --rep/--warmup below 1/0 were accepted; an unknown --only name ran no row and said nothing; a
    # JSON path that cannot be written was a traceback.
    parser.add_argument("--batch", type=whole_number(1), default=None,
                        help="generation samples (default on GPU: 5, one 1.3B micro-step of 4,096 tokens; 2 on CPU)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="input dtype (default bf16)")
    parser.add_argument("--peak-gbps", type=finite_number(1.0), default=None,
                        help="peak memory bandwidth in GB/s (default: the GPU's table entry; none on CPU)")
    parser.add_argument("--only", default="",
                        help="comma-separated op names (those of fused_kernels.dispatch.CUDA_CHOICE; default: all of "
                             f"{', '.join(OP_NAMES)})")
    parser.add_argument("--budget", type=finite_number(0.0), default=None, metavar="SECONDS",
                        help="start no new row after this many seconds (the rows left are listed as not run; "
                             "default: no limit)")
    parser.add_argument("--fwd-only", action="store_true", help="time the forward pass only")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--interpret", action="store_true",
                        help="on the CPU only: also run the Triton rows in Triton's interpreter "
                             "(checks the script, not a benchmark)")
    parser.add_argument("--warmup", type=whole_number(0), default=25, help="ms of warm-up per measurement (GPU; default 25)")
    parser.add_argument("--rep", type=whole_number(1), default=100, help="ms of measurement per row (GPU; default 100)")
    parser.add_argument("--json", dest="json_path", type=output_file, default=None, metavar="PATH",
                        help="also write every row as JSON to PATH, rewritten after each row (a run stopped by "
                             "a time limit leaves the rows it finished; default: none)")
    args = parser.parse_args(argv)
    unknown = sorted(set(filter(None, args.only.split(","))) - set(OP_NAMES))
    if unknown or (args.only and not args.only.strip(",")):
        parser.error(f"argument --only: unknown op {', '.join(unknown) or repr(args.only)}; "
                     f"choose from {', '.join(OP_NAMES)}")
    sys.stdout.reconfigure(line_buffering=True)  # each row reaches a log file as it is printed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch = args.batch or (5 if on_gpu else 2)
    peak = peak_bandwidth(device, args.peak_gbps)
    with_triton = triton_available() and (on_gpu or args.interpret)
    if args.interpret and not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"

    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"device: {name}; dtype {args.dtype}; batch {batch}; peak bandwidth "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}")
    if not on_gpu and with_triton:
        print("no GPU: Triton rows run in the interpreter (--interpret); their times mean nothing")
    elif not on_gpu:
        # one thread: small CPU shapes spend more in OpenMP wake-ups than in arithmetic otherwise
        torch.set_num_threads(1)
        print("no GPU: skipping Triton timings (small shapes, one CPU thread; eager and torch.compile of the "
              "reference only)")
    elif not triton_available():
        print("triton is not installed: skipping Triton timings")

    cases = build_cases(device, dtype, batch, small=not on_gpu)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.name in wanted]

    report = {"device": name, "dtype": args.dtype, "batch": batch, "peak_gbps": peak,
              "triton_timed": with_triton and on_gpu, "rows": [], "failed": [], "not_run": [], "verdicts": {}}
    start = time.perf_counter()

    def save_report() -> None:
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(report, f, indent=1)

    save_report()
    header = f"{'op':<16} {'pass':<8} {'impl':<9} {'time (us)':>11} {'GB/s':>9} {'% peak':>7} {'vs eager':>9}"
    print(header)
    print("-" * len(header))
    summary = []
    for case in cases:
        inputs, grad_idx = case.make()
        passes = [("fwd", False, case.bytes_fwd)]
        if case.bytes_bwd and not args.fwd_only:
            passes.append(("fwd+bwd", True, case.bytes_fwd + case.bytes_bwd))
        impls: list[tuple[str, Callable]] = [("eager", case.reference)]
        if not args.no_compile:
            impls.append(("compile", torch.compile(case.reference, dynamic=False)))
        if with_triton:
            impls.append(("triton", case.fused))
        for pass_name, backward, nbytes in passes:
            eager_time = None
            for impl_name, op in impls:
                if args.budget is not None and time.perf_counter() - start > args.budget:
                    report["not_run"].append(f"{case.name}/{pass_name}/{impl_name}")
                    continue
                try:
                    with kernel_backend("triton" if impl_name == "triton" else "reference"):
                        seconds = time_fn(make_runner(op, inputs, grad_idx, backward), device, args.warmup, args.rep)
                except Exception as exc:  # a failed compile must not end the run
                    reason = f"{type(exc).__name__}: {str(exc)[:80]}"
                    print(f"{case.name:<16} {pass_name:<8} {impl_name:<9} failed: {reason}")
                    report["failed"].append({"kernel": case.name, "pass": pass_name, "impl": impl_name,
                                             "error": reason})
                    save_report()
                    continue
                gbps = nbytes / seconds / 1e9
                frac = f"{100 * gbps / peak:6.1f}%" if peak else "    n/a"
                if impl_name == "eager":
                    eager_time = seconds
                speedup = f"{eager_time / seconds:8.2f}x" if eager_time else "      n/a"
                row = f"{case.name:<16} {pass_name:<8} {impl_name:<9} {seconds * 1e6:11.1f} {gbps:9.1f}"
                print(f"{row} {frac} {speedup}")
                report["rows"].append({"kernel": case.name, "pass": pass_name, "impl": impl_name,
                                       "us": seconds * 1e6, "gbps": gbps, "peak_fraction": gbps / peak if peak else None,
                                       "speedup_vs_eager": eager_time / seconds if eager_time else None})
                report["verdicts"] = verdicts(report["rows"])
                save_report()
                if impl_name == "triton" and eager_time:
                    summary.append((case.name, pass_name, eager_time / seconds, gbps / peak if peak else None))
    save_report()
    if summary:
        print("\ntargets (>= 1.5x eager, >= 70% of peak):")
        for kname, pass_name, speedup, frac in summary:
            ok_speed = "ok" if speedup >= 1.5 else "MISS"
            ok_bw = "n/a" if frac is None else ("ok" if frac >= 0.7 else "MISS")
            print(f"  {kname:<16} {pass_name:<8} speed-up {speedup:5.2f}x [{ok_speed}]  bandwidth "
                  f"{'n/a' if frac is None else f'{100 * frac:5.1f}%'} [{ok_bw}]")
    if report["verdicts"]:
        print_verdicts(report["verdicts"])
    if report["not_run"]:
        print(f"\nnot run within --budget {args.budget:g} s: " + ", ".join(report["not_run"]))


if __name__ == "__main__":
    main()
