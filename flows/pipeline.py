"""Prefect flows over the DVC pipeline: what users trigger as deployments (see prefect.yaml).

- `pipeline`: every stage of dvc.yaml (or the chosen targets and what they need) as one Prefect task
  each, in DAG order, with `dvc repro --single-item`, so DVC skips what is up to date. Overrides
  (`["train_vae.steps=100", ...]`) run in an experiment workspace and end as a DVC experiment; the
  workspace's params.yaml is left alone. A stage killed or blocked by a lock is retried (`stage_retries`
  times); a stage that fails for a real reason (a bad param) fails its task with the stage's error. The
  last task publishes a markdown artifact: the metrics of the run with links to its MLflow runs.
- A run whose worker goes away mid-stage ends its stage and crashes; the automation of
  flows/automations.py schedules it again for the next worker, up to `crash_retries` times.
- `evaluate_only`: the evaluate stage alone, on the trained models already there; without up-to-date
  models it fails at once and says how to get them.

The flows hold no geometry or model code: they call shapeflow.dvc_pipeline, which calls DVC.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from shapeflow import dvc_pipeline as dp
from shapeflow import tracking
from shapeflow.report import metrics_markdown

try:  # run as a deployment, flows/ is the working directory's sub-folder; imported by tests as flows.pipeline
    from flows.preprocess import preprocess
except ImportError:  # pragma: no cover - started as `python flows/pipeline.py`
    from preprocess import preprocess

PER_OBJECT = ("watertight", "sample")
FAILURES_LOGGED = 50  # failed objects of a fan-out named one by one in the pipeline run's log

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
def dvc_stage(workdir: str, stage: str, experiment: str | None = None, pull: bool = False) -> bool:
    """One DVC stage; True when it ran, False when DVC found it up to date. Runs of an experiment
    are named after it in MLflow, as under `dvc exp run`, and tagged with this flow run's id and URL."""
    logger = get_run_logger()
    extra = {"DVC_EXP_NAME": experiment} if experiment else {}
    if flow_run.id:  # the stage's MLflow run names the flow run (tracking.pipeline_tags)
        extra |= tracking.prefect_env(str(flow_run.id), flow_run.ui_url)
    env = dp.tool_env(extra, Path(workdir))
    ran = dp.run_stage(Path(workdir), stage, logger.info, env, pull=pull)
    logger.info("stage %s %s", stage, "ran" if ran else "was up to date")
    return ran


@task(name="experiment-workspace")
def prepare_workspace(repo: str, name: str, overrides: list[str]) -> str:
    logger = get_run_logger()
    return str(dp.experiment_workspace(Path(repo), name, overrides, logger.info))


@task(name="save-experiment")
def save_experiment(workdir: str, name: str, stages: list[str] | None = None) -> None:
    dp.save_experiment(Path(workdir), name, get_run_logger().info, stages or ())


@task(name="dvc-pull", task_run_name="pull {stage}")
def pull_stage(workdir: str, stage: str) -> bool:
    got = dp.pull_stage(Path(workdir), stage, get_run_logger().info)
    get_run_logger().info("stage %s: %s", stage, "outputs pulled from the remote" if got else "not all in the remote")
    return got


@task(name="dvc-push")
def push_outputs(workdir: str) -> None:
    dp.push_outputs(Path(workdir), get_run_logger().info)


@task(name="reuse-outputs", task_run_name="reuse {stage}")
def reuse_outputs(workdir: str, stage: str) -> bool:
    """The outputs of an earlier run of the stage with the same inputs and params, from the shared
    DVC cache (any experiment or workspace); True when reused."""
    return dp.reuse_outputs(Path(workdir), stage, get_run_logger().info)


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


def fan_out_stage(workdir: str, stage: str, wait_for: list, pull: bool = False) -> tuple[bool, object]:
    """A stale per-object stage through the preprocessing fan-out, then `dvc commit`; (whether it
    ran, the state that later stages wait for). pull: first fetch its outputs from the DVC remote."""
    logger = get_run_logger()
    if pull:
        wait_for = [pull_stage(workdir, stage, return_state=True, wait_for=wait_for)]
    checked = stage_is_up_to_date(workdir, stage, return_state=True, wait_for=wait_for)
    if checked.result():
        logger.info("stage %s was up to date", stage)
        return False, checked
    reused = reuse_outputs(workdir, stage, return_state=True, wait_for=[checked])
    if reused.result():
        return False, reused
    src, dst = dp.stage_paths(Path(workdir), stage)
    done = preprocess(
        stage,
        str(Path(workdir) / src),
        str(Path(workdir) / dst),
        params_file=str(Path(workdir) / "params.yaml"),
        return_state=True,
        wait_for=[reused],
    )
    totals = done.result()  # the sub-flow's summary and failures, in this run's log too
    logger.info("stage %s: %d objects ok, %d failed", stage, totals["ok"], totals["failed"])
    failures = totals.get("failures") or []
    for line in failures[:FAILURES_LOGGED]:
        logger.warning("stage %s: object %s", stage, line)
    if len(failures) > FAILURES_LOGGED:
        logger.warning(
            "stage %s: %d more failed objects (the stage's manifest.csv lists them)",
            stage,
            len(failures) - FAILURES_LOGGED,
        )
    committed = commit_stage(workdir, stage, return_state=True, wait_for=[done])
    committed.result()
    return True, committed


def refuse_after_crashes(crash_retries: int) -> None:
    """Stop a run that has been scheduled again after crashing more than `crash_retries` times (each
    start counts in the run's run_count)."""
    if crash_retries < 0:
        raise ValueError(f"crash_retries: 0 or more, got {crash_retries}")
    crashes = max(0, int(flow_run.run_count or 1) - 1)
    if crashes > crash_retries:
        raise RuntimeError(
            f"this flow run already started {crashes + 1} times (crashed {crashes} times, crash_retries "
            f"{crash_retries}): not running it again; its earlier logs say why, and a new run starts afresh"
        )


def experiment_of(overrides: list[str] | None, experiment: str | None) -> str | None:
    """The DVC experiment a run with these parameters makes; None: the main workspace."""
    overrides = list(overrides or [])
    return (experiment or dp.experiment_name(overrides)) if overrides else None


def run_name() -> str:
    """A flow run's name: its flow and the experiment it makes (or 'workspace')."""
    params = flow_run.parameters
    name = experiment_of(params.get("overrides"), params.get("experiment"))
    return f"{flow_run.flow_name}: {name or 'workspace'}"


def tag_run(name: str | None) -> list[str]:
    """Tag this flow run with its experiment (`experiment:NAME`, or `experiment:workspace`), so the
    UI's filters find every run of one experiment; the tags also go on the run's tasks."""
    tag = f"experiment:{name or 'workspace'}"
    run_id = flow_run.id
    if run_id:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run_id).tags
            if tag not in current:
                client.update_flow_run(run_id, tags=[*current, tag])
    return [tag]


@flow(name="pipeline", flow_run_name=run_name, log_prints=True)
def pipeline(
    targets: list[str] | None = None,
    overrides: list[str] | None = None,
    experiment: str | None = None,
    fan_out: bool = True,
    stage_retries: int = 2,
    crash_retries: int = 2,
    push: bool = True,
) -> dict[str, bool]:
    """Run the DVC pipeline (all stages, or `targets` and what they depend on) stage by stage.

    overrides: params as KEY.PATH=VALUE; with any, the run is the DVC experiment `experiment`
    (default: a name derived from the overrides), built in its own workspace. fan_out: run the
    per-object stages (watertight, sample) as shards on the task runner of `compute` (preprocess.py)
    instead of as one process each. stage_retries: how often a stage killed by a signal or blocked by a
    lock is tried again within the run; crash_retries: how often the run itself is scheduled again after
    crashing (its worker gone). With a default DVC remote (`dvc remote default`), stage outputs it
    holds are pulled instead of rebuilt, and with `push` every output and the run cache are pushed
    to it at the end, so other machines pull what this run made.
    """
    logger = get_run_logger()
    refuse_after_crashes(crash_retries)
    run_one = dvc_stage.with_options(retries=stage_retries)
    overrides = list(overrides or [])
    order = dp.stage_order(REPO, targets)
    name = experiment_of(overrides, experiment)
    with tags(*tag_run(name)):
        workdir = prepare_workspace(str(REPO), name, overrides) if name else str(REPO)
        logger.info("stages in order: %s; in %s%s", ", ".join(order), workdir, f" (experiment {name})" if name else "")
        # Each stage waits for the stages whose outputs it reads (dvc.yaml's DAG), so the run graph
        # draws fetch -> watertight -> sample -> train_vae -> train_dit -> evaluate.
        graph = dp.upstream(dp.read_stages(REPO))
        remote = dp.default_remote(Path(workdir))
        logger.info("DVC remote: %s", remote or "none (outputs stay on this machine)")
        ran, states = {}, {}
        for stage in order:
            wait_for = [states[up] for up in sorted(graph[stage]) if up in states]
            if fan_out and stage in PER_OBJECT:
                ran[stage], states[stage] = fan_out_stage(workdir, stage, wait_for, pull=bool(remote))
            else:
                states[stage] = run_one(workdir, stage, name, bool(remote), return_state=True, wait_for=wait_for)
                ran[stage] = states[stage].result()
        last = list(states.values())[-1:]
        if name:
            last = [save_experiment(workdir, name, order if targets else None, return_state=True, wait_for=last)]
            last[0].result()
        if remote and push:
            last = [push_outputs(workdir, return_state=True, wait_for=last)]
            last[0].result()
        summary = ", ".join(s for s, r in ran.items() if r) or "nothing"
        publish_report(workdir, f"shapeflow {name or 'workspace'}: {summary} ran", wait_for=last)
    return ran


@task(name="check-models")
def check_models(workdir: str) -> None:
    dp.check_models(Path(workdir))


@flow(name="evaluate-only", flow_run_name=run_name, log_prints=True)
def evaluate_only(
    overrides: list[str] | None = None, experiment: str | None = None, stage_retries: int = 2, crash_retries: int = 2
) -> dict[str, bool]:
    """The evaluate stage alone, on the trained models already there (in the workspace, or in the
    experiment that `overrides` name). Without up-to-date models it fails at once, saying so and how
    to get them, instead of training them first. Retries as in `pipeline`."""
    refuse_after_crashes(crash_retries)
    overrides = list(overrides or [])
    name = experiment_of(overrides, experiment)
    with tags(*tag_run(name)):
        workdir = prepare_workspace(str(REPO), name, overrides) if name else str(REPO)
        checked = check_models(workdir, return_state=True)
        checked.result()
        evaluated = dvc_stage.with_options(retries=stage_retries)(
            workdir, "evaluate", name, return_state=True, wait_for=[checked]
        )
        ran = {"evaluate": evaluated.result()}
        last = [evaluated]
        if name:
            last = [save_experiment(workdir, name, return_state=True, wait_for=last)]
            last[0].result()
        outcome = "ran" if ran["evaluate"] else "was up to date"
        publish_report(workdir, f"shapeflow {name or 'workspace'}: evaluate {outcome}", wait_for=last)
    return ran
