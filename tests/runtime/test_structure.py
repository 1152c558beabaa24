"""Structural rules of the code base, checked on the source tree.

- Every collective goes through ``pretrain.runtime.comm`` (a raw ``torch.distributed`` collective on
  a CPU tensor works under gloo in every CPU test and dies on the first NCCL step).
- megatron-core's global ``parallel_state`` is read only by the runtime; every
  other module receives the ``ParallelLayout``.
- The trainer names no model family: families plug in through ``pretrain.train.spec.TrainSpec``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "data_tools", "fused_kernels")
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


def test_parallel_state_only_in_the_runtime():
    """The LLM adapter takes its process groups (``process_groups``), so only the runtime, which builds
    the layout, touches megatron-core's global state."""
    allowed = re.compile(r"^pretrain/runtime/.*$")
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


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Absolute names of every module ``tree`` imports (relative imports resolved inside ``package``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                if node.module:
                    names.add(".".join(base + [node.module]))
                else:  # "from . import x": the submodules x
                    names |= {".".join(base + [a.name]) for a in node.names}
            else:
                names.add(node.module)
    return names


def _imports_by_file(*packages: str) -> dict[str, set[str]]:
    out = {}
    for path, rel in _sources(*packages):
        module = rel[:-3].replace("/", ".")
        package = module if rel.endswith("__init__.py") else module.rsplit(".", 1)[0]
        out[rel] = _imported_modules(ast.parse(path.read_text()), package.removesuffix(".__init__"))
    return out


def test_data_tools_and_pretrain_share_only_the_data_contract():
    """data_tools and pretrain both import datacontract (and the image codecs) and never each other;
    the contract and the codecs import neither."""
    offenders = []
    rules = {"pretrain": ("data_tools",), "data_tools": ("pretrain",), "datacontract": ("pretrain", "data_tools"),
             "image_codecs": ("pretrain", "data_tools")}
    for rel, imported in _imports_by_file("pretrain", "data_tools", "datacontract", "image_codecs").items():
        for forbidden in rules[rel.split("/")[0]]:
            offenders += [f"{rel} imports {name}" for name in imported
                          if name == forbidden or name.startswith(forbidden + ".")]
    assert not offenders, offenders


def test_no_import_cycles_between_modules():
    """The import graph of the project's modules has no cycle (function-local imports included: a cycle
    through them is still modules that need each other)."""
    graph = {}
    for rel, imported in _imports_by_file(*PACKAGES, "datacontract", "image_codecs").items():
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        graph[module] = imported
    known = set(graph)
    # A package's __init__ importing its own submodules is how packages are made, not a cycle.
    edges = {m: {n for n in deps if n in known and n != m and not n.startswith(m + ".")}
             for m, deps in graph.items()}
    cycle = _find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def _find_cycle(edges: dict[str, set[str]]):
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_long_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None


def _top_level_packages() -> list[str]:
    return sorted(p.parent.name for p in REPO.glob("*/__init__.py"))


def test_no_top_level_package_shadows_an_installed_distribution():
    """Our top-level import names are not those of any installed distribution. The repo root comes
    first on sys.path, so a package named like a dependency's replaces it for everyone: transformers
    5.25 began to import HuggingFace's ``kernels``, and this project's former ``kernels/`` broke every
    model import."""
    from importlib.metadata import packages_distributions

    ours = _top_level_packages()
    assert {"pretrain", "data_tools", "fused_kernels"} <= set(ours)
    installed = packages_distributions()
    clashes = {name: installed[name] for name in ours
               if name in installed and set(installed[name]) != {"janusflow-pretrain"}}
    assert clashes == {}, f"top-level package names also installed by other distributions: {clashes}"
