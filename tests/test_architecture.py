"""The package layout is the lifecycle, and imports run one way through it.

Every `import` in `ml/` (module level or inside a function: a function-local
import is still a dependency) is parsed and checked against the layers below.
A module may import its own package and any lower layer, never a higher one or
a sibling package of the same layer, and no two modules may import each other
through any chain. The test plants nothing: it fails on the first upward
import or cycle anyone adds.
"""

from __future__ import annotations

import ast
from pathlib import Path

ML = Path(__file__).resolve().parent.parent / "ml"

# Lower numbers sit lower. Config and logging at the bottom, then the warehouse
# access layer, then the stages in lifecycle order, then the orchestration on top.
LAYERS: dict[str, int] = {
    "ml": 0,
    "ml.config": 0,
    "ml.logs": 0,
    "ml.warehouse": 1,
    "ml.data": 2,
    "ml.features": 2,
    "ml.quality": 3,
    "ml.modeling": 3,
    "ml.monitoring": 4,
    "ml.serving": 4,
    "ml.reports": 5,
    "ml.pipeline": 6,
    "ml.backfill": 7,
    "ml.cli": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ML.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit(module: str) -> str:
    """The layer entry a module belongs to: its top package below ml, or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ml"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "ml":
            base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (ML.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                          or (ML.parent / Path(*candidate.split("."))).is_dir() else base)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute `ml.` imports")
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ML.rglob("*.py"))}


def test_every_module_sits_in_a_layer() -> None:
    unplaced = sorted(m for m in graph() if unit(m) not in LAYERS)
    assert not unplaced, f"modules outside every layer (add their package to LAYERS): {unplaced}"


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in edges.items():
        here = unit(module)
        for target in targets:
            there = unit(target)
            if there == here or there == "ml":
                continue
            if LAYERS[there] > LAYERS[here]:
                problems.append(f"{module} imports {target}: layer {LAYERS[there]} above {LAYERS[here]}")
            elif LAYERS[there] == LAYERS[here]:
                problems.append(f"{module} imports {target}: a sibling package of the same layer")
    return problems


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    modules = set(edges)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(t for t in edges.get(node, ()) if t in modules and t != node):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
    return cycles


def test_imports_never_point_upward_or_sideways() -> None:
    problems = layer_violations(graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_catches_planted_upward_sideways_and_cyclic_imports(tmp_path: Path) -> None:
    """The rules above catch what they claim, on a function-local import too."""
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from ml.pipeline import nightly\n")
    assert imports_of(planted) == {"ml.pipeline"}
    upward = {"ml.modeling.train": {"ml.pipeline"}}
    sideways = {"ml.modeling.train": {"ml.quality.audit"}}
    assert layer_violations(upward) and layer_violations(sideways)
    assert not layer_violations({"ml.pipeline": {"ml.modeling.train", "ml.warehouse"}})
    cyclic = {"ml.modeling.a": {"ml.modeling.b"}, "ml.modeling.b": {"ml.modeling.c"},
              "ml.modeling.c": {"ml.modeling.a"}}
    assert find_cycles(cyclic) == [["ml.modeling.a", "ml.modeling.b", "ml.modeling.c", "ml.modeling.a"]]
