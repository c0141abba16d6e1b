"""Objaverse 1.0 objects from a uid list, through the `objaverse` package (0.1.7 API).

Lists: TRELLIS-500K csv files (`sha256`, `file_identifier`, and for ObjaverseXL a `source` column;
the Sketchfab rows' `file_identifier` is the model URL whose last path part is the uid) and
Step1X-3D style lists with a uid column. Rows that `objaverse.load_objects` cannot download (for
instance ObjaverseXL GitHub rows) are kept as failures with the reason.

Downloads land in objaverse's own cache layout under `cache_dir`
(`<cache_dir>/hf-objaverse-v1/glbs/<group>/<uid>.glb`, the same place `objaverse` uses when
cache_dir is ~/.objaverse), so a cache filled by other tools is reused. A cached file whose sha256
matches the list is never downloaded again; one that does not match is downloaded again.

The network side is a `Client` (download, annotations, sleep) so tests swap in fakes. Each batch
is retried with exponential backoff on transient errors; when the server cannot be reached at all
(no DNS, no route), every remaining object fails at once with that reason instead of waiting out
retries for each batch.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import gzip
import http.client
import itertools
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapeflow import manifest as mf

log = logging.getLogger(__name__)

OBJAVERSE_DIR = "hf-objaverse-v1"  # objaverse 0.1.7's folder under its base path
INDEX_FILE = "object-paths.json.gz"  # its uid -> repository path index, fetched on first use
UID_RE = re.compile(r"^[0-9a-f]{32}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UID_COLUMNS = ("uid", "object_uid", "objaverse_uid", "model_uid")
IDENTIFIER_COLUMNS = ("file_identifier", "fileidentifier")
# Values of a list's `source` column that objaverse.load_objects can download ("" = no column).
DOWNLOADABLE_SOURCES = ("", "sketchfab", "objaverse")

Downloader = Callable[[list[str], Path, int], dict[str, str]]
Annotator = Callable[[list[str], Path], dict[str, dict[str, Any]]]


class ObjaverseListError(ValueError):
    """A uid list that cannot be read (missing file columns)."""


class DownloadError(RuntimeError):
    """A download problem that is not a plain network error; `transient` says whether to retry."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


# What a download can raise: URLError/HTTPError, timeouts and resets are OSErrors.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, DownloadError)
# What reading objaverse's cached index or metadata raises when a download of it was cut short.
_CUT_SHORT_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, json.JSONDecodeError)


# ------------------------------------------------------------------------------------ the list


@dataclass(frozen=True)
class ListRow:
    uid: str  # Objaverse 1.0 uid (32 hex digits) or what the row gave in its place
    identifier: str  # how the list names the object (file_identifier, else uid), for messages
    sha256: str = ""  # sha256 of the glb, "" when the list has none
    source: str = ""  # the list's source column, lower case
    category: str = ""
    license: str = ""
    problem: str = ""  # why this row cannot be downloaded; "" when it can


def read_uid_list(path: str | Path, limit: int) -> list[ListRow]:
    """The first `limit` rows of a uid list csv."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: uid list not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        uid_col = next((columns[c] for c in UID_COLUMNS if c in columns), None)
        id_col = next((columns[c] for c in IDENTIFIER_COLUMNS if c in columns), None)
        if uid_col is None and id_col is None:
            raise ObjaverseListError(
                f"{path}: no uid column ({', '.join(UID_COLUMNS)}) and no file_identifier column; "
                f"its columns are {list(columns.values())}"
            )
        pick = {name: columns.get(name) for name in ("sha256", "source", "category", "license")}
        return [_row(raw, uid_col, id_col, pick) for raw in itertools.islice(reader, limit)]


def _row(raw: dict[str, str], uid_col: str | None, id_col: str | None, pick: dict[str, str | None]) -> ListRow:
    def cell(column: str | None) -> str:
        return (raw.get(column) or "").strip() if column else ""

    identifier = cell(id_col) or cell(uid_col)
    uid = (cell(uid_col) or uid_from_identifier(identifier)).lower()
    source = cell(pick["source"]).lower()
    sha256 = cell(pick["sha256"]).lower()
    problem = ""
    if source not in DOWNLOADABLE_SOURCES:
        problem = (f"source {source!r} is not downloadable through objaverse.load_objects "
                   "(Objaverse 1.0 / Sketchfab objects only)")
    elif not UID_RE.match(uid):
        problem = f"{identifier!r} does not name an Objaverse 1.0 uid (32 hex digits)"
    elif sha256 and not SHA256_RE.match(sha256):
        problem = f"the list's sha256 {sha256!r} is not a sha256 hex digest"
    return ListRow(uid=uid, identifier=identifier, sha256=sha256, source=source,
                   category=cell(pick["category"]), license=cell(pick["license"]), problem=problem)


def uid_from_identifier(identifier: str) -> str:
    """The uid in a Sketchfab model URL (its last path part) or a bare uid / `<uid>.glb`."""
    last = urllib.parse.urlparse(identifier).path.rstrip("/").rsplit("/", 1)[-1]
    return last.removesuffix(".glb")


# ------------------------------------------------------------------------- the network client


@contextlib.contextmanager
def _objaverse_cache(cache_dir: Path) -> Iterator[Any]:
    """The objaverse module, pointed at `cache_dir` while the block runs.

    objaverse 0.1.7 takes no download folder: every function reads the module global
    `_VERSIONED_PATH` (~/.objaverse/hf-objaverse-v1), so that is what is redirected.
    """
    import objaverse

    saved = objaverse._VERSIONED_PATH
    objaverse._VERSIONED_PATH = str(cache_dir / OBJAVERSE_DIR)
    try:
        yield objaverse
    finally:
        objaverse._VERSIONED_PATH = saved


def objaverse_download(uids: list[str], cache_dir: Path, processes: int) -> dict[str, str]:
    """uid -> local glb path, via objaverse.load_objects; uids missing from its index are left out.

    `processes` threads each call load_objects(..., download_processes=1) on a share of the uids:
    with download_processes > 1 objaverse 0.1.7 uses a process pool, and an HTTP error in one of
    its workers cannot be unpickled in the parent (HTTPError takes five constructor arguments), so
    the pool's result thread dies and load_objects never returns. Threads pass exceptions as they
    are, and downloads wait on the network, not on the GIL.
    """
    with _objaverse_cache(cache_dir) as objaverse:
        _load_index(objaverse, cache_dir)  # once, here, so the threads do not all fetch it at once
        n = max(1, min(processes, len(uids)))
        shares = [uids[i::n] for i in range(n)]
        with ThreadPoolExecutor(len(shares)) as pool:
            found = list(pool.map(lambda share: objaverse.load_objects(share, download_processes=1), shares))
    return {uid: path for part in found for uid, path in part.items()}


def _load_index(objaverse: Any, cache_dir: Path) -> None:
    """Load (downloading if needed) objaverse's index; a copy cut short is removed for the retry."""
    index = cache_dir / OBJAVERSE_DIR / INDEX_FILE
    try:
        objaverse.load_objects([], download_processes=1)
    except _CUT_SHORT_ERRORS as exc:
        index.unlink(missing_ok=True)
        raise DownloadError(f"{index}: unreadable ({type(exc).__name__}: {exc}); removed so that the next "
                            "attempt downloads it again", transient=True) from exc


def objaverse_annotations(uids: list[str], cache_dir: Path) -> dict[str, dict[str, Any]]:
    """uid -> Objaverse 1.0 metadata (licence, name, ...) via objaverse.load_annotations."""
    with _objaverse_cache(cache_dir) as objaverse:
        return objaverse.load_annotations(uids)


@dataclass(frozen=True)
class Client:
    """The network side of Objaverse, swapped for fakes in tests."""

    download: Downloader = objaverse_download
    annotations: Annotator = objaverse_annotations
    sleep: Callable[[float], None] = time.sleep


# ------------------------------------------------------------------------------- downloading


@dataclass(frozen=True)
class Fetched:
    path: Path | None  # the verified glb, None when it could not be had
    sha256: str = ""  # of the file at `path`
    reason: str = ""  # why `path` is None


def cached_glbs(cache_dir: Path) -> dict[str, Path]:
    """uid -> glb already in the cache (objaverse's layout: glbs/<group>/<uid>.glb)."""
    root = Path(cache_dir) / OBJAVERSE_DIR / "glbs"
    if not root.is_dir():
        return {}
    return {p.stem: p for p in root.glob("*/*.glb") if p.is_file()}


def fetch_objects(
    rows: Sequence[ListRow],
    cache_dir: str | Path,
    *,
    client: Client | None = None,
    processes: int = 4,
    retries: int = 3,
    batch_size: int = 64,
    backoff_s: float = 2.0,
) -> dict[str, Fetched]:
    """uid -> Fetched for every downloadable row: from the cache when its sha256 matches, else downloaded."""
    client = client or Client()
    cache_dir = Path(cache_dir).expanduser()
    cached = cached_glbs(cache_dir)
    results: dict[str, Fetched] = {}
    todo: list[ListRow] = []
    seen: set[str] = set()
    for row in rows:
        if row.problem or row.uid in seen:
            continue
        seen.add(row.uid)
        hit = _from_cache(row, cached.get(row.uid))
        if hit is not None:
            results[row.uid] = hit
        else:
            todo.append(row)
    if todo:
        log.info("objaverse: %d of %d objects to download", len(todo), len(todo) + len(results))
    download = functools.partial(_download_rows, client, cache_dir=cache_dir, processes=processes,
                                 retries=retries, backoff_s=backoff_s)
    unreachable = ""
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        if unreachable:
            results.update({row.uid: Fetched(None, reason=unreachable) for row in batch})
            continue
        got, unreachable = download(batch)
        results.update(got)
    return results


def _download_rows(
    client: Client, rows: list[ListRow], *, cache_dir: Path, processes: int, retries: int, backoff_s: float
) -> tuple[dict[str, Fetched], str]:
    """(uid -> Fetched, reason when the server is unreachable or "") for one batch.

    When a batch fails for good, its objects are tried one by one, so that one object the server
    refuses (objaverse stops a whole call at the first error) does not cost the rest of its batch.
    """
    got, reason, offline = _download_batch(client, [r.uid for r in rows], cache_dir, processes, retries, backoff_s)
    if not reason:
        return {row.uid: _verify(row, got.get(row.uid)) for row in rows}, ""
    if offline or len(rows) == 1:
        return {row.uid: Fetched(None, reason=reason) for row in rows}, reason if offline else ""
    log.warning("objaverse: a batch of %d failed (%s); trying its objects one by one", len(rows), reason)
    results: dict[str, Fetched] = {}
    unreachable = ""
    for row in rows:
        if unreachable:
            results[row.uid] = Fetched(None, reason=unreachable)
            continue
        got_one, unreachable = _download_rows(client, [row], cache_dir=cache_dir, processes=processes,
                                              retries=retries, backoff_s=backoff_s)
        results.update(got_one)
    return results, unreachable


def _from_cache(row: ListRow, path: Path | None) -> Fetched | None:
    """The cached file when it matches the list; a mismatching one is removed so it is fetched anew."""
    if path is None:
        return None
    sha = mf.file_sha256(path)
    if not row.sha256 or sha == row.sha256:
        return Fetched(path, sha)
    log.info("objaverse: cached %s has sha256 %s, the list says %s: downloading it again", path, sha, row.sha256)
    path.unlink()
    return None


def _download_batch(
    client: Client, uids: list[str], cache_dir: Path, processes: int, retries: int, backoff_s: float
) -> tuple[dict[str, str], str, bool]:
    """(uid -> path, failure reason or "", whether the server was unreachable) for one batch."""
    attempt = 0
    while True:
        try:
            return client.download(uids, cache_dir, processes), "", False
        except DOWNLOAD_ERRORS as exc:
            kind = _classify(exc)
            what = f"{type(exc).__name__}: {exc}"
            if kind == "offline":
                return {}, f"offline: the Objaverse server cannot be reached ({what})", True
            if kind == "permanent" or attempt >= retries:
                return {}, f"download failed after {attempt + 1} attempt(s): {what}", False
            delay = backoff_s * 2**attempt
            log.warning("objaverse: download of %d object(s) failed (%s); retry %d of %d in %.1f s",
                        len(uids), what, attempt + 1, retries, delay)
            client.sleep(delay)
            attempt += 1


def _classify(exc: BaseException) -> str:
    """'offline' (no DNS, no route, refused), 'permanent' (4xx but 429) or 'transient'."""
    if isinstance(exc, DownloadError):
        return "transient" if exc.transient else "permanent"
    if isinstance(exc, urllib.error.HTTPError):
        return "transient" if exc.code == 429 or exc.code >= 500 else "permanent"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):
        return "offline"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "offline"
    return "transient"


def _verify(row: ListRow, path: str | None) -> Fetched:
    if path is None:
        return Fetched(None, reason=f"uid {row.uid} is not in the Objaverse 1.0 index (objaverse skipped it)")
    file = Path(path)
    if not file.is_file():
        return Fetched(None, reason=f"the downloader reported {file} for uid {row.uid}, but no file is there")
    sha = mf.file_sha256(file)
    if row.sha256 and sha != row.sha256:
        file.unlink()
        return Fetched(None, reason=f"sha256 mismatch: the list says {row.sha256}, the downloaded file has {sha}")
    return Fetched(file, sha)


def licences(uids: list[str], cache_dir: str | Path, client: Client | None = None) -> dict[str, str]:
    """uid -> licence from the Objaverse annotations; empty (with a warning) when they cannot be had."""
    if not uids:
        return {}
    client = client or Client()
    try:
        annotations = client.annotations(uids, Path(cache_dir).expanduser())
    except DOWNLOAD_ERRORS + _CUT_SHORT_ERRORS + (KeyError,) as exc:
        log.warning("objaverse: licences unavailable (%s: %s); the license column stays empty",
                    type(exc).__name__, exc)
        return {}
    return {uid: str(annotations.get(uid, {}).get("license") or "") for uid in uids}
