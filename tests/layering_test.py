"""The layering of the package: data flows one way, config → data → models → losses → evaluators
→ train → API → command lines, and no module imports one from a layer above it or sits on an
import circle (imports inside functions count too: they run as soon as the function does)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "region_medclip"

# Prefixes of module names → layer (lowest first). The longest matching prefix decides.
LAYERS = {
    "region_medclip.config": 0,
    "region_medclip.sharding": 0,
    "region_medclip.checkpointing": 0,
    "region_medclip.metrics_writer": 0,
    "region_medclip.data": 1,
    "region_medclip.models": 2,
    "region_medclip.weights": 2,
    "region_medclip.losses": 3,
    "region_medclip.evaluators": 4,
    "region_medclip.train": 5,
    "region_medclip.api": 6,
    "region_medclip": 6,  # the package itself: `region_medclip.load`
    "region_medclip.main": 7,
    "region_medclip.evaluate": 7,
    "region_medclip.predict": 7,
    "region_medclip.robustness": 7,
    "region_medclip.convert": 7,
    "region_medclip.summary": 7,
    "region_medclip.ablation": 7,
    "region_medclip.coop": 7,
    "region_medclip.imagenet_zero_shot": 7,
    "region_medclip.bench": 7,
    "region_medclip.benchmark": 7,
    "region_medclip.prepare": 7,
}
# Models only compute: no I/O, no data, no training state.
FORBIDDEN = {
    "region_medclip.models": (
        "region_medclip.checkpointing",
        "region_medclip.metrics_writer",
        "region_medclip.data",
        "region_medclip.train",
    ),
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] in ("region_medclip", "configs"))
    out.discard(name)
    return out


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_library_never_imports_the_experiment_configs(graph):
    offenders = {
        m: sorted(t for t in ts if t.split(".")[0] == "configs") for m, ts in graph.items()
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_no_module_imports_from_a_layer_above_it(graph):
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if t.startswith("region_medclip") and _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_models_only_compute(graph):
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for prefix, banned in FORBIDDEN.items()
        if m.startswith(prefix)
        for t in sorted(targets)
        if any(t == b or t.startswith(b + ".") for b in banned)
    ]
    assert not bad, "\n".join(bad)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_there_is_no_import_circle(graph):
    # A package's __init__ re-exporting its own submodules is not a circle of the design.
    edges = {
        m: {t for t in ts if not (t.startswith(m + ".") and _modules()[m].name == "__init__.py")}
        for m, ts in graph.items()
    }
    cycle = _find_cycle(edges)
    assert cycle is None, " → ".join(cycle)


def test_the_checks_catch_what_they_check():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("region_medclip.data.registry") == 1
    assert _layer("region_medclip.bench.train") == 7
    assert _layer("region_medclip.train.step") == 5
