"""Reuse of a stage's outputs between workspaces, for the stages DVC's run cache leaves out.

DVC's run cache restores a stage's outputs when it has run before with the same command, deps and
params, in any workspace that shares the cache; but it skips stages with `persist: true` outputs,
and the per-object stages (watertight, sample) have them, so that a killed stage resumes instead of
starting over. Without this module every experiment worktree would recompute them.

- `record(ws, stage)`: after such a stage completed in `ws` (however it ran: `dvc repro`, or the
  fan-out flow and `dvc commit`), its dvc.lock entry is kept in the shared DVC cache, under
  `shapeflow-runs/<stage>-<key>.yaml`.
- `restore(ws, stage)`: before it runs in `ws`, the same key is computed there; a kept entry with it
  is written into `ws`'s dvc.lock and `dvc checkout STAGE` brings its outputs from the cache.

The key is a hash of the command, of each dep's md5 (a stage output's from the dvc.lock entry of the
stage that makes it, a file's from its content) and of the stage's params, so it is computed without
hashing the data again. Nothing is reused when a dep is neither (a folder no stage makes), nor for
a stage that reads no other stage's output (fetch: what it reads is outside the workspace).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from shapeflow import manifest as mf

log = logging.getLogger(__name__)

RUNS_DIR = "shapeflow-runs"


def run_key(cmd: str, deps: Mapping[str, str], params: Mapping[str, Any]) -> str:
    body = {"cmd": cmd.strip(), "deps": dict(sorted(deps.items())), "params": params}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def key_of_entry(entry: Mapping[str, Any]) -> str:
    """The key of a dvc.lock stage entry (what it ran with)."""
    deps = {str(d["path"]): str(d.get("md5")) for d in entry.get("deps") or []}
    return run_key(str(entry.get("cmd", "")), deps, (entry.get("params") or {}).get("params.yaml") or {})


def _dotted(tree: Any, name: str) -> Any:
    node = tree
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(name)
        node = node[part]
    return node


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - DVC's content hash, not a security measure
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def current_key(ws: Path, stage: str) -> str | None:
    """The key `stage` would run with in `ws` now; None when a dep's md5 is not at hand."""
    ws = Path(ws)
    spec = (_read_yaml(ws / "dvc.yaml").get("stages") or {}).get(stage)
    if not spec:
        return None
    lock = _read_yaml(ws / "dvc.lock").get("stages") or {}
    made_by = {str(o["path"]): str(o.get("md5")) for entry in lock.values() for o in entry.get("outs") or []}
    deps = {}
    for dep in spec.get("deps") or []:
        dep = str(dep)
        if dep in made_by:
            deps[dep] = made_by[dep]
        elif (ws / dep).is_file():
            deps[dep] = _file_md5(ws / dep)
        else:
            return None
    if not any(dep in made_by for dep in deps):
        return None  # it reads nothing another stage made (fetch): its input is outside the workspace
    values = _read_yaml(ws / "params.yaml")
    params = {}
    for name in spec.get("params") or []:
        if not isinstance(name, str):
            return None  # another params file: not handled
        try:
            params[name] = _dotted(values, name)
        except KeyError:
            return None
    return run_key(str(spec.get("cmd", "")), deps, params)


def runs_folder(cache: Path) -> Path:
    return Path(cache) / RUNS_DIR


def record(ws: Path, stage: str, cache: Path) -> Path | None:
    """Keep `stage`'s dvc.lock entry in `ws` under the key it ran with; the file, or None without one."""
    entry = (_read_yaml(Path(ws) / "dvc.lock").get("stages") or {}).get(stage)
    if not entry or not entry.get("outs"):
        return None
    path = runs_folder(cache) / f"{stage}-{key_of_entry(entry)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    mf.atomic_write_text(path, yaml.safe_dump(entry, sort_keys=False))
    return path


def _in_cache(cache: Path, md5: str) -> bool:
    name = md5.removesuffix(".dir")
    found = Path(cache) / "files" / "md5" / name[:2] / (name[2:] + (".dir" if md5.endswith(".dir") else ""))
    return found.is_file()


def restore(
    ws: Path, stage: str, cache: Path, checkout: Callable[[Path, str], bool], log_line: Callable[[str], None]
) -> bool:
    """Outputs of an earlier run of `stage` with the same key, from the cache into `ws`: its entry
    goes into ws/dvc.lock and `checkout(ws, stage)` (`dvc checkout STAGE`) brings the files. False
    (and dvc.lock as it was) when there is none, or its outputs are not all in the cache."""
    key = current_key(ws, stage)
    if key is None:
        return False
    kept = runs_folder(cache) / f"{stage}-{key}.yaml"
    if not kept.is_file():
        return False
    entry = yaml.safe_load(kept.read_text())
    if key_of_entry(entry) != key or not all(_in_cache(cache, str(o.get("md5", ""))) for o in entry["outs"]):
        return False
    lock_path = Path(ws) / "dvc.lock"
    before = lock_path.read_text() if lock_path.is_file() else None
    lock = (yaml.safe_load(before) if before else None) or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {})[stage] = entry
    mf.atomic_write_text(lock_path, yaml.safe_dump(lock, sort_keys=False))
    if checkout(Path(ws), stage):
        log_line(f"stage {stage}: outputs of an earlier run with the same inputs and params reused ({kept.name})")
        return True
    if before is None:
        lock_path.unlink(missing_ok=True)
    else:
        mf.atomic_write_text(lock_path, before)
    return False
