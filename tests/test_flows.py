"""The preprocessing fan-out flow on its two task runners: a local process pool and a Dask cluster."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from shapeflow import config
from shapeflow.stages import fetch


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One temporary Prefect server for the module; its URL in the environment, so the task
    runner's processes (pool processes, Dask workers) report to it instead of starting their own."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("DO_NOT_TRACK", "1")
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=180):
            mp.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
            yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    params = config.Params(fetch=config.FetchParams(builtin=config.BuiltinParams(per_category=1, defect_share=0.0)))
    fetch.run(params, out, workers=1)
    return out


def write_params(folder: Path, **compute) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"watertight": {"resolution": 32}, "compute": {"workers": 2, **compute}}))
    return path


def manifest(folder: Path) -> dict[str, str]:
    with open(folder / "manifest.csv", newline="") as fh:
        return {row["key"]: row["status"] for row in csv.DictReader(fh)}


def test_process_pool_shards_do_what_the_stage_does(prefect_api, raw, tmp_path):
    from flows.preprocess import preprocess

    totals = preprocess(
        "watertight", str(raw), str(tmp_path / "fanned"), params_file=str(write_params(tmp_path, shards=3))
    )
    assert totals == {"ok": 8, "failed": 0, "failures": []}
    from shapeflow.stages import watertight

    watertight.run(config.load_params(tmp_path / "params.yaml"), raw, tmp_path / "direct", workers=1)
    assert manifest(tmp_path / "fanned") == manifest(tmp_path / "direct")
    fanned = sorted(p.name for p in (tmp_path / "fanned" / "objects").iterdir())
    assert fanned == sorted(p.name for p in (tmp_path / "direct" / "objects").iterdir()) and len(fanned) == 8


def test_a_failed_object_of_a_shard_is_named_in_the_fan_outs_result(prefect_api, raw, tmp_path):
    import shutil

    from flows.preprocess import preprocess

    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    victim = sorted((broken / "objects").iterdir())[0]
    victim.write_bytes(b"ply\nnot a mesh")
    totals = preprocess(
        "watertight", str(broken), str(tmp_path / "out"), params_file=str(write_params(tmp_path, shards=2))
    )
    assert totals["ok"] == 7 and totals["failed"] == 1
    (line,) = totals["failures"]
    assert line.startswith(victim.name[:12]) and str(victim.name) in line


def test_dask_cluster_runs_the_shards_when_params_name_its_address(prefect_api, raw, tmp_path):
    from distributed import LocalCluster

    from flows.preprocess import preprocess, task_runner

    with LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, processes=True
    ) as cluster:
        params = write_params(tmp_path, shards=2, dask_address=cluster.scheduler_address)
        assert type(task_runner(config.load_params(params).compute)).__name__ == "DaskTaskRunner"
        totals = preprocess("watertight", str(raw), str(tmp_path / "dask"), params_file=str(params))
        assert totals == {"ok": 8, "failed": 0, "failures": []}
        assert set(manifest(tmp_path / "dask").values()) == {"ok"}
        # The shards went through the cluster's scheduler: one task each, finished in memory.
        finished = {t[0] for t in cluster.scheduler.transition_log if t[2] == "memory"}
        assert len([key for key in finished if "preprocess" in str(key)]) == 2, finished


def test_preprocess_refuses_a_stage_that_is_not_per_object(prefect_api, tmp_path):
    from flows.preprocess import preprocess

    with pytest.raises(ValueError, match="not a per-object stage"):
        preprocess("train_vae", "a", "b", params_file=str(write_params(tmp_path)))


def test_bad_dask_address_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"compute": {"dask_address": "localhost"}}))
    with pytest.raises(config.ParamsError, match="compute.dask_address"):
        config.load_params(path)


@pytest.mark.slow
def test_pipeline_flow_fans_out_a_stale_per_object_stage_and_records_it_in_dvc_lock(prefect_api, tmp_path):
    """targets=[watertight]: fetch through `dvc repro`, watertight through the fan-out and `dvc commit`;
    afterwards DVC finds both up to date, and a second run does nothing."""
    import shutil
    import subprocess
    import sys

    from test_pipeline_e2e import ROOT, TINY

    repo = tmp_path / "repo"
    repo.mkdir()
    for folder in ("src", "configs", "flows"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".dvcignore"):  # .dvcignore: the stages' timing logs are no part of their outputs
        shutil.copy(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY | {"compute": {"workers": 2, "shards": 2}}))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)

    import flows.pipeline as pipeline_flow

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_flow, "REPO", repo)
        assert pipeline_flow.pipeline(targets=["watertight"]) == {"fetch": True, "watertight": True}
        status = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json", "watertight"], cwd=repo, capture_output=True, text=True
        )
        assert status.returncode == 0 and status.stdout.strip() in ("{}", "")
        assert len(manifest(repo / "data" / "watertight")) == 8
        assert pipeline_flow.pipeline(targets=["watertight"]) == {"fetch": False, "watertight": False}

        # An experiment whose worktree has no dvc.lock yet (none committed): fetch runs there (it reads
        # outside the workspace), watertight (persist outputs, which DVC's run cache skips) is the kept
        # run above, checked out from the cache instead of computed again.
        subprocess.run(["git", "add", "-A", "--", ".", ":!dvc.lock"], cwd=repo, check=True)
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
        subprocess.run([*git, "commit", "-qm", "code"], cwd=repo, check=True)
        ran = pipeline_flow.pipeline(targets=["watertight"], overrides=["train_vae.steps=7"], experiment="other")
        assert ran == {"fetch": True, "watertight": False}
        ws = repo / ".shapeflow" / "experiments" / "other"
        assert manifest(ws / "data" / "watertight") == manifest(repo / "data" / "watertight")
        status = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json", "watertight"], cwd=ws, capture_output=True, text=True
        )
        assert status.returncode == 0 and status.stdout.strip() in ("{}", ""), status.stdout

    # The run graph: the fan-out of watertight waits for fetch, its commit for the fan-out; the run
    # is named after what it builds and tagged with it.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])))
        first = min(runs, key=lambda r: r.created)
        assert first.name == "pipeline: workspace" and "experiment:workspace" in first.tags
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])))
    by_name = {t.name: t for t in tasks}

    def waits_for(task_run) -> set:
        return {ref.id for ref in task_run.task_inputs.get("wait_for", [])}

    check = next(t for t in tasks if t.name.startswith("dvc-status"))
    assert by_name["fetch"].id in waits_for(check)
    assert check.id in waits_for(by_name["reuse watertight"])
    fan_out = next(t for t in tasks if t.name.startswith("preprocess"))  # the sub-flow's task run
    assert by_name["reuse watertight"].id in waits_for(fan_out)
    assert fan_out.id in waits_for(by_name["commit watertight"])
    assert all("experiment:workspace" in t.tags for t in (check, by_name["fetch"]))


def test_a_run_that_crashed_more_than_crash_retries_times_is_not_run_again(monkeypatch):
    from types import SimpleNamespace

    import flows.pipeline as pipeline_flow

    for run_count, crash_retries in ((1, 0), (2, 1), (3, 2)):
        monkeypatch.setattr(pipeline_flow, "flow_run", SimpleNamespace(run_count=run_count))
        pipeline_flow.refuse_after_crashes(crash_retries)  # within the allowance: runs
    monkeypatch.setattr(pipeline_flow, "flow_run", SimpleNamespace(run_count=3))
    with pytest.raises(RuntimeError, match="crashed 2 times, crash_retries 1"):
        pipeline_flow.refuse_after_crashes(1)
    with pytest.raises(ValueError, match="crash_retries: 0 or more"):
        pipeline_flow.refuse_after_crashes(-1)
