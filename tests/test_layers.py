"""The package's import graph: lower layers never import higher ones, and modules import without cycles.

Parsed with ``ast`` (nothing is imported), so the rule holds for imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "normlab"

# Layers, bottom first: a module may import modules of its own layer or of layers below it.
LAYERS = [
    {"normlab.version", "normlab.errors", "normlab.io", "normlab.metrics", "normlab.device", "normlab.layer_outputs",
     "normlab.norm_table"},
    {"normlab.norms", "normlab.plots", "normlab.data.augment", "normlab.data.augmentations"},
    {"normlab.registry", "normlab.builders", "normlab.config", "normlab.runfolder", "normlab.runlock",
     "normlab.studyfolder"},
    {"normlab.checkpoint", "normlab.models", "normlab.data"},
    {"normlab.evaluation"},
    {"normlab.train"},
    {"normlab.analysis"},
    {"normlab.report"},  # reads study folders through normlab.studyfolder, never normlab.study
    {"normlab.study"},  # runs the study, then calls the report
    {"normlab", "normlab.cli", "normlab.__main__"},  # normlab/__init__.py is the Python API: train(), study()
]

KNOWN: set[tuple[str, str]] = set()  # upward imports tolerated for now: none
KNOWN_CYCLES: list[list[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(path: Path, name: str, top_level_only: bool = False, source: str | None = None) -> set[str]:
    """The normlab modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    known = modules()
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "normlab" or t.startswith("normlab.")}
    return {t for t in found if t != name}


def layer_of(mod: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{mod} is in no layer of tests/test_layers.py: add it"
    return best[0]


def test_every_module_has_a_layer():
    for mod in modules():
        layer_of(mod)


def test_no_import_goes_up_a_layer():
    upward = []
    for mod, path in modules().items():
        for target in imports(path, mod):
            if layer_of(target) > layer_of(mod) and (mod, target) not in KNOWN:
                upward.append(f"{mod} -> {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_analysis_never_imports_train_and_train_never_imports_analysis():
    mods = modules()
    for mod, path in mods.items():
        for target in imports(path, mod):
            if (mod, target) in KNOWN:
                continue
            assert not (mod.startswith("normlab.analysis") and target.startswith("normlab.train")), (mod, target)
            assert not (mod.startswith("normlab.train") and target.startswith("normlab.analysis")), (mod, target)


def _cycles(top_level_only: bool) -> list[list[str]]:
    mods = modules()
    graph = {m: sorted(t for t in imports(p, m, top_level_only) if t in mods) for m, p in mods.items()}
    # Tarjan: every strongly connected component of more than one module is a cycle
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "all-imports"])
def test_no_import_cycles(top_level_only):
    assert [c for c in _cycles(top_level_only) if c not in KNOWN_CYCLES] == []


def test_the_checker_sees_a_violation():
    """The rules above can fail: relative and lazy imports of train from analysis are found and ranked up."""
    src = "from ..train.loop import train\ndef f():\n    import normlab.train.optim\n    from normlab import io\n"
    found = imports(PKG / "analysis" / "gradcam.py", "normlab.analysis.gradcam", source=src)
    assert found == {"normlab.train.loop", "normlab.train.optim", "normlab.io"}
    assert layer_of("normlab.train.loop") > layer_of("normlab.evaluation") > layer_of("normlab.data")
    assert layer_of("normlab.analysis.gradcam") > layer_of("normlab.train.loop")
