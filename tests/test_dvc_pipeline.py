"""What the Prefect flows rely on to drive DVC: stage order, overrides, failure kinds, the metrics report."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml

from shapeflow import dvc_pipeline as dp
from shapeflow.report import metrics_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_stage_order_follows_the_dvc_dag_and_pulls_in_what_targets_need():
    assert dp.stage_order(ROOT) == ["fetch", "watertight", "sample", "train_vae", "train_dit", "evaluate"]
    assert dp.stage_order(ROOT, ["train_vae"]) == ["fetch", "watertight", "sample", "train_vae"]
    assert dp.stage_order(ROOT, ["sample", "fetch"]) == ["fetch", "watertight", "sample"]
    with pytest.raises(ValueError, match="unknown stage.*'trian_vae'"):
        dp.stage_order(ROOT, ["trian_vae"])


def test_stage_order_is_topological_whatever_the_file_order(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "report": {"cmd": "x", "deps": ["out/b", "out/a/part"], "outs": ["out/report.md"]},
                    "b": {"cmd": "x", "deps": ["out/a"], "metrics": [{"out/b": {"cache": False}}]},
                    "a": {"cmd": "x", "deps": ["src"], "outs": [{"out/a": {"persist": True}}]},
                    "other": {"cmd": "x", "deps": ["src"], "outs": ["out/other"]},
                }
            }
        )
    )
    assert dp.stage_order(tmp_path) == ["a", "other", "b", "report"]
    assert dp.stage_order(tmp_path, ["report"]) == ["a", "b", "report"]


def test_overrides_are_typed_yaml_values_written_into_nested_sections(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "train_vae": {"steps": 2000, "model": {}}}))
    dp.apply_overrides(
        params, ["train_vae.steps=100", "train_vae.model.num_latents=64", "evaluate.split=val", "seed=3"]
    )
    assert yaml.safe_load(params.read_text()) == {
        "seed": 3,
        "train_vae": {"steps": 100, "model": {"num_latents": 64}},
        "evaluate": {"split": "val"},
    }
    for bad in ("train_vae.steps", "=3", "train_vae..steps=1"):
        with pytest.raises(ValueError, match="KEY.PATH=VALUE"):
            dp.apply_overrides(params, [bad])
    with pytest.raises(ValueError, match="seed is not a section"):
        dp.apply_overrides(params, ["seed.x=1"])


@pytest.mark.parametrize("name", ["../../../victim", "..", "a/../../victim", "/tmp/victim", ".hidden", "a b", ""])
def test_an_experiment_name_that_is_not_a_plain_folder_name_is_refused_and_nothing_is_deleted(tmp_path, name):
    repo, victim = tmp_path / "repo", tmp_path / "victim"
    (repo / dp.EXPERIMENTS_DIR).mkdir(parents=True)
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    with pytest.raises(ValueError, match="experiment name"):
        dp.experiment_workspace(repo, name, [], print)
    assert (victim / "data.txt").read_text() == "keep me"


def test_an_experiment_folder_that_links_outside_is_refused(tmp_path):
    repo, victim = tmp_path / "repo", tmp_path / "victim"
    (repo / dp.EXPERIMENTS_DIR).mkdir(parents=True)
    victim.mkdir()
    (repo / dp.EXPERIMENTS_DIR / "linked").symlink_to(victim)
    with pytest.raises(ValueError, match="not inside"):
        dp.experiment_workspace(repo, "linked", [], print)
    assert victim.is_dir()
    assert dp.experiment_folder(repo, "sf-1a2b3c4d") == (repo / dp.EXPERIMENTS_DIR / "sf-1a2b3c4d").resolve()


def test_experiment_names_are_stable_per_override_set():
    assert dp.experiment_name(["a.b=1", "c=2"]) == dp.experiment_name(["c=2", "a.b=1"])
    assert dp.experiment_name(["a.b=1"]) != dp.experiment_name(["a.b=2"])


def test_a_meshes_run_is_named_after_the_folder_and_fetches_it_locally(tmp_path):
    folder = tmp_path / "my meshes#1" / "quaternius"
    folder.mkdir(parents=True)
    name, overrides = dp.meshes_experiment(folder)
    assert name == "quaternius" and overrides[0] == "fetch.source=local"
    params = tmp_path / "params.yaml"
    params.write_text("fetch: {source: builtin}\n")
    dp.apply_overrides(params, overrides)
    assert yaml.safe_load(params.read_text())["fetch"] == {"source": "local", "local": {"path": str(folder)}}
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(ValueError, match="must match"):
        dp.meshes_experiment(tmp_path / ".hidden")
    with pytest.raises(NotADirectoryError):
        dp.meshes_experiment(tmp_path / "nowhere")
    # More overrides (make pipeline SET=...): another experiment, named after the folder and them.
    name, overrides = dp.meshes_experiment(folder, ["train_vae.family=grid"])
    assert name.startswith("quaternius-") and name != "quaternius" and overrides[-1] == "train_vae.family=grid"
    assert dp.meshes_experiment(folder, ["train_vae.family=grid"])[0] == name  # stable
    with pytest.raises(ValueError, match="expected KEY.PATH=VALUE"):
        dp.meshes_experiment(folder, ["train_vae.family"])


@pytest.mark.slow
def test_run_experiment_saves_a_named_experiment_and_a_second_run_redoes_only_fetch(tmp_path):
    """A two-stage repository: fetch writes the folder path it is given, `later` copies that."""
    import subprocess

    read = "import yaml; p = yaml.safe_load(open('params.yaml'))['fetch']; open('raw.txt', 'w').write(str(p))"
    (tmp_path / "params.yaml").write_text("fetch: {source: builtin}\n")
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "fetch": {"cmd": f'python -c "{read}"', "params": ["fetch"], "outs": ["raw.txt"]},
                    "later": {"cmd": "cp raw.txt later.txt", "deps": ["raw.txt"], "outs": ["later.txt"]},
                }
            }
        )
    )
    (tmp_path / ".gitignore").write_text(".shapeflow/\n")
    for cmd in (["git", "init", "-q"], [*dp.dvc_command(), "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "two stages"], cwd=tmp_path, check=True)
    overrides = ["fetch.source=local", 'fetch.local.path="/data/meshes"']
    first: list[str] = []
    ws = dp.run_experiment(tmp_path, "meshes", overrides, first.append)
    assert "/data/meshes" in (ws / "later.txt").read_text()
    assert any("Running stage 'fetch'" in line for line in first)
    assert any("Running stage 'later'" in line for line in first)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == {"fetch": {"source": "builtin"}}
    listed = subprocess.run([*dp.dvc_command(), "exp", "list", "--name-only"], cwd=tmp_path, capture_output=True)
    assert listed.stdout.decode().split() == ["meshes"]
    second: list[str] = []
    dp.run_experiment(tmp_path, "meshes", overrides, second.append)
    assert any("Running stage 'fetch'" in line for line in second)  # the folder is read again
    assert not any("Running stage 'later'" in line for line in second)  # nothing else changed
    # Each stage's wall time is logged, and whether it ran.
    assert any(re.fullmatch(r"stage later: ran in \d+ s", line) for line in first)
    assert any(re.fullmatch(r"stage later: up to date in \d+ s", line) for line in second)
    summary = [line for line in second if line.startswith("wall time per stage: ")]
    assert len(summary) == 1 and re.search(r"fetch \d+ s, later \d+ s \(up to date\)", summary[0])
    # A new commit that changes no stage: the workspace follows HEAD and still redoes only fetch.
    (tmp_path / "README").write_text("notes\n")
    subprocess.run(["git", "add", "README"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "notes"], cwd=tmp_path, check=True)
    third: list[str] = []
    dp.run_experiment(tmp_path, "meshes", overrides, third.append)
    assert (ws / "README").is_file() and not any("Running stage 'later'" in line for line in third)


def test_only_killed_or_locked_stages_count_as_transient():
    assert dp.StageFailed("train_vae", -signal.SIGKILL, "").transient
    assert dp.StageFailed("train_vae", 137, "").transient
    assert dp.StageFailed(
        "fetch", 255, "ERROR: Unable to acquire lock. Most likely another DVC process is running"
    ).transient
    bad_param = dp.StageFailed(
        "train_vae", 2, "shapeflow train-vae: error: params.yaml: train_vae.steps: an integer is required"
    )
    assert not bad_param.transient and "train_vae.steps" in str(bad_param)


def test_run_stage_reports_the_stage_error_and_whether_it_ran(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "ok": {"cmd": "echo made > out.txt", "outs": ["out.txt"]},
                    "bad": {"cmd": "echo 'bad value for train_vae.lr' >&2; exit 3", "deps": ["out.txt"]},
                }
            }
        )
    )
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dp.dvc_command(), "init", "-q"], cwd=tmp_path, check=True)
    lines: list[str] = []
    assert dp.run_stage(tmp_path, "ok", lines.append) is True
    assert dp.up_to_date(tmp_path, "ok")
    assert dp.run_stage(tmp_path, "ok", lines.append) is False
    with pytest.raises(dp.StageFailed, match="bad value for train_vae.lr") as failed:
        dp.run_stage(tmp_path, "bad", lines.append)
    assert failed.value.returncode != 0 and not failed.value.transient
    assert any("Running stage 'ok'" in line for line in lines)


def test_metrics_report_lists_each_stage_with_its_run(tmp_path):
    (tmp_path / "reports" / "train_vae").mkdir(parents=True)
    (tmp_path / "reports" / "train_vae" / "metrics.json").write_text(
        json.dumps({"steps": 40, "val_cd": 0.0512, "val_f@0.02": 0.25})
    )
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "config.json").write_text(json.dumps({"meta": {"mlflow_run_id": "abc123"}}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(
        json.dumps({"recon": {"cd": 0.04, "f@0.02": 0.5, "floor": {"cd": 0.01}}})
    )
    text = metrics_markdown(tmp_path)
    assert "## train_vae (MLflow run `abc123`)" in text and "| val_f@0.02 | 0.25 |" in text
    assert (
        "## evaluate (MLflow run –)" in text
        and "| recon.f@0.02 | 0.5 |" in text
        and "| recon.floor.cd | 0.01 |" in text
    )
    assert "train_dit" not in text
    assert metrics_markdown(tmp_path / "nothing").endswith("No stage has written metrics yet.")


def test_evaluating_without_up_to_date_models_fails_at_once_saying_how_to_get_them(tmp_path):
    import subprocess

    (tmp_path / "params.yaml").write_text("train_vae: {steps: 1}\n")
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "train_vae": {"cmd": "echo vae > vae.txt", "params": ["train_vae"], "outs": ["vae.txt"]},
                    "train_dit": {"cmd": "cp vae.txt dit.txt", "deps": ["vae.txt"], "outs": ["dit.txt"]},
                }
            }
        )
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dp.dvc_command(), "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(dp.NoModels, match=r"train_vae: vae.txt missing; train_dit: dit.txt missing.*pipeline/full"):
        dp.check_models(tmp_path)
    for stage in ("train_vae", "train_dit"):
        dp.run_stage(tmp_path, stage, lambda line: None)
    dp.check_models(tmp_path)  # trained and up to date
    (tmp_path / "params.yaml").write_text("train_vae: {steps: 2}\n")
    with pytest.raises(dp.NoModels, match=r"train_vae: stale"):
        dp.check_models(tmp_path)


def test_a_reused_workspace_starts_from_the_committed_params_and_workspaces_can_be_listed_and_removed(tmp_path):
    """A typo'd override must not stick to an experiment name: the corrected run gets only its own."""
    import subprocess

    (tmp_path / "params.yaml").write_text("train_dit: {steps: 10}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "true", "params": ["train_dit"]}}}))
    (tmp_path / ".gitignore").write_text(".shapeflow/\n")
    for cmd in (["git", "init", "-q"], [*dp.dvc_command(), "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "base"], cwd=tmp_path, check=True)
    ws = dp.experiment_workspace(tmp_path, "short", ["train_dit.stepz=5"], lambda line: None)
    assert yaml.safe_load((ws / "params.yaml").read_text())["train_dit"] == {"steps": 10, "stepz": 5}
    dp.experiment_workspace(tmp_path, "short", ["train_dit.steps=5"], lambda line: None)
    assert yaml.safe_load((ws / "params.yaml").read_text())["train_dit"] == {"steps": 5}
    assert dp.list_experiments(tmp_path) == [("short", ws)]
    listed = subprocess.run(
        [sys.executable, "-m", "shapeflow.dvc_pipeline", "--list"], cwd=tmp_path, capture_output=True, text=True
    )
    assert listed.stdout.split() == ["short", str(ws)]
    assert dp.remove_experiment(tmp_path, "short") == ws and not ws.exists()
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert len(worktrees.splitlines()) == 1 and dp.list_experiments(tmp_path) == []
    with pytest.raises(ValueError, match="no experiment workspace 'short'"):
        dp.remove_experiment(tmp_path, "short")


def test_stages_of_a_workspace_import_its_own_checkout_of_the_package(tmp_path):
    # An experiment worktree holds the commit it was made from; the installed package follows the
    # main checkout. The stages must run the former, the code the worktree's dvc.lock hashes.
    import subprocess

    ws = tmp_path / "ws"
    (ws / "src" / "shapeflow").mkdir(parents=True)
    (ws / "src" / "shapeflow" / "__init__.py").write_text("WHERE = 'workspace'\n")
    probe = [sys.executable, "-c", "import shapeflow; print(getattr(shapeflow, 'WHERE', 'installed'))"]
    ours = subprocess.run(probe, env=dp.tool_env(None, ws), capture_output=True, text=True, cwd=tmp_path)
    assert ours.stdout.strip() == "workspace", ours.stderr
    plain = subprocess.run(probe, env=dp.tool_env(None, tmp_path), capture_output=True, text=True, cwd=tmp_path)
    assert plain.stdout.strip() == "installed", plain.stderr


@pytest.mark.slow
def test_eval_metrics_and_plots_of_saved_experiments_reach_exp_show_and_metrics_diff(tmp_path, monkeypatch):
    """The project's .gitignore and its evaluate stage's outs, metrics and plots, on a stand-in
    command: what `dvc exp save` keeps must include the evaluation figures."""
    import subprocess

    project = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    write = (
        "import json, os, yaml; s = yaml.safe_load(open('params.yaml'))['evaluate']['scale']; "
        "[os.makedirs(d, exist_ok=True) for d in ('eval/recon', 'eval/samples', 'eval/plots')]; "
        "open('eval/recon/a.txt', 'w').write('r'); open('eval/samples/a.txt', 'w').write('s'); "
        "json.dump({'recon': {'f@0.02': 0.5 * s, 'cd': 0.01 / s}}, open('eval/metrics.json', 'w')); "
        "json.dump({'mlflow_run_id': os.environ[f'TEST_RUN_{int(s)}']}, open('eval/run.json', 'w')); "
        "[open(f'eval/plots/{n}.csv', 'w').write('key,category,sample,f@0.02,mmd_cd,nearest_cd\\na,c,0,0.5,1,1\\n') "
        "for n in ('recon', 'recon_categories', 'generation_categories', 'generation')]"
    )
    stage = {"cmd": f'python -c "{write}"', "params": ["evaluate"]}
    stage |= {k: project[k] for k in ("outs", "metrics", "plots")}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}))
    (tmp_path / "params.yaml").write_text("evaluate: {scale: 1.0}\n")
    (tmp_path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    for cmd in (["git", "init", "-q"], [*dp.dvc_command(), "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "evaluate"], cwd=tmp_path, check=True)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    runs = {scale: client.create_run(client.create_experiment(f"e{scale}")).info.run_id for scale in (1, 2)}
    for scale, run_id in runs.items():
        monkeypatch.setenv(f"TEST_RUN_{scale}", run_id)
    dp.run_experiment(tmp_path, "one", ["evaluate.scale=1.0"], lambda line: None, force=())
    dp.run_experiment(tmp_path, "two", ["evaluate.scale=2.0"], lambda line: None, force=())

    def dvc(*args: str) -> str:
        proc = subprocess.run([*dp.dvc_command(), *args], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "failed to load" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return proc.stdout

    shown = json.loads(dvc("exp", "show", "--json"))
    figures = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                metrics = rev["data"]["metrics"]["eval/metrics.json"]["data"]
                figures[rev["name"]] = metrics["recon"]["f@0.02"]
    assert figures == {"one": 0.5, "two": 1.0}
    # Each experiment's MLflow run is tagged with the experiment's commit, the rev DVC shows for it.
    revs = {
        rev["name"]: rev["rev"] for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]
    }
    for name, scale in (("one", 1), ("two", 2)):
        assert client.get_run(runs[scale]).data.tags["dvc_exp_commit"] == revs[name]
    diff = json.loads(dvc("metrics", "diff", "one", "two", "--json"))
    assert diff["eval/metrics.json"]["recon.f@0.02"] == {"old": 0.5, "new": 1.0, "diff": 0.5}
    dvc("plots", "diff", "one", "two", "--json")


@pytest.mark.slow
def test_a_second_clone_pulls_the_outputs_a_first_pushed_instead_of_rebuilding_them(tmp_path):
    """A directory remote as the shared cache: the first machine runs and pushes, a clone with the
    same remote pulls; experiment worktrees see a remote set for this machine only."""
    import subprocess

    first, store = tmp_path / "first", tmp_path / "store"
    first.mkdir()
    stages = {
        "make": {"cmd": "python -c \"open('made.txt', 'w').write('made')\"", "outs": ["made.txt"]},
        "later": {"cmd": "cp made.txt later.txt", "deps": ["made.txt"], "outs": ["later.txt"]},
    }
    (first / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (first / "params.yaml").write_text("seed: 0\n")
    (first / ".gitignore").write_text(".shapeflow/\n")
    for cmd in (["git", "init", "-q"], [*dp.dvc_command(), "init", "-q"]):
        subprocess.run(cmd, cwd=first, check=True)
    assert dp.default_remote(first) is None
    subprocess.run([*dp.dvc_command(), "remote", "add", "--local", "-d", "store", str(store)], cwd=first, check=True)
    assert dp.default_remote(first) == "store"
    assert all(dp.run_stage(first, stage, lambda line: None) for stage in stages)
    subprocess.run(["git", "add", "-A"], cwd=first, check=True)
    subprocess.run(["git", "commit", "-qm", "two stages"], cwd=first, check=True)
    dp.push_outputs(first, lambda line: None)
    assert any(p.is_file() for p in store.rglob("*"))

    # An experiment worktree has the committed .dvc/config, not the untracked config.local.
    ws = dp.experiment_workspace(first, "exp", ["seed=1"], lambda line: None)
    assert dp.default_remote(ws) == "store"

    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
    subprocess.run([*dp.dvc_command(), "remote", "add", "--local", "-d", "store", str(store)], cwd=second, check=True)
    assert not (second / "made.txt").exists()
    lines: list[str] = []
    assert not any(dp.run_stage(second, stage, lines.append, pull=True) for stage in stages)  # nothing rebuilt
    assert (second / "later.txt").read_text() == "made"
    assert not any("Running stage" in line for line in lines)


@pytest.mark.slow
def test_a_persist_stage_is_reused_in_another_workspace_with_the_same_inputs_and_params(tmp_path):
    """DVC's run cache skips stages with persist outputs; shapeflow.reuse keeps their runs instead."""
    import subprocess

    counter = tmp_path / "runs.txt"  # outside the repository: how often `per` really ran
    per = (
        "import yaml, pathlib; s = yaml.safe_load(open('params.yaml'))['per']['scale']; "
        "pathlib.Path('per').mkdir(exist_ok=True); "
        "open('per/out.txt', 'w').write(open('made.txt').read() * s); "
        f"open({str(counter)!r}, 'a').write('x')"
    )
    stages = {
        "make": {"cmd": "python -c \"open('made.txt', 'w').write('m')\"", "deps": ["tool.py"], "outs": ["made.txt"]},
        "per": {
            "cmd": f'python -c "{per}"',
            "deps": ["made.txt", "tool.py"],
            "params": ["per"],
            "outs": [{"per": {"persist": True}}],
        },
    }
    (tmp_path / "repo").mkdir()
    repo = tmp_path / "repo"
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (repo / "params.yaml").write_text("per: {scale: 2}\ntrain: {steps: 1}\n")
    (repo / "tool.py").write_text("# code the stages depend on\n")
    (repo / ".gitignore").write_text(".shapeflow/\n")
    for cmd in (["git", "init", "-q"], [*dp.dvc_command(), "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "two stages"], cwd=repo, check=True)
    assert dp.read_stages(repo)["per"].persist and not dp.read_stages(repo)["make"].persist
    assert dp.run_stage(repo, "make", lambda line: None) and dp.run_stage(repo, "per", lambda line: None)
    assert counter.read_text() == "x"

    # Another workspace (no dvc.lock committed), a param `per` does not read: reused, not run.
    ws = dp.experiment_workspace(repo, "other", ["train.steps=5"], lambda line: None)
    lines: list[str] = []
    assert dp.run_stage(ws, "make", lines.append) is False  # DVC's own run cache
    assert dp.run_stage(ws, "per", lines.append) is False
    assert counter.read_text() == "x" and (ws / "per" / "out.txt").read_text() == "mm"
    assert any("reused" in line for line in lines) and dp.up_to_date(ws, "per")
    # A param it reads changed: it runs.
    ws = dp.experiment_workspace(repo, "scaled", ["per.scale=3"], lambda line: None)
    assert dp.run_stage(ws, "make", lambda line: None) is False
    assert dp.run_stage(ws, "per", lambda line: None) is True
    assert counter.read_text() == "xx" and (ws / "per" / "out.txt").read_text() == "mmm"
