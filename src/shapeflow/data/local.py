"""A folder of mesh files as a data source.

Each file is one object keyed by the sha256 of its bytes. Importing copies it to
`<objects>/<key><suffix>`; a .gltf becomes a self-contained .glb, because its buffers and textures
live in separate files that would not travel with a copy of the .gltf alone. The key stays the
sha256 of the .gltf, so the object is found again from the same source file. Files are grouped by
name (`group_name`) so that variants of one asset land in one split.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from shapeflow import manifest as mf
from shapeflow.geometry.mesh import MESH_SUFFIXES, gltf_to_glb


@dataclass(frozen=True)
class LocalFile:
    path: Path  # absolute
    rel: str  # relative to the scanned folder, with forward slashes
    key: str  # sha256 of the file

    @property
    def category(self) -> str:
        """The first folder under the scanned root ("chair/a.obj" -> "chair"); "" at the root.

        The top folder is what dataset layouts use for the class (ShapeNet's synset folders, a
        folder per category), whereas the immediate parent is often a per-model folder.
        """
        parts = self.rel.split("/")
        return parts[0] if len(parts) > 1 else ""


_NAME_SEPARATORS = re.compile(r"[\s_.\-]+")


def group_name(rel: str, variant_words: Collection[str]) -> str:
    """The group of the file at `rel` (its path under the scanned folder): its folder, then its name
    lower-cased, without the suffix and without the words of `variant_words` (lower case).

    Words are what separators (_ - . space) delimit, and the first word is always kept, so
    "tree/BirchTree_Autumn_1.obj", "tree/BirchTree_Snow_1.obj" and "tree/BirchTree_1.obj" are all
    "tree/birchtree_1", while "tree/BirchTree_2.obj" is a group of its own and "Snow_Globe.obj" stays
    "snow_globe". A number is kept: numbered files are taken for different assets. Variants kept in
    different folders are not grouped.
    """
    folder, _, name = rel.rpartition("/")
    stem = Path(name).stem.lower()
    words = [w for w in _NAME_SEPARATORS.split(stem) if w]
    kept = "_".join(words[:1] + [w for w in words[1:] if w not in variant_words]) or stem
    return f"{folder}/{kept}" if folder else kept


ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class Skipped:
    """Something in a scanned folder that is no object, and why: an archive, a link leading out."""

    path: Path
    rel: str
    reason: str


def walk(folder: str | Path, recursive: bool = True) -> tuple[list[Path], list[Skipped]]:
    """Mesh files (by suffix, any case) in `folder`, sorted, and what was left out that a user may
    have meant to include.

    Hidden files and folders are skipped without a word: atomic writes leave `.name.tmp*` files
    behind only when killed, and editors and OS tools keep their own state in dot-files. Links are
    followed (a folder once) when they lead to a place inside `folder`; a link leading out is
    `Skipped`, since nothing outside the folder given is read. Archives are `Skipped` with a hint to
    unpack them.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: local source folder not found")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: local source is not a folder")
    root = folder.resolve()
    files: list[Path] = []
    skipped: list[Skipped] = []
    seen = {root}

    def skip(path: Path, reason: str) -> None:
        skipped.append(Skipped(path, mf.printable(path.relative_to(folder).as_posix()), reason))

    links: list[Path] = []  # linked folders, read after every real one

    def visit(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            real = path.resolve()
            if entry.is_symlink() and not real.is_relative_to(root):
                skip(path, f"a link to {mf.printable(str(real))}, outside the folder {root}: not followed")
            elif entry.is_dir():
                if entry.is_symlink():
                    links.append(path)
                elif recursive:
                    seen.add(real)
                    visit(path)
            elif not entry.is_file():
                continue
            elif path.suffix.lower() in MESH_SUFFIXES:
                files.append(path)
            elif entry.name.lower().endswith(ARCHIVE_SUFFIXES):
                skip(path, "an archive: shapeflow reads mesh files, not archives; unpack it into the folder")

    visit(folder)
    while recursive and links:
        path = links.pop(0)
        real = path.resolve()
        if real in seen or any(real.is_relative_to(s) for s in seen if s != root) or real == root:
            shown = mf.printable(real.relative_to(root).as_posix() or ".")
            skip(path, f"a link to {shown}, a folder listed already: not read twice")
            continue
        seen.add(real)
        visit(path)
    return sorted(files), sorted(skipped, key=lambda s: s.rel)


def list_mesh_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """The mesh files `walk` finds in `folder`."""
    return walk(folder, recursive)[0]


def scan(folder: str | Path, recursive: bool = True) -> tuple[list[LocalFile], list[Skipped]]:
    """Every mesh file of `folder` with its key, and what was skipped; raises if there is no mesh
    file (a wrong path, most likely)."""
    folder = Path(folder).resolve()
    files, skipped = walk(folder, recursive)
    if not files:
        where = "in it or its subfolders" if recursive else "in it (subfolders not searched)"
        raise FileNotFoundError(f"{folder}: no mesh files ({', '.join(MESH_SUFFIXES)}) {where}")
    # A name that is not UTF-8 is kept under its escaped form (`mf.printable`) in the manifest.
    found = [
        LocalFile(path=p, rel=mf.printable(p.relative_to(folder).as_posix()), key=mf.file_sha256(p)) for p in files
    ]
    return found, skipped


def object_suffix(src: str | Path) -> str:
    """The suffix an imported file gets: its own in lower case, .glb for a .gltf."""
    suffix = Path(src).suffix.lower()
    return ".glb" if suffix == ".gltf" else suffix


def import_file(src: str | Path, objects_dir: str | Path, key: str | None = None) -> Path:
    """Copy (or for .gltf, pack) `src` to `<objects_dir>/<key><suffix>` atomically; returns that path."""
    src = Path(src)
    key = key or mf.file_sha256(src)
    dest = Path(objects_dir) / f"{key}{object_suffix(src)}"
    with mf.atomic_path(dest) as tmp:
        if src.suffix.lower() == ".gltf":
            tmp.write_bytes(gltf_to_glb(src))
        else:
            shutil.copyfile(src, tmp)
    return dest
