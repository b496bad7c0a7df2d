"""The layout's rules, checked on the source: no import cycles, model classes only in their family, no sys.path
edits, and the size limits that keep files readable (docs/architecture.md)."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILY_ONLY = ("UNet2DConditionModel", "CLIPTextModel", "attn2")
# the toy trainer builds its models from configs; tests build tiny ones
FAMILY_EXEMPT = ("utils/families/", "utils/toy/train.py", "utils/toy/models.py", "tests/", "experiments/tests/")


def python_files() -> list[Path]:
    """The tracked Python files."""
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split()]


def module_name(path: Path) -> str:
    """utils/train/loop.py -> utils.train.loop (a package's __init__ is the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports at import time (module level, not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycles():
    files = [f for f in python_files() if "tests" not in f.relative_to(ROOT).parts]
    known = {module_name(f) for f in files}
    graph = {module_name(f): top_level_imports(f, known) for f in files}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_model_classes_and_module_names_live_in_their_family():
    offenders = []
    for f in python_files():
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith(FAMILY_EXEMPT):
            continue
        text = f.read_text(encoding="utf-8")
        offenders += [f"{rel}: {word}" for word in FAMILY_ONLY if word in text]
    assert not offenders, offenders


def test_no_sys_path_edits():
    edits = [f.relative_to(ROOT).as_posix() for f in python_files() if "sys.path" in f.read_text(encoding="utf-8")
             and f.relative_to(ROOT).parts[0] != "tests"]
    assert not edits, edits


def test_functions_and_modules_stay_small():
    too_long = []
    for f in python_files():
        src = f.read_text(encoding="utf-8")
        rel = f.relative_to(ROOT).as_posix()
        if src.count("\n") > 360:
            too_long.append(f"{rel}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 85:
                too_long.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
