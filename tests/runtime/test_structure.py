"""Structural rules of the code base, checked on the source tree.

- Every collective goes through ``pretrain.runtime.comm`` (a raw ``torch.distributed`` collective on
  a CPU tensor works under gloo in every CPU test and dies on the first NCCL step).
- megatron-core's global ``parallel_state`` is read only by the runtime and the LLM adapter; every
  other module receives the ``ParallelLayout``.
- The trainer names no model family: families plug in through ``pretrain.train.spec.TrainSpec``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "data_tools", "kernels")
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier", "send", "recv", "isend", "irecv", "gather",
    "scatter", "all_to_all", "all_to_all_single", "monitored_barrier",
}


def _sources(*packages: str):
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, path.relative_to(REPO).as_posix()


def _raw_collectives(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls like ``torch.distributed.all_reduce(...)``, ``dist.barrier(...)`` or a collective imported
    by name from torch.distributed."""
    imported = set()
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            owner = ast.unparse(func.value)
            if owner in aliases or owner.endswith("distributed"):
                found.append((node.lineno, ast.unparse(func)))
        elif isinstance(func, ast.Name) and func.id in imported:
            found.append((node.lineno, func.id))
    return found


def test_the_scan_finds_raw_collectives():
    sample = (
        "import torch\nimport torch.distributed as dist\nfrom torch.distributed import barrier\n"
        "torch.distributed.all_reduce(x)\ndist.broadcast(x, 0)\nbarrier()\nlayout.comm.all_reduce(x)\n"
    )
    assert [name for _, name in _raw_collectives(ast.parse(sample))] == [
        "torch.distributed.all_reduce", "dist.broadcast", "barrier"]


def test_collectives_only_through_the_runtime():
    offenders = []
    for path, rel in _sources(*PACKAGES):
        if rel.startswith("pretrain/runtime/"):
            continue
        offenders += [f"{rel}:{line}: {name}" for line, name in _raw_collectives(ast.parse(path.read_text()))]
    assert not offenders, "use ParallelLayout.comm (pretrain.runtime.comm) instead of:\n" + "\n".join(offenders)


def test_parallel_state_only_in_the_runtime_and_the_llm_adapter():
    allowed = re.compile(r"^pretrain/(runtime/.*|model/llm\.py)$")
    offenders = [rel for path, rel in _sources(*PACKAGES)
                 if "parallel_state" in path.read_text() and not allowed.match(rel)]
    assert not offenders, f"pass the ParallelLayout down instead of reading parallel_state in {offenders}"


def test_the_trainer_names_no_model_family():
    generic = ["trainer.py", "forward_backward.py", "pipeline.py", "spec.py", "engine.py"]
    family_words = {"janus", "janusflow", "januspro", "siglip", "repa", "velocity", "latent", "latents", "vae", "gen"}
    offenders = []
    for name in generic:
        tree = ast.parse((REPO / "pretrain" / "train" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = getattr(node, "module", None) or ""
                names = [module] + [a.name for a in node.names]
                if any(re.search(r"model\.janusflow|families\.janusflow|\.step$|latent_codec", n) for n in names):
                    offenders.append(f"{name}: imports {module}")
            elif isinstance(node, ast.Name) and family_words & {w.lower() for w in re.split(r"_|(?<=[a-z])(?=[A-Z])", node.id)}:
                offenders.append(f"{name}:{node.lineno}: {node.id}")
    assert not offenders, offenders
