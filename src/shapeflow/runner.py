"""Map a per-object function over the objects of a folder: resumable, parallel, shardable.

A per-object function takes a `Task` and the output folder, writes its output atomically and returns
the fields of its record. The runner skips objects whose record says `ok` under the same params,
runs the rest on local worker processes, turns an exception into a `failed` record with its reason,
and survives a worker that dies (a crash in native code): the objects it held are retried one at a
time, and the one that kills its worker again is recorded as failed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shapeflow import manifest as mf
from shapeflow.geometry.mesh import FACE_LIMIT, MESH_SUFFIXES

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies
WATCH_PARENT_SECONDS = 0.5

ObjectFn = Callable[["Task", Path], dict[str, Any]]


@dataclass(frozen=True)
class Task:
    key: str
    src: str  # absolute path of the input file
    meta: dict[str, Any] = field(default_factory=dict)  # columns carried over from the input manifest


TIMINGS = "timings.csv"

# Columns an input manifest may carry that later stages keep (a stage's own fields win; the
# transform back to the source's frame, scale and offset, is composed by stages that renormalise).
CARRIED = ("source", "category", "license", "split", "scale", "offset_x", "offset_y", "offset_z")
# The carried columns that describe the object rather than a stage's result: an object done earlier
# takes their current values (a split moved by a change of fetch.split, say) without being redone.
LABELS = ("source", "category", "license", "split")


def collect_tasks(src_dir: str | Path, split_val: float = 0.1, split_test: float = 0.1) -> list[Task]:
    """Tasks for every object in `src_dir`: from its manifest.csv, or from the mesh files in it.

    Objects that failed upstream, and fetch's duplicate rows, are left out (their reason stays in the
    upstream manifest).
    """
    src_dir = Path(src_dir).resolve()
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: input folder not found")
    manifest_path = src_dir / mf.MANIFEST
    tasks: list[Task] = []
    if manifest_path.is_file():
        rows = mf.read_manifest(manifest_path)
        for row in rows:
            if row.get("status", mf.OK) != mf.OK:
                continue
            meta = {k: row[k] for k in CARRIED if row.get(k)}
            tasks.append(Task(key=row["key"], src=str(src_dir / row["path"]), meta=meta))
        duplicates = sum(row.get("status") == mf.DUPLICATE for row in rows)
        left_out = sum(row.get("status") == mf.SKIPPED for row in rows)
        failed = len(rows) - len(tasks) - duplicates - left_out
        if failed or duplicates or left_out:
            log.info(
                "%s: %d failed upstream, %d duplicate and %d skipped row(s), not processed",
                manifest_path,
                failed,
                duplicates,
                left_out,
            )
    else:
        for path in sorted(p for p in src_dir.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file()):
            key = mf.file_sha256(path)
            meta = {"source": str(path.relative_to(src_dir)), "split": mf.split_for_key(key, split_val, split_test)}
            tasks.append(Task(key=key, src=str(path), meta=meta))
    seen: dict[str, Task] = {}
    for task in tasks:
        seen.setdefault(task.key, task)  # the same file twice is one object
    return sorted(seen.values(), key=lambda t: t.key)


def _input_sha256(task: Task) -> str:
    """The input file's sha256 ('' when it cannot be read): an object whose input changed under the
    same key (a watertight mesh remade at another resolution) is redone, not skipped."""
    try:
        return mf.file_sha256(task.src)
    except OSError:
        return ""


def _done(out_dir: Path, task: Task, params_hash: str) -> dict[str, Any] | None:
    record = mf.read_record(out_dir, task.key)
    if record is None or record.get("status") != mf.OK or record.get("params_hash") != params_hash:
        return None
    if not (out_dir / record.get("path", "")).is_file():
        return None
    if record.get("input_sha256") != _input_sha256(task):
        return None
    return record


def _relabel(out_dir: Path, record: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """`record` with the LABELS columns of `meta` (the input manifest's), rewritten when they differ."""
    labels = {k: meta[k] for k in LABELS if k in meta}
    if all(record.get(k) == v for k, v in labels.items()):
        return record
    record = {**record, **labels}
    mf.write_record(out_dir, record)
    return record


@dataclass(frozen=True)
class Limits:
    """Bounds on one object (0: none), from params.compute; see `_call_bounded`."""

    max_file_mb: float = 0.0
    max_faces: int = 0
    timeout_s: float = 0.0

    @classmethod
    def of(cls, compute) -> Limits:
        return cls(compute.max_file_mb, compute.max_faces, compute.object_timeout_s)


class ObjectTooBig(Exception):
    """An object past one of the Limits."""


def _call_bounded(fn: ObjectFn, task: Task, out_dir: Path, limits: Limits) -> dict[str, Any]:
    """`fn(task, out_dir)` within `limits`: the input file's size is checked first, the face count
    when the mesh is loaded (`mesh.FACE_LIMIT`), the time by an alarm that interrupts the object
    between two Python steps (a single native call that never returns is not cut short)."""
    src = Path(task.src)
    if limits.max_file_mb and src.is_file() and src.stat().st_size > limits.max_file_mb * 2**20:
        size = src.stat().st_size / 2**20
        raise ObjectTooBig(f"{size:,.0f} MB, more than the {limits.max_file_mb:g} MB allowed (compute.max_file_mb)")
    token = FACE_LIMIT.set(limits.max_faces or None)
    alarm = bool(limits.timeout_s) and threading.current_thread() is threading.main_thread()
    if alarm:

        def expire(signum, frame):
            raise ObjectTooBig(f"timeout: not done after {limits.timeout_s:g} s (compute.object_timeout_s)")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, limits.timeout_s)
    try:
        return fn(task, out_dir)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        FACE_LIMIT.reset(token)


def _run_one(fn: ObjectFn, task: Task, out_dir: Path, params_hash: str, limits: Limits) -> dict[str, Any]:
    """Run `fn` on one task within `limits` and write its record; never raises for a bad object."""
    if _STARTS is not None:
        _STARTS.put((task.key, time.monotonic()))
    start = time.perf_counter()
    record: dict[str, Any] = {
        "key": task.key,
        **task.meta,
        "params_hash": params_hash,
        "input_sha256": _input_sha256(task),
    }
    try:
        fields = _call_bounded(fn, task, out_dir, limits)
    except OSError as exc:
        storage = mf.storage_error(exc, out_dir)
        if storage is not None:  # no object can be written: stop, saying where
            raise storage from None
        record.update(status=mf.FAILED, reason=f"{task.src}: {type(exc).__name__}: {exc}", path="")
    except Exception as exc:  # a per-object failure is recorded, never allowed to stop the others
        message = str(exc).removeprefix(f"{task.src}: ")  # errors that name the file already
        record.update(status=mf.FAILED, reason=f"{task.src}: {type(exc).__name__}: {message}", path="")
        log.debug("object %s failed", task.key, exc_info=True)
    else:
        record.update(fields, status=mf.OK, reason="")
    mf.write_record(out_dir, record)
    # Timings stay out of the record: outputs must be a pure function of inputs and params.
    _log_timing(out_dir, task.key, record["status"], time.perf_counter() - start)
    return record


def _log_timing(out_dir: Path, key: str, status: str, seconds: float) -> None:
    """Append to `timings.csv`, a log beside the outputs that DVC ignores (see .dvcignore)."""
    with open(out_dir / TIMINGS, "a") as fh:
        fh.write(f"{key},{status},{seconds:.3f}\n")


# In a worker process: where `_run_one` reports (key, time.monotonic()) as it begins an object, so
# the parent's time bound counts from then. CLOCK_MONOTONIC is one clock for every process of a machine.
_STARTS = None


def _init_worker(parent: int, starts=None) -> None:
    global _STARTS
    _STARTS = starts
    _die_with_parent(parent)
    # One process per core already: keep native thread pools from oversubscribing the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("IGL_NUM_THREADS", "1")  # libigl's own pool ignores OMP_NUM_THREADS
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:
        pass


def _die_with_parent(parent: int) -> None:
    """End this worker when the stage process that started it dies, even by SIGKILL (it would go on
    writing records and holding memory otherwise): the kernel's parent-death signal on Linux, and a
    thread that watches the parent pid everywhere (it also covers a parent that died before this ran)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_PARENT_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def run_objects(
    fn: ObjectFn,
    tasks: Sequence[Task],
    out_dir: str | Path,
    params_hash: str,
    *,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    desc: str = "objects",
    limits: Limits = Limits(),
) -> list[dict[str, Any]]:
    """Run `fn` over this rank's share of `tasks`, each object within `limits`; returns the records
    of that share."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    out_dir = Path(out_dir)
    (out_dir / mf.RECORDS).mkdir(parents=True, exist_ok=True)
    shard = sorted(tasks, key=lambda t: t.key)[rank::world_size]
    mf.remove_stale_temporaries(out_dir, None if world_size == 1 else {t.key for t in shard})
    records: dict[str, dict[str, Any]] = {}
    todo: list[Task] = []
    for task in shard:
        done = _done(out_dir, task, params_hash)
        if done is not None:
            records[task.key] = _relabel(out_dir, done, task.meta)
        else:
            todo.append(task)
    if records:
        log.info("%s: %d of %d already done, %d to go", desc, len(records), len(shard), len(todo))
    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(shard), initial=len(records), desc=desc, unit="obj", disable=None) as bar:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                records[task.key] = _run_one(fn, task, out_dir, params_hash, limits)
                bar.update()
        else:
            for record in _run_pool(fn, todo, out_dir, params_hash, limits, min(workers, len(todo)), bar):
                records[record["key"]] = record
    return [records[t.key] for t in shard]


def _hard_limit(limits: Limits) -> float | None:
    """Seconds after which an object's worker is ended from outside: past the alarm that
    `_call_bounded` sets, for an object stuck where the alarm cannot reach (a native call)."""
    return 1.5 * limits.timeout_s + 5.0 if limits.timeout_s else None


def _end_workers(pool: ProcessPoolExecutor) -> None:
    for process in list((pool._processes or {}).values()):
        process.kill()


def _drain(starts, began: dict[str, float]) -> None:
    """Move the (key, monotonic time) reports that workers put as they begin an object into `began`."""
    while True:
        try:
            key, when = starts.get_nowait()
        except queue.Empty:
            return
        began[key] = when


def _run_pool(fn, todo, out_dir, params_hash, limits, workers, bar):
    ctx = mp.get_context("spawn")  # fork is unsafe with the thread pools of numba, igl and tqdm
    pending = list(todo)
    suspects: list[Task] = []
    hard = _hard_limit(limits)
    while pending:
        starts = ctx.Queue()
        began: dict[str, float] = {}
        init = (os.getpid(), starts)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
            running: dict[Future, Task] = {}
            broken = False
            while (pending or running) and not broken:
                while pending and len(running) < 2 * workers:
                    task = pending.pop(0)
                    running[pool.submit(_run_one, fn, task, out_dir, params_hash, limits)] = task
                finished, _ = wait(running, timeout=1.0 if hard else None, return_when=FIRST_COMPLETED)
                # The bound counts from when a worker began the object: not from its submission, which
                # can be long before under load (workers still starting, objects queued behind others).
                if hard:
                    _drain(starts, began)
                    now = time.monotonic()
                    in_flight = [t.key for f, t in running.items() if f not in finished and t.key in began]
                    if any(now - began[key] > hard for key in in_flight):
                        _end_workers(pool)  # which worker holds the stuck object is unknown: all go
                for fut in finished:
                    task = running.pop(fut)
                    try:
                        yield fut.result()
                        bar.update()
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(task)
            if broken:
                suspects.extend(running.values())
                pool.shutdown(wait=False, cancel_futures=True)
        # Each object that was in flight when a worker died runs alone, so the culprit is known.
        for task in suspects:
            yield _run_isolated(fn, task, out_dir, params_hash, limits, ctx)
            bar.update()
        suspects = []


def _result_within(future: Future, starts, hard: float | None) -> dict[str, Any]:
    """The future's result; FutureTimeout once its object has run `hard` seconds in the worker
    (however long the worker took to start)."""
    if not hard:
        return future.result()
    began: dict[str, float] = {}
    while not wait([future], timeout=1.0).done:
        _drain(starts, began)
        if began and time.monotonic() - min(began.values()) > hard:
            raise FutureTimeout
    return future.result()


def _run_isolated(fn, task, out_dir, params_hash, limits, ctx) -> dict[str, Any]:
    starts = ctx.Queue()
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), starts)) as pool:
        future = pool.submit(_run_one, fn, task, out_dir, params_hash, limits)
        try:
            return _result_within(future, starts, _hard_limit(limits))
        except (BrokenProcessPool, FutureTimeout) as exc:
            timed_out = isinstance(exc, FutureTimeout)
            if timed_out:
                _end_workers(pool)
            why = (
                f"timeout: not done after {limits.timeout_s:g} s (compute.object_timeout_s); its worker was ended"
                if timed_out
                else "the worker process died while processing this object (a crash in native code or out of memory)"
            )
            record = {
                "key": task.key,
                **task.meta,
                "params_hash": params_hash,
                "status": mf.FAILED,
                "reason": f"{task.src}: {why}",
                "path": "",
            }
            mf.write_record(out_dir, record)
            return record


def run_stage(
    fn: ObjectFn,
    src: str | Path,
    dst: str | Path,
    params_hash: str,
    columns: Sequence[str],
    params,
    *,
    workers: int | None,
    rank: int,
    world_size: int,
    desc: str,
) -> list[dict[str, Any]]:
    """A per-object stage from end to end: its inputs, this rank's share of the work, the manifest,
    holding `dst` against other runs meanwhile (`mf.writing_lock`)."""
    tasks = collect_tasks(src, params.fetch.split.val, params.fetch.split.test)
    with mf.writing_lock(dst, (rank, world_size)):
        records = run_objects(
            fn,
            tasks,
            dst,
            params_hash,
            workers=params.compute.workers if workers is None else workers,
            rank=rank,
            world_size=world_size,
            desc=desc,
            limits=Limits.of(params.compute),
        )
        finish_manifest(dst, tasks, columns)
    return records


def finish_manifest(
    out_dir: str | Path, tasks: Sequence[Task], columns: Sequence[str], world_size: int = 1
) -> Path | None:
    """Write manifest.csv from the records of all tasks, once every task has one.

    With several ranks, each rank calls this after its shard; the last one to finish writes it.
    """
    out_dir = Path(out_dir)
    keys = {t.key for t in tasks}
    records = [r for k in sorted(keys) if (r := mf.read_record(out_dir, k)) is not None]
    if len(records) < len(keys):
        log.info("%d of %d objects have records; the manifest is written by the last shard", len(records), len(keys))
        return None
    _prune(out_dir, keys)
    path = out_dir / mf.MANIFEST
    mf.write_manifest(path, records, columns)
    return path


def _prune(out_dir: Path, keys: set[str]) -> None:
    """Drop outputs and records of objects no longer in the input, so the folder matches it."""
    for sub in (mf.RECORDS, mf.OBJECTS):
        folder = out_dir / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.split(".", 1)[0] not in keys:
                    path.unlink()


def summarize(records: Sequence[dict[str, Any]], desc: str) -> str:
    failed = [r for r in records if r.get("status") not in (mf.OK, mf.DUPLICATE, mf.SKIPPED)]
    ok = sum(r.get("status") == mf.OK for r in records)
    duplicates = sum(r.get("status") == mf.DUPLICATE for r in records)
    skipped = sum(r.get("status") == mf.SKIPPED for r in records)
    lines = [
        f"{desc}: {ok} ok, {len(failed)} failed"
        + (f", {duplicates} duplicate" if duplicates else "")
        + (f", {skipped} skipped" if skipped else "")
    ]
    lines += [f"  failed {r['key'][:12]}: {r.get('reason', '')}" for r in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (see manifest.csv)")
    return "\n".join(lines)


def exit_code(records: Sequence[dict[str, Any]]) -> int:
    """0 when at least one object came through (failures are in the manifest), 1 when none did."""
    if records and not any(r.get("status") == mf.OK for r in records):
        return 1
    return 0


def add_worker_arguments(parser) -> None:
    """--workers, --rank and --world-size, shared by every per-object stage command."""
    parser.add_argument(
        "--workers", type=int, help="local worker processes (default: params compute.workers; 0 = one per core)"
    )
    parser.add_argument(
        "--rank", type=int, default=0, help="this shard's index when the objects are split over machines"
    )
    parser.add_argument("--world-size", type=int, default=1, help="number of shards")
