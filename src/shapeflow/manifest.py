"""Object records, manifests, atomic writes and hashing.

Every stage writes `manifest.csv` into its output folder: one row per object, keyed by the sha256 of
the object's source file. Per-object records are also kept as small JSON files under `records/`, each
written atomically right after the object's output, so a killed stage loses at most the objects in
flight and a rerun picks up from the records.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.csv"
RECORDS = "records"
OBJECTS = "objects"

OK = "ok"
FAILED = "failed"
DUPLICATE = "duplicate"  # a fetch row whose file is byte-identical to an object kept under another row
SKIPPED = "skipped"  # a fetch row for something in a source folder that is no object (an archive, a link out)

# The leading manifest columns of every per-object stage after fetch: the object, its outcome, and what
# it carries over from the fetch row.
OBJECT_COLUMNS = ("key", "path", "status", "reason", "source", "category", "split", "license")


class ManifestError(ValueError):
    """A manifest is missing columns or cannot be read."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_for_key(key: str, val: float, test: float) -> str:
    """train/val/test as a fixed function of the key, so adding objects never moves existing ones."""
    u = int(key[:15], 16) / float(16**15)  # uniform in [0, 1) for a sha256 hex key
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def split_for_group(group: str, val: float, test: float) -> str:
    """The split of every object of `group`, a fixed function of the group's name.

    An object that is a group of its own is named by its key (64 hex digits) and splits as the key
    does; any other name is hashed first.
    """
    if len(group) != 64 or any(c not in "0123456789abcdef" for c in group):
        group = hashlib.sha256(group.encode()).hexdigest()
    return split_for_key(group, val, test)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed onto `dest`, else removed.

    The temporary name keeps `dest`'s suffix, so writers that pick the format from the suffix
    (trimesh, numpy) work unchanged.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    # mkstemp makes the file 0600; the result gets the mode any new file would (0666 less the umask),
    # so other users of a shared data folder or DVC cache can read it.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | Path, text: str) -> None:
    atomic_write_bytes(dest, text.encode())


def remove_stale_temporaries(folder: str | Path, keys: Collection[str] | None = None) -> None:
    """Remove temporary files a killed run left behind (they never carry a finished result); with
    `keys`, only those of these objects (a shard must not touch the files other shards are writing)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp*"):
            if keys is None or tmp.name[1:].split(".", 1)[0] in keys:
                tmp.unlink(missing_ok=True)


# Errors of the storage rather than of an object: nothing more can be written there. EACCES and
# EPERM count when they concern the output folder (an input that cannot be read is the object's).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}


class StorageError(OSError):
    """Writing failed for a reason that is the storage's (disk full, read-only, no permission):
    one line that says what and where (`storage_error`)."""

    def __str__(self) -> str:
        return str(self.strerror)


def storage_error(cause: OSError, out_dir: str | Path | None = None) -> StorageError | None:
    """`cause` as a StorageError when it is the storage's fault (in `out_dir`, when given), else None."""
    if isinstance(cause, StorageError):
        return cause
    named = Path(os.fsdecode(cause.filename)).resolve() if cause.filename else None
    inside = named is not None and (out_dir is None or named.is_relative_to(Path(out_dir).resolve()))
    if not (cause.errno in STORAGE_ERRNOS or (cause.errno in PERMISSION_ERRNOS and inside)):
        return None
    where = os.fsdecode(cause.filename) if cause.filename else "the output folder"
    hint = {errno.ENOSPC: " (disk full?)", errno.EDQUOT: " (disk quota?)", errno.EROFS: " (read-only)"}
    return StorageError(cause.errno, f"cannot write {printable(where)}: {cause.strerror}{hint.get(cause.errno, '')}")


class FolderBusyError(RuntimeError):
    """Another run is writing into the same output folder."""


@contextlib.contextmanager
def writing_lock(folder: str | Path, shard: tuple[int, int] = (0, 1)) -> Iterator[None]:
    """Hold `folder` against other runs while writing into it.

    A run over all objects takes an exclusive lock on `.<folder name>.lock` beside the folder (not in
    it: the folder may be a DVC output, whose hash must not see the lock). A shard (rank, world size)
    of a run spread over several processes takes a shared lock on it and an exclusive one on its own
    shard's lock: shards of one run work side by side, while a second run into the folder, or the
    same shard twice, is refused with the holder's pid and command. The kernel drops a lock when its
    process ends, however it ends, so a killed run leaves none behind.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rank, world = shard
    whole = folder.parent / f".{folder.name}.lock"
    locks = [(whole, fcntl.LOCK_EX if world == 1 else fcntl.LOCK_SH)]
    if world > 1:
        locks.append((folder.parent / f".{folder.name}.shard-{rank}-of-{world}.lock", fcntl.LOCK_EX))
    held: list[int] = []
    try:
        for path, mode in locks:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            held.append(fd)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = path.read_text(errors="replace").strip() or "a process that did not say"
                raise FolderBusyError(
                    f"{folder}: another run is writing into it ({holder}); wait for it to end or stop it"
                ) from None
            if mode == fcntl.LOCK_EX:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(errors="replace"))
        yield
    finally:
        for fd in held:
            os.close(fd)


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be computed (NaN, inf) is written as null; dicts are
    walked."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_manifest(path: str | Path, required: Sequence[str] = ("key", "path")) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; has {columns}")
        return list(reader)


def write_manifest(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write rows (sorted by key) to a CSV atomically; columns not in `columns` are appended."""
    rows = sorted(rows, key=lambda r: str(r.get("key", "")))
    extra = sorted({k for r in rows for k in r} - set(columns))
    header = list(columns) + extra
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, extrasaction="raise")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(row.get(k, "")) for k in header})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v) for v in value)
    return printable(str(value))


def printable(text: str) -> str:
    """`text` as valid UTF-8: the bytes of a file name that is not UTF-8 (which Python keeps as lone
    surrogates) become backslash escapes, so `caf\xe9.obj` in Latin-1 reads `caf\\xe9.obj`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def record_path(out_dir: str | Path, key: str) -> Path:
    return Path(out_dir) / RECORDS / f"{key}.json"


def write_record(out_dir: str | Path, record: dict[str, Any]) -> None:
    atomic_write_text(record_path(out_dir, record["key"]), json.dumps(record, sort_keys=True, indent=1))


def read_record(out_dir: str | Path, key: str) -> dict[str, Any] | None:
    path = record_path(out_dir, key)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a record cut short is as good as none: the object is redone
