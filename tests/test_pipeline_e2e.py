"""End to end on tiny presets, in a scratch git repo: the real `dvc repro` of this repo's dvc.yaml (accelerate
launch included), DVC experiments, then the same pipeline as users trigger it: a Prefect server, an MLflow
server and a worker (scripts/services.sh, what `make services` starts), prefect.yaml's deployments, a
run with an override checked through MLflow's REST API, and the faults (a bad param, a killed worker)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import TINY_VAE

pytestmark = pytest.mark.slow  # real DVC repro, Prefect and MLflow servers

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 0,
    "fetch": {"builtin": {"per_category": 1, "defect_share": 0.5}},
    "watertight": {"resolution": 32},
    "sample": {"surface": 512, "sharp": 128, "volume": 512, "near": 256, "sharp_near": 128},
    "compute": {"workers": 2},
    "train_vae": TINY_VAE
    | {
        "steps": 4,
        "batch_size": 2,
        "log_every": 2,
        "checkpoint_every": 2,
        "val_resolution": 32,
        "accelerate_config": "configs/accelerate/default.yaml",
    },
    "train_dit": {
        "model": {"width": 64, "depth": 2},
        "steps": 4,
        "batch_size": 2,
        "log_every": 2,
        "checkpoint_every": 2,
        "val_every": 0,
        "final_samples": 2,
        "generate": {"steps": 2, "resolution": 32},
        "accelerate_config": "configs/accelerate/default.yaml",
    },
    # The 8 objects may leave the test split empty: score the train split.
    "evaluate": {"split": "train", "resolution": 32, "recon_points": 500, "gen_points": 128, "previews": 2},
}
STAGES = ("fetch", "watertight", "sample", "train_vae", "train_dit", "evaluate")


def dvc(repo: Path, *args: str) -> str:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for folder in ("configs", "flows", "scripts"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "prefect.yaml"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))
    (repo / ".gitignore").write_text(".shapeflow/\nmlflow.db\n__pycache__/\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")  # keeps the experiment worktrees out of the main pipeline
    dvc(repo, "config", "core.analytics", "false")
    return repo


def test_repro_builds_all_data_stages_then_does_nothing_then_only_what_changed(repo):
    first = dvc(repo, "repro")
    assert ran(first) == set(STAGES)
    for stage in ("raw", "watertight", "samples"):
        with open(repo / "data" / stage / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), (stage, rows)
    npz = next((repo / "data" / "samples" / "objects").glob("*.npz"))
    with np.load(npz, allow_pickle=False) as arrays:
        assert arrays["surface_points"].shape == (512, 3)
    assert (repo / "models" / "vae" / "model.safetensors").is_file()
    metrics = yaml.safe_load((repo / "reports" / "train_vae" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 1
    assert (repo / "models" / "dit" / "ema" / "model.safetensors").is_file()
    dit_metrics = yaml.safe_load((repo / "reports" / "train_dit" / "metrics.json").read_text())
    assert dit_metrics["steps"] == 4 and dit_metrics["gen_samples"] == 2
    evaluated = json.loads((repo / "eval" / "metrics.json").read_text())
    with open(repo / "data" / "samples" / "manifest.csv", newline="") as fh:
        train = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    # Every train object reconstructed; one sample per train object (as many per category as it has).
    assert evaluated["recon"]["objects"] == len(train) and evaluated["generation"]["samples"] == len(train)

    assert ran(dvc(repo, "repro")) == set()
    assert "up to date" in dvc(repo, "status")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    # Only what depends on the change reruns (the per-object stages' own resume is in their tests).
    params["train_dit"]["steps"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = dvc(repo, "repro")
    assert ran(third) == {"train_dit", "evaluate"}, third[-3000:]


def test_two_experiments_line_up_in_dvc_exp_show_metrics_diff_and_mlflow(repo):
    if not (repo / "dvc.lock").is_file():
        dvc(repo, "repro")
    commit(repo, "baseline")
    for name, points in (("coarse", 300), ("fine", 600)):
        out = dvc(repo, "exp", "run", "-n", name, "-S", f"evaluate.recon_points={points}")
        assert ran(out) == {"evaluate"}, out[-3000:]

    shown = _json_of(dvc(repo, "exp", "show", "--json"))
    exps = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            newest = experiment["revs"][0]
            exps[newest["name"]] = newest
    assert {"coarse", "fine"} <= set(exps)
    for name, points in (("coarse", 300), ("fine", 600)):
        data = exps[name]["data"]
        assert data["params"]["params.yaml"]["data"]["evaluate"]["recon_points"] == points
        assert "cd" in data["metrics"]["eval/metrics.json"]["data"]["recon"]
    diff = _json_of(dvc(repo, "metrics", "diff", exps["coarse"]["rev"], exps["fine"]["rev"], "--json"))
    assert "recon.floor.cd" in diff["eval/metrics.json"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shapeflow-evaluate")
    named = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"coarse", "fine"} <= set(named)
    assert named["coarse"].data.tags["dvc_exp"] == "coarse"
    assert (
        named["coarse"].data.params["evaluate.recon_points"] == "300"
        and named["fine"].data.params["evaluate.recon_points"] == "600"
    )
    # The same param keys and metric names, so MLflow's compare view lines the two runs up.
    assert set(named["coarse"].data.params) == set(named["fine"].data.params)
    assert set(named["coarse"].data.metrics) == set(named["fine"].data.metrics)


def test_the_grid_family_runs_through_evaluate_as_a_dvc_experiment(repo):
    if not (repo / "dvc.lock").is_file():
        dvc(repo, "repro")
    commit(repo, "before the grid experiment")
    # Hydra's override grammar, which DVC takes: "+" adds a key the params file does not hold yet,
    # "~" removes one (the VecSet model overrides).
    grid = ["train_vae.family=grid", "+train_vae.preset=tiny", "~train_vae.model"]
    grid += ["+sample.grid={resolution: 32, sparse_resolution: 64}"]
    out = dvc(repo, "exp", "run", "--temp", "-n", "grid", *[arg for s in grid for arg in ("-S", s)])
    # fetch and watertight do not read the family; the sample stage adds the grids.
    assert ran(out) == {"sample", "train_vae", "train_dit", "evaluate"}, out[-3000:]

    exps = {}
    for baseline in _json_of(dvc(repo, "exp", "show", "--json")):
        for experiment in baseline.get("experiments") or []:
            exps[experiment["revs"][0]["name"]] = experiment["revs"][0]["data"]
    assert exps["grid"]["params"]["params.yaml"]["data"]["train_vae"]["family"] == "grid"
    evaluated = exps["grid"]["metrics"]["eval/metrics.json"]["data"]
    assert evaluated["recon"]["objects"] > 0 and evaluated["generation"]["samples"] > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for stage in ("train_vae", "train_dit", "evaluate"):
        experiment = client.get_experiment_by_name(f"shapeflow-{stage}")
        tagged = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("dvc_exp") == "grid"]
        assert [r.data.tags["vae_family"] for r in tagged] == ["grid"], stage


def commit(repo: Path, message: str) -> None:
    git = ["git", "-c", "user.name=shapeflow-test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", message, "--allow-empty"], cwd=repo, check=True)


def _json_of(output: str):
    """The JSON document in a command's output (dvc may print notices around it)."""
    start = min(i for i in (output.find("{"), output.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(output[start:])[0]


# -- the same pipeline through Prefect: servers, deployments, a worker --------------------------------------

BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """The README's services on free loopback ports, in their own folder; stopped by process group."""

    def __init__(self, repo: Path, folder: Path):
        self.repo, self.folder = repo, folder
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.env = dict(
            os.environ,
            BIN=str(BIN),
            SERVICES_DIR=str(folder),
            PREFECT_PORT=str(self.prefect_port),
            MLFLOW_PORT=str(self.mlflow_port),
            PREFECT_API_URL=f"http://127.0.0.1:{self.prefect_port}/api",
            PREFECT_HOME=str(folder / "prefect"),
            SHAPEFLOW_REPO=str(repo),
            PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
            DO_NOT_TRACK="1",
            OMP_NUM_THREADS="1",
            # The server's scheduler looks for deployments to schedule every 5 s instead of every 60 s.
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        )
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"

    def script(self, *args: str, timeout: int = 300) -> str:
        proc = subprocess.run(
            ["bash", "scripts/services.sh", *args],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"services.sh {args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def prefect(self, *args: str) -> str:
        proc = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", *args],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"prefect {args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def python(self, *args: str) -> str:
        proc = subprocess.run(
            [sys.executable, *args], cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"python {args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def trigger(self, name: str, parameters: dict) -> str:
        """Start a run of a deployment; its flow run id."""
        args = [f"--param={k}={json.dumps(v)}" for k, v in parameters.items()]
        out = self.prefect("deployment", "run", name, *args)
        return next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line)

    def wait_run(self, run_id: str, types: set[str], timeout: float = 600) -> dict:
        """The flow run once its state type is one of `types`."""
        deadline = time.monotonic() + timeout
        while True:
            run = httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30).json()
            if run["state"]["type"] in types:
                return run
            if time.monotonic() > deadline:
                worker_log = (self.folder / "worker.log").read_text(errors="replace")[-3000:]
                raise AssertionError(
                    f"flow run {run_id} still {run['state']['type']} after {timeout} s; worker log:\n{worker_log}"
                )
            time.sleep(1)

    def kill_all(self) -> None:
        """Stop through the script, then make sure: every process group a pid file names is gone."""
        subprocess.run(
            ["bash", "scripts/services.sh", "stop"], cwd=self.repo, env=self.env, capture_output=True, timeout=120
        )
        for pid_file in self.folder.glob("*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), 9)
            except (ProcessLookupError, ValueError):
                pass

    def run_deployment(self, name: str, parameters: dict, timeout: float = 600) -> dict:
        """Trigger a run as the README does, wait until it ends; the flow run as the API returns it."""
        return self.wait_run(self.trigger(name, parameters), TERMINAL, timeout)

    def logs(self, flow_run_id: str) -> list[str]:
        """Every log message of a flow run and its tasks, oldest first."""
        messages, offset = [], 0
        while True:
            body = {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "limit": 200,
                "offset": offset,
                "sort": "TIMESTAMP_ASC",
            }
            page = httpx.post(f"{self.api}/logs/filter", json=body, timeout=30).json()
            messages += [entry["message"] for entry in page]
            if len(page) < 200:
                return messages
            offset += len(page)

    def mlflow_runs(self, experiment: str) -> list[dict]:
        found = httpx.get(
            f"{self.mlflow}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}, timeout=30
        )
        if found.status_code == 404:  # no run was ever logged to it
            return []
        assert found.status_code == 200, found.text
        exp_id = found.json()["experiment"]["experiment_id"]
        runs = httpx.post(
            f"{self.mlflow}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [exp_id], "max_results": 100},
            timeout=30,
        )
        return runs.json().get("runs", [])


@pytest.fixture(scope="module")
def services(repo, tmp_path_factory):
    """The services, and prefect.yaml's deployments, for the repo of the tests above: its committed
    dvc.lock and DVC cache give the experiments their finished stages."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode != 0:
        commit(repo, "baseline")
    svc = Services(repo, tmp_path_factory.mktemp("services"))
    # A directory as the DVC remote (set for this machine only): the flows pull from it and push to it.
    svc.store = tmp_path_factory.mktemp("dvc-store")
    dvc(repo, "remote", "add", "--local", "--force", "-d", "store", str(svc.store))
    try:
        svc.script("start")
        svc.prefect("deploy", "--all")
        svc.python("flows/automations.py")  # what `make deploy` runs after the deployments
        yield svc
    finally:
        svc.kill_all()


def test_the_scheduled_deployment_gets_its_next_runs_from_the_server(services):
    """prefect.yaml's weekly retrain (cron, active) must get scheduled flow runs from the server's own
    scheduler: with SQLAlchemy 2.1 the scheduler failed every loop and none ever appeared."""
    deployment = httpx.get(f"{services.api}/deployments/name/pipeline/weekly-retrain", timeout=30).json()
    assert deployment["schedules"] and deployment["schedules"][0]["active"]
    body = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
    deadline = time.monotonic() + 120
    while not (scheduled := httpx.post(f"{services.api}/flow_runs/filter", json=body, timeout=30).json()):
        assert time.monotonic() < deadline, "no scheduled run of pipeline/weekly-retrain within 120 s"
        time.sleep(2)
    starts = [datetime.fromisoformat(run["expected_start_time"]).astimezone(UTC) for run in scheduled]
    assert all((t.weekday(), t.hour, t.minute) == (6, 3, 0) for t in starts), starts  # Sundays, 03:00 UTC
    log = (services.folder / "prefect-server.log").read_text(errors="replace")
    assert "Can't evaluate bulk DML" not in log


def test_evaluate_only_without_up_to_date_models_fails_at_once_and_trains_nothing(services):
    run = services.run_deployment(
        "evaluate-only/evaluate", {"overrides": ["train_vae.steps=3"], "experiment": "eval-3"}
    )
    assert run["state"]["type"] == "FAILED", run["state"]
    assert "no up-to-date trained models (train_vae: " in run["state"]["message"]
    assert "pipeline/full" in run["state"]["message"]
    task_runs = httpx.post(
        f"{services.api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}, timeout=30
    ).json()
    assert not {t["name"] for t in task_runs} & {"train_vae", "train_dit", "evaluate"}  # no stage ran
    assert [r for r in services.mlflow_runs("shapeflow-train_vae") if r["info"]["run_name"] == "eval-3"] == []


def test_a_triggered_deployment_with_an_override_ends_in_mlflow_as_a_dvc_experiment(services):
    run = services.run_deployment("pipeline/full", {"overrides": ["train_vae.steps=6"], "experiment": "steps-6"})
    assert run["state"]["type"] == "COMPLETED", run["state"]
    evaluate_runs = [r for r in services.mlflow_runs("shapeflow-evaluate") if r["info"]["run_name"] == "steps-6"]
    assert len(evaluate_runs) == 1
    params = {p["key"]: p["value"] for p in evaluate_runs[0]["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in evaluate_runs[0]["data"]["metrics"]}
    assert params["train_vae.steps"] == "6"
    assert {"recon.cd", "recon.f_0.01", "recon.f_0.02", "generation.mmd_cd"} <= set(metrics)
    # The run names the flow run that made it, and the experiment commit `dvc exp save` made.
    tags = {t["key"]: t["value"] for t in evaluate_runs[0]["data"]["tags"]}
    assert tags["prefect_flow_run_id"] == run["id"] and tags["prefect_flow_run_url"].endswith(run["id"])
    exp_rev = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=services.repo, capture_output=True, text=True
    ).stdout
    revs = {r["name"]: r["rev"] for c in _json_of(exp_rev) for e in c.get("experiments") or [] for r in e["revs"]}
    assert tags["dvc_exp_commit"] == revs["steps-6"]
    # Both models are registered, each version linked to the run that trained it.
    for name, experiment in (("shapeflow-vae", "shapeflow-train_vae"), ("shapeflow-dit", "shapeflow-train_dit")):
        found = httpx.get(
            f"{services.mlflow}/api/2.0/mlflow/model-versions/search", params={"filter": f"name='{name}'"}, timeout=30
        ).json()["model_versions"]
        trained = {r["info"]["run_id"] for r in services.mlflow_runs(experiment) if r["info"]["run_name"] == "steps-6"}
        assert trained & {v["run_id"] for v in found}, (name, found)
    # What the run made is in the DVC remote for other machines to pull.
    assert "DVC remote: store" in "\n".join(services.logs(run["id"]))
    pushed = {p.name for p in services.store.rglob("*") if p.is_file()}
    lock = yaml.safe_load((services.repo / ".shapeflow" / "experiments" / "steps-6" / "dvc.lock").read_text())
    vae = next(o for o in lock["stages"]["train_vae"]["outs"] if o["path"] == "models/vae")
    assert vae["md5"].removesuffix(".dir")[2:] + ".dir" in pushed
    vae_runs = [r for r in services.mlflow_runs("shapeflow-train_vae") if r["info"]["run_name"] == "steps-6"]
    assert [{p["key"]: p["value"] for p in r["data"]["params"]}["train_vae.steps"] for r in vae_runs] == ["6"]
    # The workspace's params are untouched; the experiment is DVC's.
    assert (
        yaml.safe_load((services.repo / "params.yaml").read_text())["train_vae"]["steps"] == TINY["train_vae"]["steps"]
    )
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=services.repo, capture_output=True, text=True
    )
    assert "steps-6" in shown.stdout.split()
    # The experiment's worktree (inside the repo) is not part of the main pipeline.
    stages = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=services.repo, capture_output=True, text=True
    )
    assert stages.stdout.split() == list(STAGES)
    artifact = httpx.post(
        f"{services.api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["shapeflow-metrics"]}}}, timeout=30
    ).json()
    assert any("recon.f@0.02" in a["data"] and services.mlflow in a["data"] for a in artifact)


def processes_in(folder: Path) -> list[str]:
    """The live processes whose working directory is under `folder` (a stage and its children), as
    'pid command' lines."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and stat[0] != "Z" and (cwd == str(folder) or cwd.startswith(str(folder) + os.sep)):
            found.append(f"{proc.name} {cmdline[:200]}")
    return found


def wait_no_processes_in(folder: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while left := processes_in(folder):
        assert time.monotonic() < deadline, f"processes still running in {folder} after {timeout} s: {left}"
        time.sleep(0.5)


def wait_unlisted(registry: Path, timeout: float = 30) -> None:
    """Wait for the stage registry to empty: the flow run removes its stage's entry once the stage's
    process group has ended, a moment after its last process is gone."""
    deadline = time.monotonic() + timeout
    while listed := sorted(p.name for p in registry.glob("*.pgid")):
        assert time.monotonic() < deadline, f"stages still listed in {registry} after {timeout} s: {listed}"
        time.sleep(0.2)


def wait_checkpoint(worktree: Path, after: int = 0, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(
        int(p.parent.name.split("_")[1]) > after for p in worktree.glob("checkpoints/train_vae/step_*/trainer.json")
    ):
        assert time.monotonic() < deadline, f"no train_vae checkpoint past step {after} within {timeout} s"
        time.sleep(0.1)


def test_a_bad_param_fails_its_stage_and_a_killed_worker_resumes_on_rerun(services):
    """Runs in the experiment of the test above: its finished stages stay finished. A typo in an
    override fails the stage that reads it; the corrected list under the same name then runs."""
    bad = services.run_deployment("pipeline/full", {"overrides": ["train_vae.stepz=60"], "experiment": "steps-6"})
    assert bad["state"]["type"] == "FAILED"
    assert "stage 'train_vae' failed" in bad["state"]["message"] and "stepz" in bad["state"]["message"]
    task_runs = httpx.post(
        f"{services.api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [bad["id"]]}}}, timeout=30
    ).json()
    failed = [t for t in task_runs if t["state"]["type"] == "FAILED"]
    assert [t["name"] for t in failed] == ["train_vae"] and failed[0]["run_count"] == 1  # a bad param is not retried
    assert "stage sample was up to date" in "\n".join(services.logs(bad["id"]))

    # A longer training, its worker killed (kill -9 of the worker's process group) after the first
    # checkpoint: the flow run, in a session of its own, ends its stage (DVC, accelerate, the trainer)
    # and crashes; the automation schedules the same run again, and the next worker completes it.
    longer = {
        "overrides": ["train_vae.preset=tiny", "train_vae.steps=60", "train_vae.checkpoint_every=5"],
        "experiment": "steps-6",
    }
    run_id = services.trigger("pipeline/full", longer)
    worktree = services.repo / ".shapeflow" / "experiments" / "steps-6"
    wait_checkpoint(worktree)
    os.killpg(int((services.folder / "worker.pid").read_text()), 9)
    wait_no_processes_in(worktree)
    wait_unlisted(services.folder / "stages")  # the flow run took its stage off the list
    services.wait_run(run_id, {"SCHEDULED"}, timeout=120)  # crashed, then scheduled again by the automation
    started = services.script("start")  # the servers are up: only a new worker starts
    # The killed worker (a zombie until reaped) is not taken for a live one; its log is appended to.
    assert "worker: started" in started, started
    worker_log = (services.folder / "worker.log").read_text(errors="replace")
    assert worker_log.count("=== worker: started") == 2 and "submitting flow run" in worker_log
    again = services.wait_run(run_id, TERMINAL)
    assert again["state"]["type"] == "COMPLETED", again["state"]
    assert again["run_count"] == 2
    messages = "\n".join(services.logs(run_id))
    assert "resuming from step" in messages and "stage watertight was up to date" in messages

    # `make stop-services` mid-stage: nothing of the stage is left running either.
    services.trigger("pipeline/full", {**longer, "overrides": [*longer["overrides"][:1], "train_vae.steps=120"]})
    wait_checkpoint(worktree, after=60)
    services.script("stop")
    wait_no_processes_in(worktree)
    services.script("start")  # the fixture's teardown stops them again
