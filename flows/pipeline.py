"""Prefect flows over the DVC pipeline: what users trigger as deployments (see prefect.yaml).

- `pipeline`: every stage of dvc.yaml (or the chosen targets and what they need) as one Prefect task
  each, in DAG order, with `dvc repro --single-item`, so DVC skips what is up to date. Overrides
  (`["train_vae.steps=100", ...]`) run in an experiment workspace and end as a DVC experiment; the
  workspace's params.yaml is left alone. A stage killed or blocked by a lock is retried; a stage that
  fails for a real reason (a bad param) fails its task with the stage's error. The last task publishes a
  markdown artifact: the metrics of the run with links to its MLflow runs.
- `evaluate_only`: the evaluate stage alone, on the trained models already there; without up-to-date
  models it fails at once and says how to get them.

The flows hold no geometry or model code: they call shapeflow.dvc_pipeline, which calls DVC.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from shapeflow import dvc_pipeline as dp
from shapeflow.report import metrics_markdown

try:  # run as a deployment, flows/ is the working directory's sub-folder; imported by tests as flows.pipeline
    from flows.preprocess import preprocess
except ImportError:  # pragma: no cover - started as `python flows/pipeline.py`
    from preprocess import preprocess

PER_OBJECT = ("watertight", "sample")

REPO = Path(os.environ.get("SHAPEFLOW_REPO", Path(__file__).resolve().parents[1]))


def retry_transient(task, task_run, state) -> bool:
    """Retry a stage only when its failure may pass: killed by a signal, a lock held, a refused connection."""
    try:
        state.result()
    except dp.StageFailed as exc:
        return exc.transient
    except Exception:
        return False
    return False


@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def dvc_stage(workdir: str, stage: str, experiment: str | None = None) -> bool:
    """One DVC stage; True when it ran, False when DVC found it up to date. Runs of an experiment
    are named after it in MLflow, as under `dvc exp run`."""
    logger = get_run_logger()
    env = dp.tool_env({"DVC_EXP_NAME": experiment} if experiment else None, Path(workdir))
    ran = dp.run_stage(Path(workdir), stage, logger.info, env)
    logger.info("stage %s %s", stage, "ran" if ran else "was up to date")
    return ran


@task(name="experiment-workspace")
def prepare_workspace(repo: str, name: str, overrides: list[str]) -> str:
    logger = get_run_logger()
    return str(dp.experiment_workspace(Path(repo), name, overrides, logger.info))


@task(name="save-experiment")
def save_experiment(workdir: str, name: str) -> None:
    dp.save_experiment(Path(workdir), name, get_run_logger().info)


@task(name="dvc-status")
def stage_is_up_to_date(workdir: str, stage: str) -> bool:
    return dp.up_to_date(Path(workdir), stage)


@task(name="dvc-commit", task_run_name="commit {stage}")
def commit_stage(workdir: str, stage: str) -> None:
    dp.commit_stage(Path(workdir), stage, get_run_logger().info)


@task(name="metrics-report")
def publish_report(workdir: str, title: str) -> str:
    markdown = metrics_markdown(
        Path(workdir), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("SHAPEFLOW_MLFLOW_UI")
    )
    create_markdown_artifact(markdown, key="shapeflow-metrics", description=title)
    return markdown


def fan_out_stage(workdir: str, stage: str) -> bool:
    """A stale per-object stage through the preprocessing fan-out, then `dvc commit`; False when up to date."""
    if stage_is_up_to_date(workdir, stage):
        get_run_logger().info("stage %s was up to date", stage)
        return False
    src, dst = dp.stage_paths(Path(workdir), stage)
    preprocess(
        stage, str(Path(workdir) / src), str(Path(workdir) / dst), params_file=str(Path(workdir) / "params.yaml")
    )
    commit_stage(workdir, stage)
    return True


@flow(name="pipeline", log_prints=True)
def pipeline(
    targets: list[str] | None = None,
    overrides: list[str] | None = None,
    experiment: str | None = None,
    fan_out: bool = True,
) -> dict[str, bool]:
    """Run the DVC pipeline (all stages, or `targets` and what they depend on) stage by stage.

    overrides: params as KEY.PATH=VALUE; with any, the run is the DVC experiment `experiment`
    (default: a name derived from the overrides), built in its own workspace. fan_out: run the
    per-object stages (watertight, sample) as shards on the task runner of `compute` (preprocess.py)
    instead of as one process each.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    order = dp.stage_order(REPO, targets)
    name = (experiment or dp.experiment_name(overrides)) if overrides else None
    workdir = prepare_workspace(str(REPO), name, overrides) if name else str(REPO)
    logger.info("stages in order: %s; in %s%s", ", ".join(order), workdir, f" (experiment {name})" if name else "")
    ran = {}
    for stage in order:
        if fan_out and stage in PER_OBJECT:
            ran[stage] = fan_out_stage(workdir, stage)
        else:
            ran[stage] = dvc_stage(workdir, stage, name)
    if name:
        save_experiment(workdir, name)
    publish_report(
        workdir, f"shapeflow {name or 'workspace'}: {', '.join(s for s, r in ran.items() if r) or 'nothing'} ran"
    )
    return ran


@task(name="check-models")
def check_models(workdir: str) -> None:
    dp.check_models(Path(workdir))


@flow(name="evaluate-only", log_prints=True)
def evaluate_only(overrides: list[str] | None = None, experiment: str | None = None) -> dict[str, bool]:
    """The evaluate stage alone, on the trained models already there (in the workspace, or in the
    experiment that `overrides` name). Without up-to-date models it fails at once, saying so and how
    to get them, instead of training them first."""
    overrides = list(overrides or [])
    name = (experiment or dp.experiment_name(overrides)) if overrides else None
    workdir = prepare_workspace(str(REPO), name, overrides) if name else str(REPO)
    check_models(workdir)
    ran = {"evaluate": dvc_stage(workdir, "evaluate", name)}
    if name:
        save_experiment(workdir, name)
    outcome = "ran" if ran["evaluate"] else "was up to date"
    publish_report(workdir, f"shapeflow {name or 'workspace'}: evaluate {outcome}")
    return ran
