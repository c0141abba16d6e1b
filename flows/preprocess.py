"""Preprocessing fan-out: the per-object work of watertight and sample as Prefect tasks over shards.

Each shard is one task calling the stage's own `run(..., rank=i, world_size=n)` (shapeflow.runner
splits the objects by key; the last shard to finish writes the manifest), so a shard that fails or is
lost costs only its objects and a rerun redoes only what has no record. The task runner comes from
params: a local process pool (`compute.workers` processes) by default, or the Dask cluster at
`compute.dask_address` through prefect-dask's DaskTaskRunner.

The pipeline flow uses this for those two stages and then records the result in dvc.lock with
`dvc commit`, so DVC still decides what is stale.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.task_runners import ProcessPoolTaskRunner

from shapeflow import config

STAGES = ("watertight", "sample")


@task(name="preprocess-shard", task_run_name="{stage} shard {rank}/{world_size}")
def preprocess_shard(stage: str, params_file: str, src: str, dst: str, rank: int, world_size: int) -> dict:
    """One shard of a per-object stage, on one core; {"ok": n, "failed": m, "failures": [line, ...]}."""
    from shapeflow.stages import sample, watertight

    params = config.load_params(params_file)
    run = {"watertight": watertight.run, "sample": sample.run}[stage]
    records = run(params, src, dst, workers=1, rank=rank, world_size=world_size)
    failures = [f"{r.get('key', '?')[:12]}: {r.get('reason', '')}" for r in records if r.get("status") != "ok"]
    return {"ok": len(records) - len(failures), "failed": len(failures), "failures": failures}


def task_runner(compute: config.ComputeParams):
    """DaskTaskRunner on `compute.dask_address` when set, else a local pool of `compute.workers` processes."""
    if compute.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=compute.dask_address)
    return ProcessPoolTaskRunner(max_workers=compute.workers or os.cpu_count() or 1)


def shard_count(compute: config.ComputeParams) -> int:
    return compute.shards or compute.workers or os.cpu_count() or 1


@flow(name="preprocess-shards")
def _fan_out(stage: str, params_file: str, src: str, dst: str, shards: int) -> dict:
    futures = [preprocess_shard.submit(stage, params_file, src, dst, rank, shards) for rank in range(shards)]
    totals: dict = {"ok": 0, "failed": 0, "failures": []}
    for future in futures:
        for key, value in future.result().items():
            totals[key] += value
    get_run_logger().info("%s: %d ok, %d failed over %d shards", stage, totals["ok"], totals["failed"], shards)
    return totals


@flow(name="preprocess")
def preprocess(stage: str, src: str, dst: str, params_file: str = "params.yaml") -> dict:
    """Run `stage` (watertight or sample) from `src` into `dst` as shards on the configured task runner;
    the totals and one line per failed object (key and reason), for the calling flow's log."""
    if stage not in STAGES:
        raise ValueError(f"preprocess: stage {stage!r} is not a per-object stage; one of {list(STAGES)}")
    params = config.load_params(params_file)
    shards = shard_count(params.compute)
    runner = task_runner(params.compute)
    get_run_logger().info("%s: %d shards on %s", stage, shards, type(runner).__name__)
    return _fan_out.with_options(task_runner=runner)(
        stage, str(Path(params_file).resolve()), str(src), str(dst), shards
    )
