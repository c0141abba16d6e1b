"""`shapeflow compare`: finished runs side by side in one table (e.g. the two VAE families on one dataset).

A run is a pipeline workspace: the repository itself (`dvc repro`) or an experiment's folder under
.shapeflow/experiments (`make pipeline MESHES=...`, `dvc exp run` applied). It is read for what its
stages wrote; nothing is recomputed:

- models/vae: the family and preset (config.json), the parameter count and latent size;
- models/dit: its parameter count (the EMA weights generation uses);
- reports/train_vae, reports/train_dit: steps (metrics.json) and the median training throughput
  (loss.csv's samples_per_s);
- eval/metrics.json: the reconstruction and generation figures of the evaluate stage;
- eval/run.json: its MLflow run id and wall times (seconds a reconstruction: encode, decode, mesh).

`--recon LABEL=REPORT` adds a `shapeflow evaluate-recon` report.json (e.g. the YCB scans) to run LABEL.
A file a run lacks leaves its cells empty ("–") and is listed under the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import struct
import sys
from pathlib import Path
from typing import Any

from shapeflow import manifest as mf
from shapeflow.report import lookup, stage_run_ids

SAFETENSORS_HEADER_MAX = 100 * 2**20  # bytes; a larger header is not a weights file of ours

RECON_ROWS = (
    ("CD", "cd"),
    ("F@0.01", "f@0.01"),
    ("F@0.02", "f@0.02"),
    ("NC", "nc"),
    ("volume IoU", "iou_volume"),
    ("watertight share", "watertight_share"),
)
GENERATION_ROWS = (
    ("watertight share", "watertight_share"),
    ("category match (common categories)", "category_match_common"),
    ("MMD-CD", "mmd_cd"),
    ("COV-CD", "cov_cd"),
    ("1-NNA-CD", "1nna_cd"),
)


def safetensors_parameters(path: Path) -> int:
    """The number of values in a safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", raw)
        if size > SAFETENSORS_HEADER_MAX:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        header = json.loads(fh.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def median_throughput(loss_csv: Path) -> float | None:
    """The median samples/s of a training's loss log (None when it has no such column)."""
    with open(loss_csv, newline="") as fh:
        values = [float(row["samples_per_s"]) for row in csv.DictReader(fh) if row.get("samples_per_s")]
    return statistics.median(values) if values else None


def _json(path: Path) -> dict[str, Any]:
    body = json.loads(path.read_text())
    if not isinstance(body, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return body


class Run:
    """What one workspace's stages wrote, read once; `missing` lists the files it lacks."""

    def __init__(self, label: str, folder: Path):
        self.label, self.folder = label, Path(folder)
        self.missing: list[str] = []
        self.vae_config = self._read(_json, "models/vae/config.json")
        self.vae_parameters = self._read(safetensors_parameters, "models/vae/model.safetensors")
        self.dit_parameters = self._read(safetensors_parameters, "models/dit/ema/model.safetensors")
        self.vae_metrics = self._read(_json, "reports/train_vae/metrics.json")
        self.dit_metrics = self._read(_json, "reports/train_dit/metrics.json")
        self.vae_throughput = self._read(median_throughput, "reports/train_vae/loss.csv")
        self.dit_throughput = self._read(median_throughput, "reports/train_dit/loss.csv")
        self.eval_metrics = self._read(_json, "eval/metrics.json") or {}
        self.eval_run = self._read(_json, "eval/run.json") or {}
        self.generator = self._read(_json, "models/dit/generator.json") or {}
        self.run_ids = stage_run_ids(self.folder)
        self.recon_reports: list[dict[str, Any]] = []

    def _read(self, reader: Any, relative: str) -> Any:
        path = self.folder / relative
        if not path.is_file():
            self.missing.append(relative)
            return None
        try:
            return reader(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"run {self.label!r}: {path}: unreadable ({type(exc).__name__}: {exc})") from exc

    def family(self) -> str | None:
        if self.vae_config is None:
            return None
        fmt = str(self.vae_config.get("format", ""))
        return "grid" if fmt.startswith("shapeflow.grid_vae") else "vecset" if fmt else None

    def latent_size(self) -> str | None:
        if self.vae_config is None:
            return None
        from shapeflow.models.families import config_from

        cfg = config_from(self.vae_config)
        side = getattr(cfg, "latent_side", 0)
        tokens = f"{side}³" if side else str(cfg.num_latents)
        return f"{tokens} × {cfg.latent_dim} = {cfg.num_latents * cfg.latent_dim:,}"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def rows(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """(row label, one value per run) in table order."""
    out: list[tuple[str, list[Any]]] = [
        ("VAE family", [r.family() for r in runs]),
        ("VAE preset", [lookup(r.vae_config or {}, "meta.preset") for r in runs]),
        ("VAE parameters", [r.vae_parameters for r in runs]),
        ("latent size (tokens × channels)", [r.latent_size() for r in runs]),
        ("DiT parameters", [r.dit_parameters for r in runs]),
        ("train_vae steps", [lookup(r.vae_metrics or {}, "steps") for r in runs]),
        ("train_vae samples/s (median)", [r.vae_throughput for r in runs]),
        ("train_dit samples/s (median)", [r.dit_throughput for r in runs]),
        ("train_dit steps", [lookup(r.dit_metrics or {}, "steps") for r in runs]),
        ("train_dit time shift (flow.t_shift)", [lookup(r.generator, "t_shift") for r in runs]),
    ]
    split = next((r.eval_metrics.get("split") for r in runs if r.eval_metrics.get("split")), "test")
    out.append((f"recon, {split} split: objects", [lookup(r.eval_metrics, "recon.objects") for r in runs]))
    out += [
        (f"recon, {split} split: {name}", [lookup(r.eval_metrics, f"recon.{key}") for r in runs])
        for name, key in RECON_ROWS
    ]
    out.append((f"recon, {split} split: seconds a shape", [lookup(r.eval_run, "timings.recon_decode_s") for r in runs]))
    sets = sorted({Path(str(rep.get("mesh_dir", "?"))).name for r in runs for rep in r.recon_reports})
    for name in sets:
        reports = [
            next((rep for rep in r.recon_reports if Path(str(rep.get("mesh_dir"))).name == name), {}) for r in runs
        ]
        out.append((f"recon, {name}: objects", [lookup(rep, "mean.objects") for rep in reports]))
        out += [
            (f"recon, {name}: {label}", [lookup(rep, f"mean.{key}") for rep in reports]) for label, key in RECON_ROWS
        ]
        out.append((f"recon, {name}: seconds a shape", [rep.get("decode_s") for rep in reports]))
    out.append(("generation: samples", [lookup(r.eval_metrics, "generation.samples") for r in runs]))
    out += [
        (f"generation: {name}", [lookup(r.eval_metrics, f"generation.{key}") for r in runs])
        for name, key in GENERATION_ROWS
    ]
    samples = [lookup(r.eval_run, "timings.samples") for r in runs]
    seconds = [lookup(r.eval_run, "timings.generation_s") for r in runs]
    out.append(
        (
            "generation: seconds a sample (scoring included)",
            [s / n if s and n else None for s, n in zip(seconds, samples, strict=True)],
        )
    )
    for stage in ("train_vae", "train_dit", "evaluate"):
        out.append((f"MLflow run, {stage}", [r.run_ids.get(stage, "")[:8] or None for r in runs]))
    return out


def markdown(runs: list[Run]) -> str:
    lines = [
        "| | " + " | ".join(_fmt(r.label) for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    lines += [f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |" for label, values in rows(runs)]
    for r in runs:
        if r.missing:
            lines.append(f"\n{_fmt(r.label)} ({r.folder}) lacks: {', '.join(r.missing)}")
    return "\n".join(lines) + "\n"


def as_json(runs: list[Run]) -> dict[str, Any]:
    table = rows(runs)
    return {
        "runs": [
            {
                "label": r.label,
                "folder": str(r.folder),
                "missing": r.missing,
                **{label: values[i] for label, values in table},
            }
            for i, r in enumerate(runs)
        ]
    }


def _labelled(item: str, what: str) -> tuple[str, Path]:
    label, sep, path = item.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"{what} {item!r}: expected LABEL=PATH")
    return label, Path(path)


def compare(specs: list[str], recon: list[str]) -> list[Run]:
    """The runs named by `specs` (LABEL=FOLDER), with the evaluate-recon reports of `recon` (LABEL=REPORT)."""
    runs: list[Run] = []
    for item in specs:
        label, folder = _labelled(item, "run")
        if not folder.is_dir():
            raise NotADirectoryError(f"run {label!r}: {folder} is not a folder (a workspace of the pipeline)")
        if any(r.label == label for r in runs):
            raise ValueError(f"run label {label!r} given twice")
        runs.append(Run(label, folder))
    for item in recon:
        label, path = _labelled(item, "--recon")
        run = next((r for r in runs if r.label == label), None)
        if run is None:
            raise ValueError(f"--recon {item!r}: no run labelled {label!r} (runs: {', '.join(r.label for r in runs)})")
        if not path.is_file():
            raise FileNotFoundError(f"--recon {item!r}: {path} is not a file (an evaluate-recon report.json)")
        try:
            run.recon_reports.append(_json(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--recon {item!r}: {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    return runs


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="finished runs side by side: model sizes, throughput, reconstruction and generation figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs", nargs="+", metavar="LABEL=FOLDER", help="a workspace of the pipeline and its column label"
    )
    parser.add_argument(
        "--recon",
        action="append",
        default=[],
        metavar="LABEL=REPORT",
        help="an evaluate-recon report.json to add to run LABEL (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        runs = compare(args.runs, args.recon)
    except ValueError as exc:
        print(f"shapeflow compare: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(runs), end="")
    if args.json is not None:
        mf.atomic_write_text(args.json, json.dumps(mf.finite_or_none(as_json(runs)), indent=2) + "\n")
    return 0
