"""Kill stages at random moments and check that a rerun ends exactly where an uninterrupted run does.

For each stage (watertight, sample, train_vae) on a small built-in set, one uninterrupted run makes
the reference. Each trial then starts the stage in its own process group, waits a random time within
the reference's duration, and kills either the whole group or the main process alone (its pool
workers and the launcher's children must end by themselves), then reruns the stage to the end and
checks:

- outputs byte-identical to the reference (objects, manifest; for train_vae the weights);
- no process of the killed run left running;
- no temporary file left in the output folder.

    python bench/fault_kill.py                         # 10 trials each for watertight and sample, 3 for train_vae
    python bench/fault_kill.py --trials 2 --train-trials 1 --out /tmp/fault.json

Prints a table and JSON, and writes bench/results/fault_kill.json. Exit status 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from _table import print_table

HERE = Path(__file__).resolve().parent
PARAMS = {
    "seed": 0,
    "fetch": {"builtin": {"per_category": 2, "defect_share": 0.3}},
    "watertight": {"resolution": 96},
    "sample": {"surface": 2048, "sharp": 512, "volume": 2048, "near": 2048, "sharp_near": 1024},
    "compute": {"workers": 2},
    "train_vae": {
        "preset": "tiny",
        "model": {"num_latents": 16, "width": 64},
        "data": {"input_points": 256, "sharp_points": 64, "volume_points": 128, "near_points": 128},
        "steps": 24,
        "batch_size": 2,
        "checkpoint_every": 3,
        "val_every": 0,
        "val_objects": 1,
        "val_resolution": 32,
        "log_every": 3,
    },
}


def stage_command(stage: str, work: Path) -> list[str]:
    cli = [sys.executable, "-m", "shapeflow.cli", "--params", str(work / "params.yaml")]
    if stage == "watertight":
        return [*cli, "watertight", "raw", "watertight"]
    if stage == "sample":
        return [*cli, "sample", "watertight", "samples"]
    return [
        *cli,
        "train-vae",
        "samples",
        "vae",
        "--meshes",
        "watertight",
        "--checkpoints",
        "ck",
        "--metrics",
        "reports/metrics.json",
        "--plots",
        "reports",
        "--val-split",
        "train",
    ]


OUTPUT = {"watertight": "watertight", "sample": "samples", "train_vae": "vae"}


def digest(folder: Path, stage: str) -> dict[str, str]:
    """sha256 of what a run must reproduce: object files and manifest; the weights for train_vae."""
    if stage == "train_vae":
        files = [folder / "model.safetensors"]
    else:
        files = sorted((folder / "objects").iterdir()) + [folder / "manifest.csv"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def run(cmd: list[str], work: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def trial(stage: str, base: Path, reference: dict[str, str], duration: float, rng: random.Random, env) -> dict:
    """Copy the inputs, start the stage, kill it at a random moment, rerun it, check."""
    work = Path(tempfile.mkdtemp(dir=base))
    for name in ("params.yaml", "raw", "watertight", "samples"):
        source = base / "ref" / name
        if name == "params.yaml":
            shutil.copy(source, work / name)
        elif name != OUTPUT[stage] and source.exists() and not (stage == "watertight" and name == "samples"):
            shutil.copytree(source, work / name)
    cmd = stage_command(stage, work)
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait = rng.uniform(0.05, 0.9) * duration
    how = rng.choice(["group", "main"])
    time.sleep(wait)
    family = []
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    if how == "group":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=20)
    left_running = [" ".join(p.cmdline()[:4]) for p in alive if p.is_running()]
    for p in alive:
        p.kill()
    run(cmd, work, env)
    out = work / OUTPUT[stage]
    got = digest(out, stage)
    row = {
        "stage": stage,
        "killed_after_s": round(wait, 2),
        "killed": how,
        "identical": got == reference,
        "differing": sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))[:5],
        "processes_left": left_running,
        "temporaries_left": leftovers(out),
    }
    row["ok"] = row["identical"] and not row["processes_left"] and not row["temporaries_left"]
    shutil.rmtree(work, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials each for watertight and sample")
    parser.add_argument("--train-trials", type=int, default=3, help="trials for train_vae")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fault_kill.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    env = dict(os.environ, OMP_NUM_THREADS="1", SHAPEFLOW_THREADS="1")
    base = Path(tempfile.mkdtemp(prefix="fault_kill_"))
    ref = base / "ref"
    ref.mkdir()
    (ref / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    cli = [sys.executable, "-m", "shapeflow.cli", "--params", str(ref / "params.yaml")]
    subprocess.run([*cli, "fetch", "raw"], cwd=ref, env=env, check=True, capture_output=True)
    rows = []
    for stage, trials in (("watertight", args.trials), ("sample", args.trials), ("train_vae", args.train_trials)):
        duration = run(stage_command(stage, ref), ref, env)
        reference = digest(ref / OUTPUT[stage], stage)
        if stage == "train_vae":
            shutil.rmtree(ref / "ck", ignore_errors=True)
        for _ in range(trials):
            rows.append(trial(stage, base, reference, duration, rng, env))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(base, ignore_errors=True)
    summary = {
        stage: {
            "trials": sum(r["stage"] == stage for r in rows),
            "ok": sum(r["ok"] for r in rows if r["stage"] == stage),
        }
        for stage in OUTPUT
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    print_table(
        ["stage", "trials", "identical", "processes left", "temporaries left"],
        [
            [
                stage,
                s["trials"],
                sum(r["identical"] for r in rows if r["stage"] == stage),
                sum(bool(r["processes_left"]) for r in rows if r["stage"] == stage),
                sum(bool(r["temporaries_left"]) for r in rows if r["stage"] == stage),
            ]
            for stage, s in summary.items()
        ],
    )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
