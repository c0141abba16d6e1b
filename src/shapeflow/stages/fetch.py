"""fetch stage: raw meshes from the built-in families, local folders and an Objaverse uid list.

`shapeflow fetch OUT [--source builtin|local|objaverse] [--path DIR] [--list CSV] [--limit N]`
writes `OUT/objects/<key><suffix>` (key = sha256 of the source file; a .gltf is packed into a
.glb), `OUT/records/<key>.json` and `OUT/manifest.csv` with one row per object, failures included
with their reason. A file is only taken if later stages can use it: it loads, and cleaning leaves
faces that are not all in one plane.

Several sources (`fetch.source` and `fetch.extra_sources`, several folders with
`fetch.local.extra_paths`) make one dataset. A file whose bytes were already taken (the same sha256,
from any source) is one object: its later occurrences are `duplicate` rows whose reason names the
key kept, and whose own key is the sha256 of their `source` text. Each object's split follows its
group (`group` column): variants of one local asset share a group, every other object is a group of
its own, named by its key, so the built-in and Objaverse splits are those of the keys.

The folder is resumable and ends up matching the params: objects already in OUT are not redone,
and objects of an earlier run that are no longer selected are removed (OUT is a DVC output with
`persist: true`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from shapeflow import config, runner
from shapeflow import manifest as mf
from shapeflow.data import builtin, local, objaverse
from shapeflow.geometry.mesh import clean_mesh, load_mesh
from shapeflow.runner import Task

log = logging.getLogger(__name__)

T = TypeVar("T")

COLUMNS = ("key", "source", "path", "category", "license", "n_faces", "split", "group", "status", "reason", "defects")
# An imported object depends on nothing but its source file and this code: change the tag when the
# code changes what it writes, and every object is imported again.
PARAMS_HASH = "fetch-v1"
BUILTIN_LICENSE = "CC0-1.0"  # the built-in shapes are generated here


# ------------------------------------------------------------------------- per-object functions


def usable_faces(path: Path, where: str) -> int:
    """Face count of a mesh file as loaded; raises MeshError if later stages could not use it."""
    mesh = load_mesh(path)
    clean_mesh(mesh, where)
    return len(mesh.faces)


def import_object(task: Task, out_dir: Path) -> dict[str, Any]:
    """Check one source file and copy it (a .gltf packed into a .glb) to objects/<key><suffix>."""
    n_faces = usable_faces(Path(task.src), task.src)
    dest = local.import_file(task.src, out_dir / mf.OBJECTS, task.key)
    return {"path": dest.relative_to(out_dir).as_posix(), "n_faces": n_faces}


def write_builtin(blobs: dict[str, bytes], task: Task, out_dir: Path) -> dict[str, Any]:
    """Write one generated object (its PLY bytes are in `blobs`) to objects/<key>.ply."""
    rel = f"{mf.OBJECTS}/{task.key}.ply"
    with mf.atomic_path(out_dir / rel) as tmp:
        tmp.write_bytes(blobs[task.key])
        n_faces = usable_faces(tmp, task.src)
    return {"path": rel, "n_faces": n_faces}


# ------------------------------------------------------------------------------------ sources


def _meta(group: str, split: config.SplitParams, **fields: str) -> dict[str, str]:
    return {**fields, "group": group, "split": mf.split_for_group(group, split.val, split.test)}


def builtin_tasks(params: config.Params) -> tuple[list[Task], dict[str, bytes]]:
    """One task per generated object, and the PLY bytes that are its source file."""
    section = params.fetch.builtin
    tasks, blobs = [], {}
    for obj in builtin.generate_builtin(section.per_category, section.defect_share, params.seed):
        data = builtin.export_bytes(obj.mesh)
        key = hashlib.sha256(data).hexdigest()
        blobs[key] = data
        source = f"builtin:{obj.name}"
        meta = _meta(
            key,
            params.fetch.split,
            source=source,
            category=obj.category,
            license=BUILTIN_LICENSE,
            defects=";".join(obj.defects),
        )
        tasks.append(Task(key=key, src=source, meta=meta))
    return tasks, blobs


def local_tasks(fetch: config.FetchParams) -> tuple[list[Task], list[tuple[Task, str]]]:
    """One task per mesh file of each local folder: the category is its top sub-folder there, the
    group its name without variant words (`local.group_name`), the source local:<folder name>/<path>.
    And (task, reason) for each thing the scan skipped (an archive, a link leading out): `skipped`
    rows keyed by the sha256 of their source."""
    tasks, skipped = [], []
    for folder in fetch.local.paths:
        name = Path(folder).resolve().name
        found, left_out = local.scan(folder, fetch.local.recursive)
        for f in found:
            group = local.group_name(f.rel, fetch.split.variant_words)
            meta = _meta(group, fetch.split, source=f"local:{name}/{f.rel}", category=f.category, license="")
            tasks.append(Task(key=f.key, src=str(f.path), meta=meta))
        for s in left_out:
            source = f"local:{name}/{s.rel}"
            meta = {"source": source, "category": s.rel.split("/")[0] if "/" in s.rel else "", "license": ""}
            meta.update(group="", split="")
            key = hashlib.sha256(source.encode()).hexdigest()
            skipped.append((Task(key=key, src=mf.printable(str(s.path)), meta=meta), f"{s.path}: {s.reason}"))
    return tasks, skipped


def objaverse_tasks(
    fetch: config.FetchParams, out_dir: Path, client: objaverse.Client | None
) -> tuple[list[Task], list[tuple[Task, str]]]:
    """Tasks for the list's objects that are in OUT or could be downloaded, and (task, reason) failures.

    Objects already imported into OUT are not downloaded again (the cache may be gone, as on a
    machine that pulled OUT from a DVC remote).
    """
    section = fetch.objaverse
    rows = objaverse.read_uid_list(section.list, section.limit)
    done = _done_by_source(out_dir)
    fetched = objaverse.fetch_objects(
        [r for r in rows if _source(r) not in done],
        section.cache_dir,
        client=client,
        processes=section.processes,
        retries=section.retries,
    )
    new = [r.uid for r in rows if not r.license and r.uid in fetched and fetched[r.uid].path is not None]
    licences = objaverse.licences(new, section.cache_dir, client)
    tasks, failures = [], []
    for row in rows:
        source = _source(row)
        fields = {"source": source, "category": row.category}
        if source in done:
            record = done[source]
            meta = _meta(record["key"], fetch.split, **fields, license=row.license or record.get("license", ""))
            tasks.append(Task(key=record["key"], src=str(out_dir / record["path"]), meta=meta))
            continue
        got = fetched.get(row.uid)
        if got is not None and got.path is not None:
            meta = _meta(got.sha256, fetch.split, **fields, license=row.license or licences.get(row.uid, ""))
            tasks.append(Task(key=got.sha256, src=str(got.path), meta=meta))
        else:
            # No file, so no file hash: the list's sha256, else a hash of the identifier.
            key = row.sha256 or hashlib.sha256(source.encode()).hexdigest()
            meta = _meta(key, fetch.split, **fields, license=row.license)
            failures.append((Task(key=key, src=row.identifier, meta=meta), row.problem or got.reason))
    return tasks, failures


def _source(row: objaverse.ListRow) -> str:
    """objaverse:<uid>, or the list's own identifier when the row names no valid uid."""
    return f"objaverse:{row.uid if objaverse.UID_RE.match(row.uid) else row.identifier}"


def _done_by_source(out_dir: Path) -> dict[str, dict[str, Any]]:
    """source -> record of every object imported into OUT whose file is still there."""
    folder = out_dir / mf.RECORDS
    done = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = mf.read_record(out_dir, path.stem)
        if (
            record
            and record.get("status") == mf.OK
            and record.get("params_hash") == PARAMS_HASH
            and (out_dir / record.get("path", "")).is_file()
        ):
            done[record.get("source", "")] = record
    return done


# ------------------------------------------------------------------------------------ the stage


def run(
    params: config.Params, out_dir: str | Path, workers: int | None = None, *, client: objaverse.Client | None = None
) -> list[dict[str, Any]]:
    """Fetch the objects params.fetch selects into `out_dir`; returns their records (sorted by key).

    `workers` defaults to params.compute.workers; `client` replaces the Objaverse network calls.
    """
    with mf.writing_lock(out_dir):
        return _run(params, Path(out_dir), workers, client)


def _run(
    params: config.Params, out_dir: Path, workers: int | None, client: objaverse.Client | None
) -> list[dict[str, Any]]:
    fetch = params.fetch
    workers = params.compute.workers if workers is None else workers
    tasks: list[Task] = []
    failures: list[tuple[Task, str]] = []
    skipped: list[tuple[Task, str]] = []
    blobs: dict[str, bytes] = {}
    for source in fetch.sources:
        if source == "builtin":
            new, blobs = builtin_tasks(params)
        elif source == "local":
            new, skipped = local_tasks(fetch)
        else:
            new, failed = objaverse_tasks(fetch, out_dir, client)
            failures += failed
        tasks += new
    tasks, duplicates = _split_duplicates(tasks)
    keys = {t.key for t in tasks}
    failures = [f for f in _first_per_key(failures, lambda f: f[0].key) if f[0].key not in keys]
    desc = f"fetch {'+'.join(fetch.sources)}"
    generated = [t for t in tasks if t.src.startswith("builtin:")]
    files = [t for t in tasks if not t.src.startswith("builtin:")]
    records = []
    if generated:  # bytes already in memory: a process pool would only copy them around
        records += runner.run_objects(
            functools.partial(write_builtin, blobs), generated, out_dir, PARAMS_HASH, workers=1, desc=desc
        )
    if files:
        limits = runner.Limits.of(params.compute)
        records += runner.run_objects(
            import_object, files, out_dir, PARAMS_HASH, workers=workers, desc=desc, limits=limits
        )
    meta = {t.key: t.meta for t in tasks}
    records = [_refresh(out_dir, r, meta[r["key"]]) for r in records]
    records += [_record_without_file(out_dir, task, mf.FAILED, f"{task.src}: {reason}") for task, reason in failures]
    records += [
        _record_without_file(
            out_dir, task, mf.DUPLICATE, f"duplicate of {kept.key}: the same file as {kept.meta['source']}"
        )
        for task, kept in duplicates
    ]
    for task, reason in skipped:
        records.append(_record_without_file(out_dir, task, mf.SKIPPED, mf.printable(reason)))
        log.warning("fetch: skipped %s", mf.printable(reason))
    listed = tasks + [t for t, _ in failures] + [t for t, _ in duplicates] + [t for t, _ in skipped]
    runner.finish_manifest(out_dir, listed, COLUMNS)
    return sorted(records, key=lambda r: r["key"])


def _first_per_key(items: list[T], key: Callable[[T], str]) -> list[T]:
    seen: dict[str, T] = {}
    for item in items:
        seen.setdefault(key(item), item)
    return list(seen.values())


def _split_duplicates(tasks: list[Task]) -> tuple[list[Task], list[tuple[Task, Task]]]:
    """The first task of each key, and (duplicate, kept) for every later task of a key taken.

    A duplicate is re-keyed by the sha256 of its source text (its file's sha256 is the kept
    object's key) and belongs to no split.
    """
    kept: dict[str, Task] = {}
    duplicates = []
    for task in tasks:
        first = kept.setdefault(task.key, task)
        if first is not task:
            key = hashlib.sha256(task.meta["source"].encode()).hexdigest()
            duplicates.append((Task(key=key, src=task.src, meta={**task.meta, "split": ""}), first))
    return list(kept.values()), duplicates


def _refresh(out_dir: Path, record: dict[str, Any], meta: dict[str, str]) -> dict[str, Any]:
    """Bring the columns of an object done earlier up to date (split shares, category, licence)."""
    if all(record.get(k) == v for k, v in meta.items()):
        return record
    record = {**record, **meta}
    mf.write_record(out_dir, record)
    return record


def _record_without_file(out_dir: Path, task: Task, status: str, reason: str) -> dict[str, Any]:
    """The record of an object that gets no file: one that could not be had (not downloadable, download
    failed: FAILED), whose bytes are those of an object already taken (DUPLICATE), or something in a
    source folder that is no object (SKIPPED)."""
    record = {"key": task.key, **task.meta, "params_hash": PARAMS_HASH, "status": status, "reason": reason, "path": ""}
    mf.write_record(out_dir, record)
    return record


# --------------------------------------------------------------------------------- command line


def with_overrides(
    params: config.Params,
    source: str | None = None,
    path: str | None = None,
    uid_list: str | None = None,
    limit: int | None = None,
) -> config.Params:
    """params with command-line values (None = not given) put into params.fetch, re-checked."""
    fetch = params.fetch
    local_section = config.replace(fetch.local, path=path)
    objaverse_section = config.replace(fetch.objaverse, list=uid_list, limit=limit)
    fetch = config.replace(
        fetch,
        source=source,
        local=dataclasses.asdict(local_section),
        objaverse=dataclasses.asdict(objaverse_section),
    )
    return dataclasses.replace(params, fetch=fetch)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fetch", help="collect raw meshes: built-in shapes, local folders, Objaverse")
    p.add_argument("out", type=Path, help="output folder (objects/, records/, manifest.csv)")
    p.add_argument(
        "--source",
        choices=("builtin", "local", "objaverse"),
        help="default: params fetch.source (params fetch.extra_sources are fetched too)",
    )
    p.add_argument("--path", help="folder of mesh files for --source local (params fetch.local.path)")
    p.add_argument("--list", dest="uid_list", help="uid list csv for --source objaverse (params fetch.objaverse.list)")
    p.add_argument("--limit", type=int, help="first N rows of the uid list (params fetch.objaverse.limit)")
    p.add_argument(
        "--workers", type=int, help="local worker processes (default: params compute.workers; 0 = one per core)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = with_overrides(config.load_params(args.params), args.source, args.path, args.uid_list, args.limit)
    try:
        records = run(params, args.out, workers=args.workers)
    except objaverse.ObjaverseListError as exc:
        print(f"shapeflow fetch: error: {exc}", file=sys.stderr)
        return 2
    print(runner.summarize(records, f"fetch {'+'.join(params.fetch.sources)}"))
    return runner.exit_code(records)
