"""A markdown summary of a pipeline run: the headline metrics of each stage and links to its MLflow runs.

Read from what the stages wrote (reports/*/metrics.json, eval/metrics.json) and the run ids they
recorded beside their outputs; the Prefect pipeline flow publishes it as an artifact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# (stage, metrics file, where its MLflow run id is recorded, keys shown)
SOURCES = (
    (
        "train_vae",
        "reports/train_vae/metrics.json",
        ("models/vae/config.json", ("meta", "mlflow_run_id")),
        ("steps", "val_cd", "val_f@0.01", "val_f@0.02"),
    ),
    (
        "train_dit",
        "reports/train_dit/metrics.json",
        ("models/dit/generator.json", ("mlflow_run_id",)),
        ("steps", "val_loss_ema", "gen_watertight_share", "gen_category_match"),
    ),
    (
        "evaluate",
        "eval/metrics.json",
        ("eval/run.json", ("mlflow_run_id",)),
        (
            "recon.cd",
            "recon.f@0.01",
            "recon.f@0.02",
            "recon.nc",
            "recon.iou_volume",
            "recon.floor.cd",
            "recon.floor.f@0.02",
            "generation.mmd_cd",
            "generation.cov_cd",
            "generation.1nna_cd",
            "generation.category_match",
            "generation.floor.mmd_cd",
        ),
    ),
)


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def lookup(body: dict[str, Any], dotted: str | tuple[str, ...]) -> Any:
    """body['a']['b'] for 'a.b' (keys may hold dots themselves, e.g. 'f@0.02': the longest match wins)."""
    parts = dotted if isinstance(dotted, tuple) else tuple(dotted.split("."))
    node: Any = body
    i = 0
    while i < len(parts):
        if not isinstance(node, dict):
            return None
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            return None
    return node


def stage_run_ids(workdir: Path) -> dict[str, str]:
    """The MLflow run id each model and evaluation in `workdir` records beside its outputs, by stage."""
    found = {}
    for stage, _, (run_file, run_key), _ in SOURCES:
        run_id = lookup(_load(Path(workdir) / run_file), run_key)
        if isinstance(run_id, str) and run_id:
            found[stage] = run_id
    return found


def run_link(run_id: str | None, tracking_uri: str | None, ui_url: str | None) -> str:
    """`[abcd1234](UI/#/experiments/E/runs/R)` when the UI's address is known and the run is found."""
    if not run_id:
        return "–"
    if not ui_url or not tracking_uri:
        return f"`{run_id}`"
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a report must not fail on a tracking server that is away
        return f"`{run_id}`"
    return f"[{run_id[:8]}]({ui_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def metrics_markdown(workdir: Path, tracking_uri: str | None = None, ui_url: str | None = None) -> str:
    """One table per stage that has written its metrics, with the link to its MLflow run."""
    lines = [f"# shapeflow run in `{workdir}`", ""]
    found = False
    run_ids = stage_run_ids(workdir)
    for stage, metrics_file, _, keys in SOURCES:
        metrics = _load(Path(workdir) / metrics_file)
        if not metrics:
            continue
        found = True
        run_id = run_ids.get(stage)
        lines += [
            f"## {stage} (MLflow run {run_link(run_id, tracking_uri, ui_url)})",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {key} | {_fmt(lookup(metrics, key))} |" for key in keys if lookup(metrics, key) is not None]
        lines.append("")
    if not found:
        lines.append("No stage has written metrics yet.")
    return "\n".join(lines)
