"""Shared fixtures: a small sample-stage output made from the built-in shapes, once per session."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shapeflow import config
from shapeflow.stages import fetch, sample, watertight

SAMPLE_COUNTS = {"surface": 4096, "sharp": 1024, "volume": 4096, "near": 2048, "sharp_near": 1024}
# The smallest VAE the training tests and the end-to-end pipeline train (train_vae params).
TINY_VAE = {
    "family": "vecset",
    "model": {"num_latents": 16, "width": 64},
    "data": {
        "input_points": 256,
        "sharp_points": 64,
        "volume_points": 128,
        "near_points": 128,
        "sharp_near_points": 64,
    },
}


# The grids the grid-family tests sample (sample.grid params): 32^3 and a near-surface level at 64^3.
SMALL_GRIDS = {"resolution": 32, "sparse_resolution": 64}


def make_samples(root: Path, per_category: int = 1, resolution: int = 96, family: str = "vecset") -> Path:
    """fetch -> watertight -> sample of the built-in set (no defects) under `root`, every object in the
    train split (the tests choose their own val objects); returns the samples folder. family grid:
    the samples carry SMALL_GRIDS grids too."""
    params = config.Params(
        fetch=config.FetchParams(
            builtin=config.BuiltinParams(per_category=per_category, defect_share=0.0),
            split=config.SplitParams(val=0.0, test=0.0),
        ),
        watertight=config.WatertightParams(resolution=resolution),
        sample=config.SampleParams(**SAMPLE_COUNTS, grid=config.GridSampleParams(**SMALL_GRIDS)),
        train_vae=config.TrainVAEParams(family=family),
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


def kill_at_first_checkpoint(cmd: list[str], cwd: Path, env: dict[str, str], checkpoints: Path) -> int:
    """Start a training, kill -9 its process group as soon as a complete checkpoint is on disk,
    and return the newest checkpoint's step."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    try:
        while not list(checkpoints.glob("step_*/trainer.json")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return max(int(p.parent.name.split("_")[1]) for p in checkpoints.glob("step_*/trainer.json"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny tensors it is the fastest, and on a busy 2-core
    machine a second thread that waits for a core makes every op spin (measured: ~40x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def builtin_samples(tmp_path_factory) -> Path:
    """One object per built-in category, sampled with small counts."""
    return make_samples(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="session")
def grid_samples(tmp_path_factory) -> Path:
    """One object per built-in category, sampled with small counts and SMALL_GRIDS grids (grid family)."""
    return make_samples(tmp_path_factory.mktemp("builtin_grid"), family="grid")
