"""Provenance and MLflow helpers: dvc.lock hashes, git commit, tags, flattened params."""

from __future__ import annotations

import yaml

from shapeflow import tracking


def write_lock(folder) -> None:
    lock = {
        "schema": "2.0",
        "stages": {"sample": {"cmd": "x", "outs": [{"path": "data/samples", "md5": "abc.dir", "size": 1}]}},
    }
    (folder / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_dvc_hash_is_read_from_the_lock_for_the_stage_output(tmp_path, monkeypatch):
    write_lock(tmp_path)
    (tmp_path / "data" / "samples").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert tracking.dvc_hash("data/samples") == "abc.dir"
    assert tracking.dvc_hash(tmp_path / "data" / "samples") == "abc.dir"
    assert tracking.dvc_hash("data/other") is None
    monkeypatch.chdir(tmp_path / "data")
    assert tracking.dvc_hash("samples") is None  # no dvc.lock here


def test_provenance_tags_name_the_stage_commit_experiment_and_each_inputs_hash(tmp_path, monkeypatch):
    write_lock(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "coarse")
    tags = tracking.provenance_tags("train_dit", data="data/samples", vae="models/vae")
    assert tags == {
        "dvc_exp": "coarse",
        "stage": "train_dit",
        "git_commit": "unknown",  # tmp_path is no git repository
        "dvc_data_hash": "abc.dir",
        "dvc_vae_hash": "untracked",
    }
    monkeypatch.delenv("DVC_EXP_NAME")
    assert "dvc_exp" not in tracking.provenance_tags("evaluate")
    # Started by a Prefect flow run: the run names it (id and the UI's address).
    for var, value in tracking.prefect_env("1234-abcd", "http://127.0.0.1:4200/flow-runs/flow-run/1234-abcd").items():
        monkeypatch.setenv(var, value)
    tags = tracking.provenance_tags("evaluate")
    assert tags["prefect_flow_run_id"] == "1234-abcd" and tags["prefect_flow_run_url"].endswith("/1234-abcd")


def test_flatten_nests_with_dots():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": {}}) == {"a.b": 1, "a.c.d": 2, "e": 3, "f": {}}


def test_git_commit_outside_a_repository_is_unknown(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"
