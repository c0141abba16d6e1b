"""`shapeflow watertight SRC DST` on folders with good and bad files, and on a fetch-style manifest."""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from bad_inputs import EXPECTED_REASON, make_bad_inputs, make_good_inputs

from shapeflow import manifest as mf
from shapeflow.cli import main
from shapeflow.geometry.mesh import load_mesh


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def write_params(tmp_path: Path, resolution: int = 48) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"watertight:\n  resolution: {resolution}\ncompute:\n  workers: 1\n")
    return path


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    src = tmp / "src"
    bad = make_bad_inputs(src / "bad")
    good = make_good_inputs(src / "good")
    params = write_params(tmp)
    code = main(["--params", str(params), "watertight", str(src), str(tmp / "out"), "--workers", "2"])
    return tmp, bad, good, code


def test_good_files_come_out_watertight_and_bad_ones_fail_with_reasons(mixed_run):
    tmp, bad, good, code = mixed_run
    assert code == 0
    rows = {row["source"]: row for row in read_rows(tmp / "out")}
    assert len(rows) == len({mf.file_sha256(p) for p in [*bad.values(), *good.values()]})
    for name, path in good.items():
        row = rows[str(path.relative_to(tmp / "src"))]
        assert row["status"] == "ok", (name, row["reason"])
        mesh = trimesh.load(tmp / "out" / row["path"])
        assert mesh.is_watertight and mesh.volume > 0
        assert np.abs(mesh.vertices).max() <= 1.0
        # The manifest's transform takes the output back to the input's frame.
        original = mesh.vertices * float(row["scale"]) + [float(row[f"offset_{a}"]) for a in "xyz"]
        source = load_mesh(path)
        assert np.allclose(original.min(axis=0), source.bounds[0], atol=0.05 * float(row["scale"]))
    for name, path in bad.items():
        row = rows[str(path.relative_to(tmp / "src"))]
        assert row["status"] == "failed" and row["path"] == ""
        assert path.name in row["reason"], row["reason"]
        assert re.search(EXPECTED_REASON[name], row["reason"], re.I), (name, row["reason"])


def test_nothing_half_written_is_left(mixed_run):
    tmp, *_ = mixed_run
    leftovers = [p for p in (tmp / "out").rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    ok = {row["key"] for row in read_rows(tmp / "out") if row["status"] == "ok"}
    assert {p.name.split(".")[0] for p in (tmp / "out" / "objects").iterdir()} == ok


def test_rerun_skips_finished_objects_and_redoes_missing_ones(tmp_path):
    src = tmp_path / "src"
    good = make_good_inputs(src)
    params = write_params(tmp_path)
    out = tmp_path / "out"
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0
    outputs = sorted((out / "objects").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    # Simulate a run killed after all but one object: its output and record are gone, a temp remains.
    victim = outputs[0]
    victim.unlink()
    mf.record_path(out, victim.name.split(".")[0]).unlink()
    (out / "objects" / f".{victim.stem}.x.tmp.ply").write_bytes(b"half")
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0
    assert victim.is_file()
    for path in outputs[1:]:
        assert path.stat().st_mtime_ns == stamps[path], f"{path.name} was redone"
    assert not list((out / "objects").glob(".*"))
    assert len(read_rows(out)) == len(good)


def test_changing_resolution_redoes_objects(tmp_path):
    src = tmp_path / "src"
    make_good_inputs(src)
    out = tmp_path / "out"
    main(["--params", str(write_params(tmp_path, 32)), "watertight", str(src), str(out)])
    before = {row["key"]: int(row["n_faces"]) for row in read_rows(out)}
    main(["--params", str(write_params(tmp_path, 32)), "watertight", str(src), str(out), "--resolution", "64"])
    rows = read_rows(out)
    assert {row["resolution"] for row in rows} == {"64"}
    assert all(int(row["n_faces"]) > before[row["key"]] for row in rows)


def test_manifest_input_with_a_missing_file(tmp_path):
    src = tmp_path / "raw"
    good = make_good_inputs(src / mf.OBJECTS)
    rows = []
    for i, path in enumerate(sorted(good.values())):
        rows.append(
            {
                "key": f"{i:064x}",
                "path": str(path.relative_to(src)),
                "category": "thing",
                "split": "train",
                "status": "ok",
            }
        )
    rows.append({"key": "f" * 64, "path": "objects/gone.obj", "category": "thing", "split": "val", "status": "ok"})
    rows.append({"key": "e" * 64, "path": "", "category": "thing", "split": "val", "status": "failed"})
    mf.write_manifest(src / "manifest.csv", rows, ["key", "path", "category", "split", "status"])
    out = tmp_path / "out"
    assert main(["--params", str(write_params(tmp_path)), "watertight", str(src), str(out)]) == 0
    result = {row["key"]: row for row in read_rows(out)}
    assert "e" * 64 not in result  # failed upstream: not retried here
    missing = result["f" * 64]
    assert missing["status"] == "failed" and "gone.obj" in missing["reason"]
    assert all(result[r["key"]]["category"] == "thing" for r in rows[:-2])
    assert sum(r["status"] == "ok" for r in result.values()) == len(good)


def test_shards_split_the_work_and_the_last_writes_the_manifest(tmp_path):
    src = tmp_path / "src"
    good = make_good_inputs(src)
    params = write_params(tmp_path, 32)
    out = tmp_path / "out"
    main(["--params", str(params), "watertight", str(src), str(out), "--rank", "0", "--world-size", "2"])
    assert not (out / "manifest.csv").exists()
    first = set((out / "objects").iterdir())
    main(["--params", str(params), "watertight", str(src), str(out), "--rank", "1", "--world-size", "2"])
    assert len(read_rows(out)) == len(good)
    assert 0 < len(first) < len(good)


def test_missing_input_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["watertight", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err


def test_objects_dropped_from_the_input_are_pruned(tmp_path):
    src = tmp_path / "src"
    good = make_good_inputs(src)
    params = write_params(tmp_path, 32)
    out = tmp_path / "out"
    main(["--params", str(params), "watertight", str(src), str(out)])
    dropped = sorted(good.values())[0]
    key = mf.file_sha256(dropped)
    dropped.unlink()
    main(["--params", str(params), "watertight", str(src), str(out)])
    assert key not in {row["key"] for row in read_rows(out)}
    assert not list((out / "objects").glob(f"{key}.*"))
    shutil.rmtree(src)


def test_outputs_get_the_mode_the_umask_allows_not_0600(tmp_path):
    """Other users of a shared data folder (or DVC cache) must be able to read what a stage wrote."""
    src = tmp_path / "src"
    make_good_inputs(src)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(["--params", str(write_params(tmp_path, 32)), "watertight", str(src), str(out)]) == 0
    finally:
        os.umask(old)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}


def test_a_new_method_version_redoes_every_object(tmp_path, monkeypatch):
    """Outputs of an older remeshing method are not kept by a rerun under the same params."""
    from shapeflow.stages import watertight as stage

    src = tmp_path / "src"
    make_good_inputs(src)
    params, out = write_params(tmp_path, 32), tmp_path / "out"
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0
    stamps = {p: p.stat().st_mtime_ns for p in (out / "objects").iterdir()}
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    monkeypatch.setattr(stage, "METHOD_VERSION", stage.METHOD_VERSION + 1)
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_workers_end_when_the_stage_process_is_killed(tmp_path):
    """kill -9 of a stage's main process must not leave its pool workers running (writing records,
    holding memory) with no one to collect them."""
    psutil = pytest.importorskip("psutil")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):  # distinct files (distinct keys), each a few seconds of work at R = 384
        trimesh.creation.icosphere(subdivisions=4, radius=1.0 + 0.01 * i).export(src / f"s{i}.ply")
    params = write_params(tmp_path, 384)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shapeflow.cli",
            "--params",
            str(params),
            "watertight",
            str(src),
            str(tmp_path / "out"),
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        main_proc = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while len(main_proc.children(recursive=True)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # two workers and the resource tracker
        children = main_proc.children(recursive=True)
        assert len(children) >= 2, "the stage did not start its workers"
        time.sleep(1.0)  # the workers are busy with objects now
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], f"left running: {[p.cmdline()[:3] for p in alive]}"
    finally:
        proc.kill()
        for child in locals().get("children", []):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def test_a_second_run_into_the_same_folder_is_refused_and_touches_nothing(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_good_inputs(src)
    params = write_params(tmp_path, 32)
    (out / "objects").mkdir(parents=True)
    in_flight = out / "objects" / ".abc.x.tmp.ply"  # the first run's object being written
    in_flight.write_bytes(b"half")
    with mf.writing_lock(out):  # the first run, still going
        assert main(["--params", str(params), "watertight", str(src), str(out)]) == 2
    message = capsys.readouterr().err
    assert f"{out}: another run is writing into it (pid {os.getpid()}:" in message
    assert in_flight.exists() and not (out / "records").exists()
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0  # once it is over


def test_shards_of_one_run_share_the_folder_but_a_whole_run_or_the_same_shard_does_not(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_good_inputs(src)
    params = write_params(tmp_path, 32)

    def shard(rank: int) -> int:
        return main(
            ["--params", str(params), "watertight", str(src), str(out), "--rank", str(rank), "--world-size", "2"]
        )

    with mf.writing_lock(out, (0, 2)):  # shard 0 of a run, still going
        assert shard(1) == 0
        assert shard(0) == 2
        assert main(["--params", str(params), "watertight", str(src), str(out)]) == 2
    assert shard(0) == 0 and (out / mf.MANIFEST).is_file()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_stops_the_stage_with_one_line_and_no_partial_file(
    tmp_path, capsys, monkeypatch, code
):
    src, out = tmp_path / "src", tmp_path / "out"
    make_good_inputs(src)
    params = write_params(tmp_path, 32)

    def no_room(source, dest):
        raise OSError(code, os.strerror(code), str(dest))

    monkeypatch.setattr(mf.os, "replace", no_room)  # the rename that finishes every written file
    assert main(["--params", str(params), "watertight", str(src), str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shapeflow watertight: error: cannot write ")
    assert str(out / "objects") in err[0] and os.strerror(code) in err[0]
    assert [p for p in out.rglob("*") if p.is_file() and p.name != "timings.csv"] == []
    monkeypatch.undo()
    assert main(["--params", str(params), "watertight", str(src), str(out)]) == 0  # room again: it goes on


def test_objects_past_the_face_or_file_size_bound_are_failed_rows_and_the_rest_go_on(tmp_path):
    src = tmp_path / "src"
    good = make_good_inputs(src)
    params = tmp_path / "params.yaml"
    params.write_text("watertight: {resolution: 32}\ncompute: {workers: 1, max_faces: 100}\n")
    assert main(["--params", str(params), "watertight", str(src), str(tmp_path / "faces")]) == 0
    rows = {row["source"]: row for row in read_rows(tmp_path / "faces")}
    assert rows["icosphere.ply"]["status"] == "failed"  # 320 faces
    assert "320 faces, more than the 100 allowed (compute.max_faces)" in rows["icosphere.ply"]["reason"]
    assert rows["box.obj"]["status"] == "ok"
    small = min(good.values(), key=lambda p: p.stat().st_size)
    bound_mb = 1.01 * small.stat().st_size / 2**20
    params.write_text(f"watertight: {{resolution: 32}}\ncompute: {{workers: 1, max_file_mb: {bound_mb}}}\n")
    assert main(["--params", str(params), "watertight", str(src), str(tmp_path / "size")]) == 0
    rows = {row["source"]: row for row in read_rows(tmp_path / "size")}
    assert rows[small.name]["status"] == "ok"
    larger = [p.name for p in good.values() if p.stat().st_size > bound_mb * 2**20]
    assert larger and all(rows[n]["status"] == "failed" for n in larger)
    assert all("allowed (compute.max_file_mb)" in rows[n]["reason"] for n in larger)


def slow_when_asked(task, out_dir):
    """A per-object function that hangs on the object named 'slow'."""
    if task.key == "slow":
        time.sleep(30)
    return {"path": ""}


@pytest.mark.parametrize("workers", [1, 2])
def test_an_object_past_the_time_bound_is_a_failed_row_and_the_rest_go_on(tmp_path, workers):
    from shapeflow import runner

    tasks = [runner.Task(key=k, src=f"builtin:{k}", meta={}) for k in ("a", "slow", "z")]
    start = time.monotonic()
    records = runner.run_objects(
        slow_when_asked, tasks, tmp_path, "h", workers=workers, limits=runner.Limits(timeout_s=1.0)
    )
    assert time.monotonic() - start < 60  # not the 30 s the object would take
    status = {r["key"]: (r["status"], r["reason"]) for r in records}
    assert status["a"][0] == status["z"][0] == "ok"
    assert (
        status["slow"][0] == "failed" and "timeout: not done after 1 s (compute.object_timeout_s)" in status["slow"][1]
    )


def test_the_time_bound_counts_from_when_a_worker_begins_the_object(tmp_path, monkeypatch):
    # Workers that take 8 s to start (past the 6.5 s hard limit of a 1 s bound) run their objects.
    from slow_start import quick

    from shapeflow import runner

    monkeypatch.setenv("SHAPEFLOW_TEST_IMPORT_S", "8")
    tasks = [runner.Task(key=k, src=f"builtin:{k}", meta={}) for k in ("a", "b", "c")]
    records = runner.run_objects(quick, tasks, tmp_path, "h", workers=2, limits=runner.Limits(timeout_s=1.0))
    assert [(r["key"], r["status"], r["reason"]) for r in records] == [(k, "ok", "") for k in ("a", "b", "c")]


def stuck_when_asked(task, out_dir):
    """A per-object function stuck where the alarm cannot reach it (as in a long native call)."""
    if task.key == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)
    return {"path": ""}


def test_an_object_stuck_past_the_alarm_has_its_worker_ended(tmp_path):
    from shapeflow import runner

    tasks = [runner.Task(key=k, src=f"builtin:{k}", meta={}) for k in ("a", "stuck", "z")]
    start = time.monotonic()
    records = runner.run_objects(stuck_when_asked, tasks, tmp_path, "h", workers=2, limits=runner.Limits(timeout_s=1.0))
    assert time.monotonic() - start < 100  # not the 120 s the object would take
    status = {r["key"]: (r["status"], r["reason"]) for r in records}
    assert status["a"][0] == status["z"][0] == "ok"
    assert status["stuck"][0] == "failed" and "its worker was ended" in status["stuck"][1]
