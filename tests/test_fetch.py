"""The fetch stage and its sources (builtin, local folder, Objaverse with a fake network)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import socket
import urllib.error
from pathlib import Path

import bad_inputs
import pytest

from shapeflow import cli, config, runner
from shapeflow import manifest as mf
from shapeflow.data import builtin, local, objaverse
from shapeflow.stages import fetch

REQUIRED = ["key", "source", "path", "category", "license", "n_faces", "split", "group", "status", "reason"]


@pytest.fixture(autouse=True)
def network(monkeypatch) -> list[tuple]:
    """The machine seems offline (name lookups fail as they do without a network); attempts are listed."""
    attempts: list[tuple] = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    return attempts


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def fetch_cli(params: Path, out: Path, *extra: str) -> int:
    return cli.main(["--params", str(params), "fetch", str(out), *extra])


def read_rows(out: Path) -> list[dict[str, str]]:
    return mf.read_manifest(out / mf.MANIFEST, required=REQUIRED)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------- builtin


BUILTIN_PARAMS = """
seed: 3
fetch:
  builtin: {per_category: %d, defect_share: 0.5}
  split: {val: 0.25, test: 0.25}
compute: {workers: 1}
"""


def test_builtin_fetch_writes_manifest_and_objects(tmp_path):
    out = tmp_path / "raw"
    assert fetch_cli(write_params(tmp_path, BUILTIN_PARAMS % 2), out) == 0
    rows = read_rows(out)
    assert len(rows) == 2 * len(builtin.CATEGORIES)
    assert {r["category"] for r in rows} == set(builtin.CATEGORIES)
    for row in rows:
        assert row["status"] == "ok" and row["reason"] == ""
        assert row["license"] == "CC0-1.0" and row["source"].startswith("builtin:")
        data = (out / row["path"]).read_bytes()
        assert row["path"] == f"objects/{row['key']}.ply"
        assert hashlib.sha256(data).hexdigest() == row["key"]
        assert int(row["n_faces"]) > 0
        assert row["split"] == mf.split_for_key(row["key"], 0.25, 0.25)
    assert any(r["defects"] for r in rows) and any(not r["defects"] for r in rows)
    assert sorted(p.name for p in (out / "objects").iterdir()) == sorted(Path(r["path"]).name for r in rows)


def test_builtin_fetch_is_deterministic_and_rerun_rewrites_nothing(tmp_path):
    params = write_params(tmp_path, BUILTIN_PARAMS % 2)
    out, again = tmp_path / "raw", tmp_path / "raw_again"
    assert fetch_cli(params, out) == 0
    before = {k: v for k, v in mtimes(out).items() if k != mf.MANIFEST}
    manifest = (out / mf.MANIFEST).read_text()
    assert fetch_cli(params, out) == 0
    assert {k: v for k, v in mtimes(out).items() if k != mf.MANIFEST} == before
    assert (out / mf.MANIFEST).read_text() == manifest
    assert fetch_cli(params, again) == 0
    assert (again / mf.MANIFEST).read_text() == manifest  # same params, same keys, same splits


def test_builtin_fewer_objects_prunes_the_rest(tmp_path):
    out = tmp_path / "raw"
    assert fetch_cli(write_params(tmp_path, BUILTIN_PARAMS % 2), out) == 0
    before = mtimes(out / "objects")
    assert fetch_cli(write_params(tmp_path, BUILTIN_PARAMS % 1), out) == 0
    rows = read_rows(out)
    assert len(rows) == len(builtin.CATEGORIES)
    assert sorted(f"objects/{p.name}" for p in (out / "objects").iterdir()) == sorted(r["path"] for r in rows)
    assert sorted(p.stem for p in (out / "records").iterdir()) == sorted(r["key"] for r in rows)
    kept = mtimes(out / "objects")
    assert all(before[name] == t for name, t in kept.items())  # the objects kept were not rewritten


def test_split_change_updates_rows_without_rewriting_objects(tmp_path):
    out = tmp_path / "raw"
    assert fetch_cli(write_params(tmp_path, BUILTIN_PARAMS % 1), out) == 0
    before = mtimes(out / "objects")
    assert fetch_cli(write_params(tmp_path, (BUILTIN_PARAMS % 1).replace("val: 0.25", "val: 0.5")), out) == 0
    assert all(r["split"] == mf.split_for_key(r["key"], 0.5, 0.25) for r in read_rows(out))
    assert mtimes(out / "objects") == before


# --------------------------------------------------------------------------------------- local


def test_local_fetch_takes_good_files_and_records_bad_ones(tmp_path):
    folder = tmp_path / "meshes"
    bad = bad_inputs.make_bad_inputs(folder / "bad")
    good = bad_inputs.make_good_inputs(folder / "good")
    out = tmp_path / "raw"
    params = write_params(tmp_path, "compute: {workers: 2}\n")
    assert fetch_cli(params, out, "--source", "local", "--path", str(folder)) == 0
    rows = {r["source"]: r for r in read_rows(out)}
    assert len(rows) == len(bad) + len(good)
    for path in good.values():
        row = rows[f"local:meshes/good/{path.name}"]
        assert row["status"] == "ok", row["reason"]
        assert row["key"] == mf.file_sha256(path) and row["category"] == "good"
        assert row["path"] == f"objects/{row['key']}{'.glb' if path.suffix == '.gltf' else path.suffix}"
        assert (out / row["path"]).is_file()
    for name, path in bad.items():
        row = rows[f"local:meshes/bad/{path.name}"]
        assert row["status"] == "failed" and row["path"] == ""
        assert re.search(bad_inputs.EXPECTED_REASON[name], row["reason"], re.IGNORECASE), row["reason"]
        assert str(path.resolve()) in row["reason"]
        assert not list((out / "objects").glob(f"{row['key']}*"))
    assert len(list((out / "objects").iterdir())) == len(good)
    assert temporaries(out) == []


def test_local_gltf_is_packed_into_a_glb_that_stands_alone(tmp_path):
    good = bad_inputs.make_good_inputs(tmp_path / "in")
    dest = local.import_file(good["external"], tmp_path / "objects")
    assert dest.name == f"{mf.file_sha256(good['external'])}.glb"
    (tmp_path / "in" / "external_data.bin").unlink()  # the packed copy must not need it
    from shapeflow.geometry.mesh import load_mesh

    assert len(load_mesh(dest).faces) == 24


def test_local_list_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.OBJ", "y.ply", ".hidden.obj", "notes.txt", "a/.tmp.obj"):
        (tmp_path / name).write_text("")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "z.obj").write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in local.list_mesh_files(tmp_path)] == ["a/x.OBJ", "y.ply"]
    assert [p.name for p in local.list_mesh_files(tmp_path, recursive=False)] == ["y.ply"]


def test_local_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    params = write_params(tmp_path, "compute: {workers: 1}\n")
    assert fetch_cli(params, tmp_path / "raw", "--source", "local", "--path", str(tmp_path / "empty")) == 2


def test_switching_source_prunes_the_old_objects(tmp_path):
    folder = tmp_path / "meshes"
    good = bad_inputs.make_good_inputs(folder)
    out = tmp_path / "raw"
    params = write_params(tmp_path, BUILTIN_PARAMS % 1)
    assert fetch_cli(params, out) == 0
    assert fetch_cli(params, out, "--source", "local", "--path", str(folder)) == 0
    rows = read_rows(out)
    assert {r["source"].split(":")[0] for r in rows} == {"local"} and len(rows) == len(good)
    assert len(list((out / "objects").iterdir())) == len(good)


# ------------------------------------------------------------------ several sources, duplicates, groups


def write_box(path: Path, stretch: float = 1.0) -> Path:
    """A closed box OBJ at `path`; `stretch` along y makes its bytes (and key) its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bad_inputs.obj_text(bad_inputs.CUBE_VERTICES * [1.0, stretch, 1.0], bad_inputs.CUBE_FACES))
    return path


def test_several_sources_make_one_dataset_and_duplicates_are_reported_once(tmp_path, capsys):
    shop, scans = tmp_path / "shop", tmp_path / "scans"
    box = write_box(shop / "chair" / "box.obj")
    (shop / "chair" / "box_copy.obj").write_bytes(box.read_bytes())  # the same file twice in one folder
    sphere_v, sphere_f = bad_inputs.icosphere(2)
    (shop / "lamp").mkdir()
    (shop / "lamp" / "shade.glb").write_bytes(bad_inputs.draco_glb_bytes(sphere_v, sphere_f))
    write_box(scans / "table" / "box.obj")  # the same file again, from the other folder
    write_box(scans / "table" / "long.obj", stretch=3.0)
    out = tmp_path / "raw"
    params = write_params(
        tmp_path,
        f"""
seed: 3
fetch:
  source: local
  extra_sources: [builtin]
  local: {{path: {shop}, extra_paths: [{scans}]}}
  builtin: {{per_category: 1, defect_share: 0.0}}
  split: {{val: 0.25, test: 0.25}}
compute: {{workers: 1}}
""",
    )
    assert fetch_cli(params, out) == 0
    assert "fetch local+builtin: 11 ok, 0 failed, 2 duplicate" in capsys.readouterr().out
    rows = {r["source"]: r for r in read_rows(out)}
    generated = [r for s, r in rows.items() if s.startswith("builtin:")]
    assert sorted(r["category"] for r in generated) == sorted(builtin.CATEGORIES)
    assert all(r["group"] == r["key"] and r["split"] == mf.split_for_key(r["key"], 0.25, 0.25) for r in generated)
    kept = rows["local:shop/chair/box.obj"]
    assert (kept["status"], kept["category"], kept["key"]) == ("ok", "chair", mf.file_sha256(box))
    assert rows["local:scans/table/long.obj"]["category"] == "table"
    shade = rows["local:shop/lamp/shade.glb"]
    assert shade["status"] == "ok" and int(shade["n_faces"]) == len(sphere_f)  # Draco decoded
    for source in ("local:shop/chair/box_copy.obj", "local:scans/table/box.obj"):
        row = rows[source]
        assert row["status"] == "duplicate" and row["path"] == "" and row["split"] == ""
        assert row["reason"] == f"duplicate of {kept['key']}: the same file as local:shop/chair/box.obj"
        assert row["key"] == hashlib.sha256(source.encode()).hexdigest()
    ok = {r["key"] for r in rows.values() if r["status"] == "ok"}
    assert len(ok) == 11 and len(rows) == 13
    assert {p.name.split(".")[0] for p in (out / "objects").iterdir()} == ok
    # The later stages take the objects once: duplicate rows are skipped like failed ones.
    assert {t.key for t in runner.collect_tasks(out)} == ok
    manifest = (out / mf.MANIFEST).read_text()
    assert fetch_cli(params, out) == 0
    assert (out / mf.MANIFEST).read_text() == manifest


def test_sources_and_folders_are_checked(tmp_path):
    with pytest.raises(config.ParamsError, match="each source once"):
        config.FetchParams(source="builtin", extra_sources=("builtin",)).check("fetch")
    with pytest.raises(config.ParamsError, match="local.path: required"):
        config.FetchParams(extra_sources=("local",)).check("fetch")
    same_name = config.LocalParams(path=str(tmp_path / "a" / "meshes"), extra_paths=(str(tmp_path / "b" / "meshes"),))
    with pytest.raises(config.ParamsError, match="must have different names"):
        config.FetchParams(source="local", local=same_name).check("fetch")
    with pytest.raises(config.ParamsError, match="variant_words"):
        config.SplitParams(variant_words=("Snow",)).check("fetch.split")


def test_group_name_drops_variant_words_but_keeps_numbers_and_first_word():
    words = config.SplitParams().variant_words
    assert local.group_name("tree/nature__BirchTree_Dead_Snow_1.obj", words) == "tree/nature_birchtree_1"
    assert local.group_name("tree/nature__BirchTree_2.obj", words) == "tree/nature_birchtree_2"
    assert local.group_name("potion/rpg__Potion1_Filled.obj", words) == "potion/rpg_potion1"
    assert local.group_name("Snow-Globe.glb", words) == "snow_globe"
    assert local.group_name("chair/1a2b/models/model.obj", words) == "chair/1a2b/models/model"


VARIANTS = ["Oak_1", "Oak_Autumn_1", "Oak_Snow_1", "Oak_Dead_Snow_1", "Oak_Golden_1", "Oak_winter_1"]


def test_variants_share_a_split_that_stays_when_objects_are_added(tmp_path):
    folder = tmp_path / "assets"
    for i, name in enumerate(VARIANTS):
        write_box(folder / "tree" / f"pack__{name}.obj", stretch=1.0 + 0.1 * i)
    for i in range(6):
        write_box(folder / "rock" / f"Rock_{i}.obj", stretch=2.0 + 0.1 * i)
    params = write_params(
        tmp_path, f"fetch: {{source: local, local: {{path: {folder}}}, split: {{val: 0.3, test: 0.3}}}}\n"
    )
    out = tmp_path / "raw"
    assert fetch_cli(params, out) == 0
    rows = {r["source"]: r for r in read_rows(out)}
    oak = [rows[f"local:assets/tree/pack__{name}.obj"] for name in VARIANTS]
    assert len({mf.split_for_key(r["key"], 0.3, 0.3) for r in oak}) > 1  # by key they would straddle splits
    assert {r["group"] for r in oak} == {"tree/pack_oak_1"}
    assert {r["split"] for r in oak} == {mf.split_for_group("tree/pack_oak_1", 0.3, 0.3)}
    rocks = [r for r in rows.values() if r["category"] == "rock"]
    assert len({r["group"] for r in rocks}) == 6 and len({r["split"] for r in rocks}) > 1

    # More objects, a new variant of the oak, and a second folder with another: nothing moves.
    write_box(folder / "tree" / "pack__Oak_Spring_1.obj", stretch=5.0)
    for i in range(6):
        write_box(folder / "rock" / f"Boulder_{i}.obj", stretch=6.0 + 0.1 * i)
    more = write_box(tmp_path / "more" / "tree" / "pack__Oak_Summer_1.obj", stretch=7.0)
    params.write_text(params.read_text().replace("path: ", f"extra_paths: [{more.parents[1]}], path: "))
    assert fetch_cli(params, out) == 0
    after = {r["source"]: r for r in read_rows(out)}
    assert all((after[s]["group"], after[s]["split"]) == (r["group"], r["split"]) for s, r in rows.items())
    for source in ("local:assets/tree/pack__Oak_Spring_1.obj", "local:more/tree/pack__Oak_Summer_1.obj"):
        assert (after[source]["group"], after[source]["split"]) == ("tree/pack_oak_1", oak[0]["split"])


def test_a_split_moved_by_fetch_reaches_the_records_of_later_stages(tmp_path):
    """Objects a later stage did before keep their outputs but take the fetch manifest's new split."""
    raw, later = tmp_path / "raw", tmp_path / "later"
    calls = []

    def copy(task, out_dir):
        calls.append(task.key)
        rel = f"objects/{task.key}.txt"
        (out_dir / "objects").mkdir(exist_ok=True)
        (out_dir / rel).write_text(task.key)
        return {"path": rel}

    def stage():
        tasks = runner.collect_tasks(raw)
        runner.run_objects(copy, tasks, later, "later-v1", workers=1)
        runner.finish_manifest(later, tasks, ("key", "path", "split", "status"))
        return {r["key"]: r["split"] for r in mf.read_manifest(later / mf.MANIFEST)}

    assert fetch_cli(write_params(tmp_path, BUILTIN_PARAMS % 1), raw) == 0
    assert stage() == {r["key"]: r["split"] for r in read_rows(raw)}
    done = len(calls)
    assert fetch_cli(write_params(tmp_path, (BUILTIN_PARAMS % 1).replace("val: 0.25", "val: 0.5")), raw) == 0
    moved = {r["key"]: r["split"] for r in read_rows(raw)}
    assert moved != {k: mf.split_for_key(k, 0.25, 0.25) for k in moved}  # some object did move
    assert stage() == moved and len(calls) == done  # nothing was redone


# ------------------------------------------------------------------------------------ objaverse


def uid(n: int) -> str:
    return f"{n:032x}"


def fill_objaverse_cache(cache: Path, shard: str, data: bytes) -> Path:
    """An objaverse cache under `cache` that holds uid(1)'s glb in `shard` and an index naming it."""
    root = cache / objaverse.OBJAVERSE_DIR
    glb = root / "glbs" / shard / f"{uid(1)}.glb"
    glb.parent.mkdir(parents=True)
    glb.write_bytes(data)
    with gzip.open(root / objaverse.INDEX_FILE, "wt") as fh:
        json.dump({uid(1): f"glbs/{shard}/{uid(1)}.glb"}, fh)
    return glb


class FakeObjaverse:
    """Stands in for the objaverse package: serves glbs from `files` into the cache layout."""

    def __init__(self, files: dict[str, bytes], failing: set[str] = frozenset(), offline: bool = False):
        self.files, self.failing, self.offline = files, set(failing), offline
        self.calls: list[list[str]] = []
        self.sleeps: list[float] = []
        self.annotated: list[list[str]] = []

    def download(self, uids: list[str], cache_dir: Path, processes: int) -> dict[str, str]:
        self.calls.append(list(uids))
        if self.offline:
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
        if self.failing & set(uids):
            raise ConnectionResetError(104, "Connection reset by peer")
        out = {}
        for u in uids:
            if u in self.files:
                path = cache_dir / objaverse.OBJAVERSE_DIR / "glbs" / "000-007" / f"{u}.glb"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(self.files[u])
                out[u] = str(path)
        return out

    def annotations(self, uids: list[str], cache_dir: Path) -> dict[str, dict]:
        self.annotated.append(list(uids))
        if self.offline:
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
        return {u: {"license": "by", "name": "thing"} for u in uids}

    def client(self) -> objaverse.Client:
        return objaverse.Client(download=self.download, annotations=self.annotations, sleep=self.sleeps.append)


@pytest.fixture(scope="module")
def glbs(tmp_path_factory) -> dict[str, bytes]:
    """Four distinct valid glbs and one that is not a mesh."""
    folder = tmp_path_factory.mktemp("glbs")
    scene = bad_inputs.make_good_inputs(folder)["scene"].read_bytes()
    gltf, binary = bad_inputs.two_node_scene(extra_points=False)
    variants = {}
    for i in range(4):
        gltf["nodes"][0]["translation"] = [float(i), 0.0, 0.0]
        variants[f"glb{i}"] = bad_inputs.glb_bytes(gltf, binary)
    variants["scene"] = scene
    variants["broken"] = scene[:100]
    return variants


def write_list(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def trellis_row(n: int, data: bytes | None, source: str = "sketchfab") -> dict[str, str]:
    return {
        "sha256": sha(data) if data else "ab" * 32,
        "file_identifier": f"https://sketchfab.com/3d-models/{uid(n)}",
        "source": source,
        "aesthetic_score": "6.1",
        "captions": json.dumps(["a thing, with a comma"]),
    }


def objaverse_params(tmp_path: Path, uid_list: Path, limit: int = 100, retries: int = 2) -> Path:
    return write_params(
        tmp_path,
        f"""
fetch:
  source: objaverse
  objaverse: {{list: {uid_list}, limit: {limit}, cache_dir: {tmp_path / "cache"}, retries: {retries}, processes: 2}}
compute: {{workers: 1}}
""",
    )


def test_objaverse_fetch_with_cache_mismatch_and_failures(tmp_path, glbs):
    cache = tmp_path / "cache"
    cached = cache / objaverse.OBJAVERSE_DIR / "glbs" / "000-001" / f"{uid(1)}.glb"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(glbs["glb1"])  # already in the cache with the right sha256
    stale = cache / objaverse.OBJAVERSE_DIR / "glbs" / "000-001" / f"{uid(2)}.glb"
    stale.write_bytes(b"an older, different file")  # in the cache but not what the list says
    fake = FakeObjaverse(
        {uid(2): glbs["glb2"], uid(3): glbs["glb3"], uid(4): b"tampered", uid(6): glbs["broken"], uid(5): glbs["glb0"]},
        failing={uid(5)},
    )
    rows = [
        trellis_row(1, glbs["glb1"]),
        trellis_row(2, glbs["glb2"]),
        trellis_row(3, glbs["glb3"]),
        trellis_row(4, glbs["glb0"]),  # the server sends other bytes: sha256 mismatch
        trellis_row(5, b"the bytes of object five"),  # every download of it fails
        trellis_row(6, glbs["broken"]),  # downloads fine, is not a usable glb
        trellis_row(7, glbs["scene"]),  # not in the index: the downloader skips it
        {
            **trellis_row(8, None, source="github"),
            "file_identifier": "https://github.com/someone/repo/blob/abc/model.glb",
        },
        trellis_row(9, glbs["scene"]),  # beyond the limit
    ]
    uid_list = write_list(tmp_path / "trellis.csv", rows)
    out = tmp_path / "raw"
    records = fetch.run(config.load_params(objaverse_params(tmp_path, uid_list, limit=8)), out, client=fake.client())
    by_source = {r["source"]: r for r in records}
    assert len(records) == 8 and f"objaverse:{uid(9)}" not in by_source

    assert all(uid(1) not in call for call in fake.calls)  # served from the cache
    for n in (1, 2, 3):
        row = by_source[f"objaverse:{uid(n)}"]
        assert row["status"] == "ok", row["reason"]
        assert row["key"] == sha(glbs[f"glb{n}"]) and row["path"] == f"objects/{row['key']}.glb"
        assert (out / row["path"]).read_bytes() == glbs[f"glb{n}"]
        assert row["license"] == "by"
    assert not stale.exists()  # the mismatching cached copy was dropped and downloaded again
    assert by_source[f"objaverse:{uid(2)}"]["key"] == sha(glbs["glb2"])

    assert re.search("sha256 mismatch", by_source[f"objaverse:{uid(4)}"]["reason"])
    failed = by_source[f"objaverse:{uid(5)}"]
    assert failed["status"] == "failed" and "after 3 attempt(s)" in failed["reason"]
    assert "ConnectionResetError" in failed["reason"]
    # The whole batch was tried 3 times, then uid 5 alone 3 times; the others alone once each.
    assert sum(uid(5) in call for call in fake.calls) == 6
    assert fake.sleeps == [2.0, 4.0, 2.0, 4.0]  # exponential backoff, per batch
    assert re.search(r"cannot read as GLB|glb", by_source[f"objaverse:{uid(6)}"]["reason"], re.IGNORECASE)
    assert "not in the Objaverse 1.0 index" in by_source[f"objaverse:{uid(7)}"]["reason"]
    github = next(r for s, r in by_source.items() if "github" in s)
    assert github["status"] == "failed" and "not downloadable" in github["reason"]
    assert github["key"] == "ab" * 32  # keyed by the list's sha256

    manifest = read_rows(out)
    assert len(manifest) == 8 and sum(r["status"] == "ok" for r in manifest) == 3
    assert len(list((out / "objects").iterdir())) == 3 and temporaries(out) == []


def test_objaverse_rerun_offline_keeps_what_is_done(tmp_path, glbs):
    uid_list = write_list(tmp_path / "list.csv", [trellis_row(1, glbs["glb1"]), trellis_row(2, glbs["glb2"])])
    params = config.load_params(objaverse_params(tmp_path, uid_list))
    out = tmp_path / "raw"
    online = FakeObjaverse({uid(1): glbs["glb1"]})
    first = {r["source"]: r["status"] for r in fetch.run(params, out, client=online.client())}
    assert first == {f"objaverse:{uid(1)}": "ok", f"objaverse:{uid(2)}": "failed"}
    before = mtimes(out / "objects")
    # The cache is gone and the network too: the object in OUT stays, the other fails fast.
    for path in (tmp_path / "cache").rglob("*.glb"):
        path.unlink()
    offline = FakeObjaverse({}, offline=True)
    second = {r["source"]: r for r in fetch.run(params, out, client=offline.client())}
    assert second[f"objaverse:{uid(1)}"]["status"] == "ok"
    assert second[f"objaverse:{uid(1)}"]["license"] == "by"  # kept from the first run
    assert second[f"objaverse:{uid(2)}"]["reason"].count("offline") == 1
    assert offline.calls == [[uid(2)]] and offline.sleeps == []  # no retries when unreachable
    assert mtimes(out / "objects") == before


def test_objaverse_offline_fails_fast_for_every_batch(tmp_path, glbs):
    fake = FakeObjaverse({}, offline=True)
    rows = [objaverse.ListRow(uid=uid(n), identifier=uid(n)) for n in range(10)]
    got = objaverse.fetch_objects(rows, tmp_path / "cache", client=fake.client(), batch_size=3)
    assert len(fake.calls) == 1 and fake.sleeps == []
    assert all(f.path is None and f.reason.startswith("offline") for f in got.values())


def test_licences_offline_are_empty(tmp_path):
    fake = FakeObjaverse({}, offline=True)
    assert objaverse.licences([uid(1)], tmp_path, fake.client()) == {}


def test_read_uid_list_formats(tmp_path):
    step1x = write_list(tmp_path / "step1x.csv", [{"UID": uid(n), "category": "chair"} for n in range(5)])
    rows = objaverse.read_uid_list(step1x, limit=3)
    assert [r.uid for r in rows] == [uid(0), uid(1), uid(2)]
    assert all(r.problem == "" and r.sha256 == "" and r.category == "chair" for r in rows)
    trellis = write_list(
        tmp_path / "trellis.csv",
        [
            {"file_identifier": f"https://sketchfab.com/3d-models/{uid(1)}/", "sha256": "AB" * 32},
            {"file_identifier": "not-a-uid", "sha256": "ab" * 32},
            {"file_identifier": uid(2), "sha256": "xyz"},
        ],
    )
    one, two, three = objaverse.read_uid_list(trellis, limit=10)
    assert (one.uid, one.sha256, one.problem) == (uid(1), "ab" * 32, "")
    assert "does not name an Objaverse 1.0 uid" in two.problem
    assert "not a sha256" in three.problem
    nothing = write_list(tmp_path / "nothing.csv", [{"name": "chair"}])
    with pytest.raises(objaverse.ObjaverseListError, match="no uid column"):
        objaverse.read_uid_list(nothing, limit=1)


def test_default_downloader_uses_objaverse_cache_layout_offline(tmp_path, glbs, recwarn):
    """The real objaverse.load_objects, with its index and the glb already in `cache_dir`."""
    import objaverse as objaverse_package

    glb = fill_objaverse_cache(tmp_path / "cache", "000-042", glbs["glb1"])
    saved = objaverse_package._VERSIONED_PATH
    got = objaverse.objaverse_download([uid(1), uid(2)], tmp_path / "cache", processes=2)
    assert got == {uid(1): str(glb)}  # uid 2 is not in the index: left out
    assert objaverse_package._VERSIONED_PATH == saved  # the redirect is undone


def test_default_downloader_removes_an_index_cut_short(tmp_path):
    index = tmp_path / objaverse.OBJAVERSE_DIR / objaverse.INDEX_FILE
    index.parent.mkdir(parents=True)
    index.write_bytes(gzip.compress(b'{"' + uid(1).encode() + b'": "glbs/0')[:-12])
    with pytest.raises(objaverse.DownloadError, match="removed") as info:
        objaverse.objaverse_download([uid(1)], tmp_path, processes=1)
    assert info.value.transient and not index.exists()


def test_cli_objaverse_offline_from_a_filled_cache(tmp_path, glbs, network):
    """The real objaverse package end to end: the glb is cached, the licence lookup finds no network."""
    fill_objaverse_cache(tmp_path / "cache", "000-001", glbs["glb1"])
    step1x = write_list(tmp_path / "uids.csv", [{"uid": uid(1)}, {"uid": uid(2)}])
    params = objaverse_params(tmp_path, tmp_path / "elsewhere.csv", limit=50, retries=3)
    out = tmp_path / "raw"
    assert fetch_cli(params, out, "--list", str(step1x), "--limit", "1") == 0
    (row,) = read_rows(out)
    assert row["status"] == "ok" and row["key"] == sha(glbs["glb1"]) and row["license"] == ""
    assert network  # the licence lookup tried the network, failed, and left the licence empty


def test_command_line_overrides_reach_fetch_params():
    params = fetch.with_overrides(config.Params(), "objaverse", None, "list.csv", 7)
    section = params.fetch.objaverse
    assert (params.fetch.source, section.list, section.limit) == ("objaverse", "list.csv", 7)
    assert fetch.with_overrides(config.Params()) == config.Params()
    with pytest.raises(config.ParamsError, match="local.path"):
        fetch.with_overrides(config.Params(), source="local")


def test_local_gltf_reaching_outside_its_folder_is_a_failed_row_and_copies_nothing(tmp_path):
    secret = tmp_path / "private" / "SECRET.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"password=hunter2 " * 100)
    folder = tmp_path / "meshes"
    good = bad_inputs.make_good_inputs(folder / "good")
    gltf = json.loads(good["external"].read_text())
    gltf["images"] = [{"uri": "../../private/SECRET.txt"}]
    (folder / "good" / "external.gltf").write_text(json.dumps(gltf))
    out = tmp_path / "raw"
    assert (
        fetch_cli(write_params(tmp_path, "compute: {workers: 1}\n"), out, "--source", "local", "--path", str(folder))
        == 0
    )
    row = next(r for r in read_rows(out) if r["source"].endswith("external.gltf"))
    assert row["status"] == "failed" and "'../../private/SECRET.txt'" in row["reason"], row["reason"]
    assert all(b"hunter2" not in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_file_names_that_are_not_utf8_are_kept_under_an_escaped_name(tmp_path):
    """A Latin-1 file name in a folder must not stop fetch (or the stages after it) from writing its manifest."""
    folder = tmp_path / "meshes"
    good = bad_inputs.make_good_inputs(folder / "good")
    odd_dir = os.fsdecode(os.fsencode(folder) + b"/caf\xe9")
    os.mkdir(odd_dir)
    os.rename(good["box"], os.fsdecode(os.fsencode(odd_dir) + b"/bo\xeete.obj"))
    out = tmp_path / "raw"
    params = write_params(tmp_path, "compute: {workers: 1}\nwatertight: {resolution: 32}\n")
    for _ in range(2):  # and again: the rerun reads the manifest it wrote
        assert fetch_cli(params, out, "--source", "local", "--path", str(folder)) == 0
        row = next(r for r in read_rows(out) if "caf" in r["source"])
        assert row["status"] == "ok" and row["source"] == "local:meshes/caf\\xe9/bo\\xeete.obj"
        assert row["category"] == "caf\\xe9"
    assert cli.main(["--params", str(params), "watertight", str(out), str(tmp_path / "wt")]) == 0
    assert cli.main(["--params", str(params), "watertight", str(folder), str(tmp_path / "wt_folder")]) == 0
    rows = mf.read_manifest(tmp_path / "wt_folder" / mf.MANIFEST)
    assert any("\\xe9" in r["source"] and r["status"] == "ok" for r in rows)


def test_archives_and_links_leading_out_are_skipped_rows_and_links_inside_are_followed(tmp_path):
    """Nothing a user put in the folder disappears without a row: archives, links leading outside the
    folder and links to folders read already are listed as skipped (with why); a linked folder
    inside it that is not read otherwise is read through the link."""
    outside = tmp_path / "elsewhere"
    write_box(outside / "far.obj", stretch=3.0)
    folder = tmp_path / "meshes"
    write_box(folder / "chair" / "a.obj")
    (folder / "chair" / "more.zip").write_bytes(b"PK\x03\x04 not really")
    (folder / "linked_out").symlink_to(outside, target_is_directory=True)
    (folder / "chair" / "far_file.obj").symlink_to(outside / "far.obj")
    (folder / "alias").symlink_to(folder / "chair", target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    write_box(tmp_path / "meshes" / ".store" / "table" / "t.obj", stretch=2.0)  # hidden, reached by a link
    (folder / "table").symlink_to(folder / ".store" / "table", target_is_directory=True)
    out = tmp_path / "raw"
    params = write_params(tmp_path, "compute: {workers: 1}\n")
    assert fetch_cli(params, out, "--source", "local", "--path", str(folder)) == 0
    rows = {r["source"].removeprefix("local:meshes/"): r for r in read_rows(out)}
    assert rows["chair/a.obj"]["status"] == "ok"
    assert rows["table/t.obj"]["status"] == "ok" and rows["table/t.obj"]["category"] == "table"
    for name in ("alias", "loop"):
        assert rows[name]["status"] == "skipped" and "listed already" in rows[name]["reason"], rows[name]
    assert rows["chair/more.zip"]["status"] == "skipped" and "archive" in rows["chair/more.zip"]["reason"]
    for name in ("linked_out", "chair/far_file.obj"):
        assert rows[name]["status"] == "skipped" and "outside the folder" in rows[name]["reason"], rows[name]
    assert len(list((out / "objects").iterdir())) == 2  # nothing from outside was copied in


def test_a_second_fetch_into_the_same_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "meshes"
    bad_inputs.make_good_inputs(folder)
    out = tmp_path / "raw"
    params = write_params(tmp_path, "compute: {workers: 1}\n")
    with mf.writing_lock(out):
        assert fetch_cli(params, out, "--source", "local", "--path", str(folder)) == 2
    assert "another run is writing into it" in capsys.readouterr().err and not out.exists()
    assert fetch_cli(params, out, "--source", "local", "--path", str(folder)) == 0
