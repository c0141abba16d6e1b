"""Shared fixtures: a small sample-stage output made from the built-in shapes, once per session."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from shapeflow import config
from shapeflow.stages import fetch, sample, watertight

SAMPLE_COUNTS = {"surface": 4096, "sharp": 1024, "volume": 4096, "near": 2048, "sharp_near": 1024}


def make_samples(root: Path, per_category: int = 1, resolution: int = 96) -> Path:
    """fetch -> watertight -> sample of the built-in set (no defects) under `root`; returns the samples folder."""
    params = config.Params(
        fetch=config.FetchParams(builtin=config.BuiltinParams(per_category=per_category, defect_share=0.0)),
        watertight=config.WatertightParams(resolution=resolution),
        sample=config.SampleParams(**SAMPLE_COUNTS),
    )
    fetch.run(params, root / "raw", workers=1)
    watertight.run(params, root / "raw", root / "watertight", workers=1)
    sample.run(params, root / "watertight", root / "samples", workers=1)
    return root / "samples"


def subset(samples: Path, dst: Path, keep) -> Path:
    """A copy of a sample-stage output holding only the manifest rows for which keep(row) is true."""
    with open(samples / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        columns, rows = reader.fieldnames, [r for r in reader if keep(r)]
    (dst / "objects").mkdir(parents=True)
    for row in rows:
        shutil.copy(samples / row["path"], dst / row["path"])
    with open(dst / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    return dst


@pytest.fixture(scope="session")
def builtin_samples(tmp_path_factory) -> Path:
    """One object per built-in category, sampled with small counts."""
    return make_samples(tmp_path_factory.mktemp("builtin"))
