"""The house's one-way imports, read from the source (every import, at any depth, including those inside functions).

    pipeline/  never imports torch, train/ or models/ (the cache and its format must not depend on training)
    models/    never imports train/ or pipeline/ (networks know nothing of data)
    train/     commands on top (run, evaluate, predict, cv, compare, preview, bench), each a thin main(argv);
               below them the rooms, each importing only the rooms under it:
                   experiment -> evaluation -> engine -> data, augment
               data and augment import no other room; no room imports a command; no command imports another
               command (what two commands share lives in a room). bench/ is a command with parts of its own.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train"
# which rooms each room may import (besides itself, pipeline/, models/ and third-party packages)
ROOM_MAY_IMPORT = {
    "data": set(),
    "augment": set(),
    "engine": {"data", "augment"},
    "evaluation": {"engine", "data", "augment"},
    "experiment": {"evaluation", "engine", "data", "augment"},
    "bench": {"experiment", "evaluation", "engine", "data", "augment"},  # a command package: its parts may use any
}
MAX_LINES = 400  # a module longer than this says why at its top, in a docstring line starting "Size:"


def imported_modules(path: Path) -> list[str]:
    """Every absolute module name `path` imports (`from a.b import c` gives a.b and a.b.c)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the house uses absolute ones"
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def commands() -> set[str]:
    tops = {p.stem for p in TRAIN.glob("*.py") if p.stem != "__init__"}
    return tops | {"bench"}


def place_of(path: Path) -> str:
    """`command` for train/<name>.py, else the room (train/<room>/...)."""
    rel = path.relative_to(TRAIN)
    return "command" if len(rel.parts) == 1 else rel.parts[0]


def train_modules() -> list[Path]:
    return sorted(p for p in TRAIN.rglob("*.py") if p.name != "__init__.py" or p.parent != TRAIN)


def test_the_train_top_level_holds_the_commands_and_the_rooms_only():
    rooms = {p.name for p in TRAIN.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == set(ROOM_MAY_IMPORT)
    assert {p.stem for p in TRAIN.glob("*.py")} == {"__init__", "run", "evaluate", "predict", "cv", "compare",
                                                    "preview", "explain"}
    for name in commands() - {"bench"}:
        tree = ast.parse((TRAIN / f"{name}.py").read_text())
        functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert "main" in functions, f"train/{name}.py has no main(argv)"


@pytest.mark.parametrize("path", train_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_train_imports_point_one_way(path):
    place = place_of(path)
    offenders = []
    for name in imported_modules(path):
        parts = name.split(".")
        if parts[0] != "train" or len(parts) < 2:
            continue
        target = parts[1]
        if target in commands() - {"bench"} or (target == "bench" and place not in ("bench",)):
            if place != "command" or target != path.stem:
                offenders.append(f"{name} (a command)")
            continue
        if target not in ROOM_MAY_IMPORT:
            continue  # e.g. `from train import x` of a room, seen again as train.x
        if place == "command" or target == place:
            continue
        if target not in ROOM_MAY_IMPORT[place]:
            offenders.append(f"{name} (room {place} may import only {sorted(ROOM_MAY_IMPORT[place]) or 'none'})")
    assert offenders == [], f"{path.relative_to(ROOT)} imports {offenders}"


@pytest.mark.parametrize("package, banned", [("pipeline", {"torch", "train", "models"}),
                                             ("models", {"train", "pipeline"})])
def test_pipeline_and_models_stay_below_train(package, banned):
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / package).rglob("*.py"))
                 for name in imported_modules(path) if name.split(".")[0] in banned]
    assert offenders == []


def test_long_modules_say_why():
    unexplained = []
    for path in sorted([*TRAIN.rglob("*.py"), *(ROOT / "pipeline").rglob("*.py"), *(ROOT / "models").rglob("*.py")]):
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and not any(line.startswith("Size:") for line in doc.splitlines()):
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert unexplained == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The rule above can fail: a data module importing the engine inside a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from train.engine.loop import Precision\n")
    assert "train.engine.loop" in imported_modules(bad)
