"""The summary table of scripts/gpu_check.sh: one row per phase (status, key figures, seconds).

Reads what the phases left in ``--work``: ``phases.tsv`` (name, exit status or ``skip``, seconds,
limit, reason), ``junit.xml`` (tests), ``trainer.json``, ``throughput.json`` and ``overhead.json``,
``kernels.json``; the last line of ``--out/<phase>.log`` that starts with ``<phase>:`` where a phase
leaves no JSON. Prints the table and writes it to ``--out/summary.txt``, and everything parsed to
``--out/summary.json``. Standard library only: it runs even when the setup phase failed.

Exit status: 1 when a phase failed or timed out, else 0 (skipped phases do not fail the check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMEOUT_CODES = ("124", "137")  # timeout(1): the limit ran out (137: killed after the grace period)


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_json_object(text: str):
    """The JSON object at the end of ``text`` (a program may print lines before it)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
    return None


def log_line(out: Path, name: str) -> str:
    """The last line of the phase's log that the phase addressed to the summary (``name: ...``)."""
    try:
        lines = (out / f"{name}.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    tagged = [line[len(name) + 1:].strip() for line in lines if line.startswith(f"{name}:")]
    return tagged[-1] if tagged else (lines[-1].strip()[:160] if lines else "")


# ---------------------------------------------------------------------------------------------
def tests_figures(work: Path) -> tuple[str, dict]:
    try:
        root = ET.parse(work / "junit.xml").getroot()
    except (OSError, ET.ParseError):
        return "", {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname', '')}::{c.get('name', '')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped")
    if failed:
        text += "; failed: " + ", ".join(f.rsplit(".", 1)[-1] for f in failed[:3]) + (" ..." if len(failed) > 3 else "")
    return text, {**counts, "failed_tests": failed}


def trainer_figures(work: Path) -> tuple[str, dict]:
    result = load_json(work / "trainer.json")
    if not result:
        return "", {}
    return result.get("summary", ""), result


def throughput_figures(work: Path) -> tuple[str, dict]:
    data = load_json(work / "throughput.json") or {}
    overhead = load_json(work / "overhead.json")
    if overhead is None:
        try:
            overhead = last_json_object((work / "overhead.json").read_text())
        except OSError:
            overhead = None
    parts = []
    unit = "GFLOP/s" if data.get("device", "").startswith("cpu") else "TFLOP/s"
    scale = 1e3 if unit == "GFLOP/s" else 1.0
    for key, label in (("ours", "ours"), ("baseline", "Llama")):
        r = data.get("runs", {}).get(key)
        if r:
            parts.append(f"{label} {r['tokens_per_s']:,.0f} tok/s, {r['tflops'] * scale:.1f} {unit} MFU {r['mfu']:.1%} "
                         f"(Megatron {r['megatron_tflops'] * scale:.1f}, {r['megatron_mfu']:.1%}), "
                         f"{r['peak_memory_gib']:.1f} GiB")
    syncs = overhead.get("syncs_per_micro_step") if isinstance(overhead, dict) else None
    if data:
        parts.append(f"syncs/micro-step {syncs if syncs is not None else 'n/a'}")
    details = dict(data)
    if isinstance(overhead, dict):
        details["step_overhead"] = {k: overhead.get(k) for k in ("syncs_per_micro_step", "launch_ratio", "structure")}
    return "; ".join(parts), details


def kernels_figures(work: Path) -> tuple[str, dict]:
    data = load_json(work / "kernels.json")
    if not data:
        return "", {}
    rows = data.get("rows", [])
    kernels = sorted({r["kernel"] for r in rows})
    triton = [r for r in rows if r["impl"] == "triton"]
    text = f"{len(kernels)} kernels, {len(rows)} rows, {len(data.get('failed', []))} failed"
    if triton:
        speed = [r["speedup_vs_eager"] for r in triton if r["speedup_vs_eager"]]
        compiled = {(r["kernel"], r["pass"]): r["us"] for r in rows if r["impl"] == "compile"}
        vs_compile = [compiled[(r["kernel"], r["pass"])] / r["us"] for r in triton if (r["kernel"], r["pass"]) in compiled]
        text += f"; Triton vs eager x{min(speed):.2f}-x{max(speed):.2f} (median x{statistics.median(speed):.2f})"
        if vs_compile:
            text += f", vs compile median x{statistics.median(vs_compile):.2f}"
        fractions = [r["peak_fraction"] for r in triton if r["peak_fraction"] is not None]
        if fractions:
            text += (f"; {min(fractions):.0%}-{max(fractions):.0%} of {data['peak_gbps']:.0f} GB/s "
                     f"(median {statistics.median(fractions):.0%})")
    elif rows:
        text += "; no Triton rows (eager and torch.compile only)"
    found = data.get("verdicts") or {}
    if found:  # issue #15: a kernel slower than torch.compile is replaced by the compiled reference
        slower = [op for op, v in found.items() if v.get("slower_than_compile")]
        text += ("; slower than torch.compile (set 'compile' in fused_kernels/dispatch.py CUDA_CHOICE): " + ", ".join(slower)
                 if slower else f"; none of {len(found)} slower than torch.compile")
    if data.get("not_run"):
        text += f"; {len(data['not_run'])} rows not run (time budget)"
    return text, data


FIGURES = {"tests": tests_figures, "trainer": trainer_figures, "throughput": throughput_figures,
           "kernels": kernels_figures}


# ---------------------------------------------------------------------------------------------
def phase_rows(work: Path, out: Path) -> list[dict]:
    rows = []
    for line in (work / "phases.tsv").read_text().splitlines():
        name, code, seconds, limit, *reason = line.split("\t")
        figures, details = FIGURES.get(name, lambda _: ("", {}))(work)
        if code == "skip":
            status, figures = "skipped", reason[0] if reason else ""
        elif code in TIMEOUT_CODES:
            status = "TIMEOUT"
            figures = f"limit {limit} s reached" + (f"; {figures}" if figures else "")
        elif code == "0":
            status = "pass"
        else:
            status = "FAIL"
            if name == "tests" and code == "5":
                figures = "no test is marked gpu (pytest collected none)"
        figures = figures or log_line(out, name)
        rows.append({"phase": name, "status": status, "exit": code, "seconds": float(seconds),
                     "limit_s": float(limit), "figures": figures, "details": details})
    return rows


def format_table(rows: list[dict]) -> str:
    width = max([len("key figures")] + [len(r["figures"]) for r in rows])
    lines = [f"{'phase':<11}{'status':<9}{'key figures':<{width}}  {'seconds':>8}", "-" * (30 + width)]
    for r in rows:
        lines.append(f"{r['phase']:<11}{r['status']:<9}{r['figures']:<{width}}  {r['seconds']:>8.1f}")
    total = sum(r["seconds"] for r in rows)
    failed = [r["phase"] for r in rows if r["status"] in ("FAIL", "TIMEOUT")]
    ran = [r for r in rows if r["status"] != "skipped"]
    overall = "FAIL" if failed else ("pass" if ran else "skipped")
    note = ("failed: " + ", ".join(failed)) if failed else f"{len(ran)} of {len(rows)} phases ran, none failed"
    lines.append(f"{'total':<11}{overall:<9}{note:<{width}}  {total:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the phases' work folder (phases.tsv and their JSON)")
    p.add_argument("--out", required=True, help="the folder of the phase logs; summary.txt/json go here")
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    rows = phase_rows(work, out)
    table = format_table(rows)
    print("\n" + table)
    (out / "summary.txt").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"phases": rows}, indent=1) + "\n")
    return 1 if any(r["status"] in ("FAIL", "TIMEOUT") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
