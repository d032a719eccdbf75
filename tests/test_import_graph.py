"""The direction of imports (README, "Layout"): serving and export use the model
(training.model, training.config, training.checkpoint), never the training method's own
modules; export/ has no import cycle. Read from the source with ast, imports inside
functions included."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

TRAINING_LOOP = (
    "training.boxteacher",
    "training.losses",
    "training.criterion",
    "training.engine",
    "training.train",
    "training.pseudo_label",
)


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def package_graph(package: str) -> dict[str, set[str]]:
    modules = {f"{package}.{p.stem}": p for p in (REPO / package).glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}


def test_serving_and_export_do_not_import_the_training_method():
    # labelstudio_backend/fit.py fine-tunes the model on the annotators' boxes, and
    # learning_curve.py simulates that loop (its round 0 trains a first model): both run the
    # training loop by design; the rest of the backend only predicts.
    trains = {("labelstudio_backend", "fit.py"), ("labelstudio_backend", "learning_curve.py")}
    for package in ("serving", "export", "labelstudio_backend"):
        for path in (REPO / package).glob("*.py"):
            if (package, path.name) in trains:
                continue
            bad = sorted(m for m in imports(path) if m.startswith(TRAINING_LOOP))
            assert not bad, f"{package}/{path.name} imports {bad}"


def test_model_imports_nothing_above_it():
    for path in (REPO / "training" / "model").glob("*.py"):
        bad = sorted(
            m for m in imports(path) if m.split(".")[0] in ("serving", "export", "labelstudio_backend") or m.startswith(TRAINING_LOOP)
        )
        assert not bad, f"training/model/{path.name} imports {bad}"


def test_training_imports_nothing_of_the_packages_above_it():
    # The CLI reaches export/serving/labelstudio_backend only through entry points.
    for path in sorted((REPO / "training").rglob("*.py")):
        bad = sorted(m for m in imports(path) if m.split(".")[0] in ("serving", "export", "labelstudio_backend"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_every_package_adds_its_commands_and_benchmarks_through_entry_points():
    from training.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "eval", "pseudo-label", "export", "serve", "labelstudio", "benchmark"):
        assert name in commands, name
    bench = next(a for a in commands["benchmark"]._actions if a.dest == "benchmark").choices
    assert sorted(bench) == ["infer", "learning-curve", "quality", "serve", "train"]
    for name, module in (
        ("quality", "training.benchmark"),
        ("infer", "export.benchmark"),
        ("serve", "serving.benchmark"),
        ("learning-curve", "labelstudio_backend.learning_curve"),
    ):
        assert bench[name].get_default("func").__module__ == module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules forming an import cycle (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [])):
            return cycle
    return None


def test_no_import_cycle_in_export_and_serving():
    for package in ("export", "serving"):
        cycle = find_cycle(package_graph(package))
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_find_cycle_by_hand():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
