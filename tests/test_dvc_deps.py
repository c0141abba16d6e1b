"""dvc.yaml lists, for every stage, exactly the shapeflow code the stage runs.

DVC reruns a stage only when one of its listed deps changes, so a module the stage imports but
dvc.yaml leaves out makes `dvc repro` call stale outputs up to date. The imports are read
statically (ast) and followed transitively, function-level imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "shapeflow"
STAGES = ("fetch", "watertight", "sample", "train_vae", "train_dit", "evaluate")


def module_file(name: str) -> Path | None:
    """The source file of a shapeflow module name, or None when it is not one."""
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The shapeflow modules that the file at `path` imports, anywhere in it."""
    package = ".".join(path.relative_to(SRC).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    return {name for name in found if name.split(".")[0] == PACKAGE and module_file(name) is not None}


def code_closure(module: str) -> set[Path]:
    """Every source file the module runs: itself and its transitive shapeflow imports, with the
    parent packages' __init__.py files that importing them executes."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return seen


def logic_free(path: Path) -> bool:
    """A package __init__ with no function or class: it cannot change what a stage computes."""
    tree = ast.parse(path.read_text())
    return path.name == "__init__.py" and not any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in ast.walk(tree)
    )


def stage_code(stage: str) -> set[Path]:
    """The files dvc.yaml must cover for a stage: its module's closure less logic-free __init__s."""
    return {p for p in code_closure(f"{PACKAGE}.stages.{stage}") if not logic_free(p)}


def code_deps(stage: str, dvc: dict) -> list[str]:
    """The deps of a stage in dvc.yaml that point into src/."""
    return [d for d in dvc["stages"][stage]["deps"] if isinstance(d, str) and d.startswith("src/")]


def uncovered(needed: set[Path], deps: list[str]) -> set[str]:
    """The needed files that no dep (a file, or a folder above it) covers, relative to the repo."""
    dep_paths = [(ROOT / d).resolve() for d in deps]
    return {p.relative_to(ROOT).as_posix() for p in needed if not any(p == d or d in p.parents for d in dep_paths)}


def unused(needed: set[Path], deps: list[str]) -> set[str]:
    """The deps that cover none of the needed files: listed but never run."""
    return {d for d in deps if not any(p == (ROOT / d).resolve() or (ROOT / d).resolve() in p.parents for p in needed)}


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_has_a_module(dvc):
    assert set(dvc["stages"]) == set(STAGES)
    for stage in STAGES:
        assert module_file(f"{PACKAGE}.stages.{stage}") is not None, stage


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_the_code_the_stage_runs(dvc, stage):
    missing = uncovered(stage_code(stage), code_deps(stage, dvc))
    assert not missing, f"dvc.yaml stage {stage!r} runs these files but does not list them as deps: {sorted(missing)}"


@pytest.mark.parametrize("stage", STAGES)
def test_deps_list_no_code_the_stage_does_not_run(dvc, stage):
    extra = unused(stage_code(stage), code_deps(stage, dvc))
    assert not extra, f"dvc.yaml stage {stage!r} lists deps it never imports: {sorted(extra)}"


@pytest.mark.parametrize("stage", STAGES)
def test_removing_any_code_dep_is_caught(dvc, stage):
    """The check above is not vacuous: dropping any one listed code dep leaves files uncovered."""
    deps = code_deps(stage, dvc)
    needed = stage_code(stage)
    assert deps
    for dep in deps:
        assert uncovered(needed, [d for d in deps if d != dep]), f"{stage}: removing {dep} went unnoticed"


def test_closure_follows_function_level_and_from_imports(tmp_path, monkeypatch):
    """A lazy import inside a function and `from pkg import submodule` both count."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from shapeflow.b import g\n    return g\n")
    (pkg / "b.py").write_text("from shapeflow.sub import c\ng = c\n")
    (pkg / "sub" / "c.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("x = 1\n")
    (pkg / "unrelated.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in code_closure("shapeflow.a")}
    assert names == {
        "shapeflow/__init__.py",
        "shapeflow/a.py",
        "shapeflow/b.py",
        "shapeflow/sub/__init__.py",
        "shapeflow/sub/c.py",
        "shapeflow/sub/d.py",
    }
