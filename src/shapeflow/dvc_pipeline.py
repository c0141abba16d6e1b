"""The DVC pipeline seen from an orchestrator: stage order, running one stage, experiment workspaces.

Prefect flows (flows/) call these; nothing here imports Prefect. DVC stays the owner of the DAG and
of what is stale: a stage is run with `dvc repro --single-item`, which does nothing when its deps,
params and outs match dvc.lock.

Parameter overrides run in an experiment workspace: a git worktree of HEAD under
`.shapeflow/experiments/<name>` that shares the repository's DVC cache, with the overrides written
to its params.yaml (the main workspace's params.yaml is never touched). Stages run there one by
one, and `dvc exp save` records the result as a DVC experiment of that name, which `dvc exp show`
in the main workspace lists. A rerun with the same name reuses the worktree, so finished stages are
skipped and training resumes from its checkpoints there.

`python -m shapeflow.dvc_pipeline DIR` (what `make pipeline MESHES=DIR` runs) is the whole pipeline
on a folder of meshes that way, without Prefect: the experiment is named after the folder.
"""

from __future__ import annotations

import argparse
import graphlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shapeflow import reuse

EXPERIMENTS_DIR = Path(".shapeflow") / "experiments"
TAIL_LINES = 40
# Exit statuses of a process killed by a signal: SIGKILL (OOM killer, `kill -9`) and SIGTERM.
KILLED = {-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGKILL, 128 + signal.SIGTERM}
TRANSIENT_OUTPUT = re.compile(
    r"Unable to acquire lock|database is locked|Connection (refused|reset)|Killed", re.IGNORECASE
)


class StageFailed(RuntimeError):
    """A stage's command failed; `transient` when a retry may succeed (killed, a lock held)."""

    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        self.transient = returncode in KILLED or bool(TRANSIENT_OUTPUT.search(tail))
        kind = "killed or interrupted" if returncode in KILLED else f"exit status {returncode}"
        # The stage's own error line first (shapeflow prints `shapeflow <command>: error: ...`).
        errors = [
            line
            for line in tail.splitlines()
            if "error:" in line.lower() and not line.startswith("ERROR: failed to reproduce")
        ]
        headline = f": {errors[0].strip()}" if errors else ""
        super().__init__(f"stage {stage!r} failed ({kind}){headline}\nlast lines of its output:\n{tail}")


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    git_kept: tuple[str, ...] = ()  # outputs with `cache: false`: git keeps them, not the DVC cache
    persist: bool = False  # every output is `persist: true` (the per-object stages): DVC's run cache skips it


def read_stages(repo: Path) -> dict[str, Stage]:
    """The stages of `repo`/dvc.yaml in file order, with their deps and outs (metrics and plots too)."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml; is {repo} a shapeflow checkout?")
    raw = yaml.safe_load(path.read_text()) or {}
    stages = {}
    for name, body in (raw.get("stages") or {}).items():
        outs, kept, persist = [], [], []
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
                options = options if isinstance(options, dict) else {}
                outs.append(str(path))
                persist.append(bool(options.get("persist")))
                if options.get("cache") is False:
                    kept.append(str(path))
        deps = tuple(str(d) for d in body.get("deps") or [])
        stages[name] = Stage(name, deps, tuple(outs), tuple(kept), bool(persist) and all(persist))
    return stages


def _under(path: str, folder: str) -> bool:
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def upstream(stages: Mapping[str, Stage]) -> dict[str, set[str]]:
    """For each stage, the stages whose outputs it depends on."""
    return {
        s.name: {
            o.name
            for o in stages.values()
            if o.name != s.name and any(_under(d, out) for d in s.deps for out in o.outs)
        }
        for s in stages.values()
    }


def stage_order(repo: Path, targets: Sequence[str] | None = None) -> list[str]:
    """The stages `dvc repro TARGETS` would consider, dependencies first; ties in dvc.yaml order."""
    stages = read_stages(repo)
    unknown = sorted(set(targets or []) - set(stages))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {list(stages)}")
    graph = upstream(stages)
    wanted = set(stages) if not targets else set()
    queue = deque(targets or [])
    while queue:
        name = queue.popleft()
        if name not in wanted:
            wanted.add(name)
            queue.extend(graph[name])
    position = {name: i for i, name in enumerate(stages)}
    sorter = graphlib.TopologicalSorter({name: graph[name] & wanted for name in wanted})
    sorter.prepare()
    order = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.__getitem__)
        order.extend(ready)
        sorter.done(*ready)
    return order


def dvc_command() -> list[str]:
    """DVC from this interpreter's environment, so flows run the DVC the project pinned."""
    return [sys.executable, "-m", "dvc"]


def tool_env(extra: Mapping[str, str] | None = None, workdir: Path | None = None) -> dict[str, str]:
    """The environment for DVC and the stages: this interpreter's bin folder first on PATH (the
    stages call `shapeflow` and `accelerate`). With a `workdir` holding its own checkout of the
    package (an experiment worktree), its src/ comes first on PYTHONPATH: the stages run the code
    that the workspace's dvc.lock hashes, not the installed package, which follows the main checkout
    as it moves on."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if workdir is not None and (Path(workdir) / "src" / "shapeflow").is_dir():
        src = str((Path(workdir) / "src").resolve())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


STAGE_GROUPS_ENV = "SHAPEFLOW_STAGE_GROUPS"  # a folder: one file per running stage's process group
STOP_GRACE_S = 10.0  # SIGTERM, then this long before SIGKILL


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie (a zombie has ended; it only
    waits for its parent to read its status)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member counts
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(pgid: int, grace_s: float = STOP_GRACE_S, leader: subprocess.Popen | None = None) -> None:
    """End process group `pgid`: SIGTERM, then SIGKILL for what is left after `grace_s`. `leader`,
    this process's child that leads the group, is reaped on the way."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ParentWatch:
    """Under a Prefect worker (in a flow run's process, whose parent is the worker): when the worker
    is gone, end the stage's process group `pgid`, then send this process SIGTERM, which Prefect
    turns into a crashed flow run. A flow run's process is in a session of its own, out of reach of
    a signal to the worker's group: without this, a killed worker would leave its stage running on,
    unsupervised, beside the run that retries it. `listed`, the group's entry in the stage registry,
    is removed as soon as the group has ended, before the SIGTERM."""

    def __init__(self, pgid: int, poll_s: float = 1.0, listed: Path | None = None):
        self.pgid, self.parent, self.poll_s, self.listed = pgid, os.getppid(), poll_s, listed
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="shapeflow-parent-watch", daemon=True)

    def watch(self) -> None:
        while not self.done.wait(self.poll_s):
            if os.getppid() != self.parent:
                print(
                    f"shapeflow: the worker (pid {self.parent}) that started this flow run is gone; stopping the stage",
                    file=sys.stderr,
                    flush=True,
                )
                stop_group(self.pgid)
                if self.listed is not None:
                    self.listed.unlink(missing_ok=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def __enter__(self) -> ParentWatch:
        if os.environ.get("PREFECT__FLOW_RUN_ID"):
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()


def run_logged(
    cmd: Sequence[str], cwd: Path, log: Callable[[str], None], env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run `cmd`, passing each output line to `log` as it comes; (exit status, the last lines).

    The command and everything it starts (DVC, the stage, accelerate and its trainers) run in a
    process group of their own, which is ended (SIGTERM, then SIGKILL) whenever this call ends
    early: an exception, Prefect's SIGTERM on cancel or crash, the worker gone (`ParentWatch`). With
    SHAPEFLOW_STAGE_GROUPS set (scripts/services.sh sets it for the worker), the group is listed
    there while it runs, so stopping the services ends it even when this process was killed outright.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env or tool_env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    assert proc.stdout is not None
    registry = os.environ.get(STAGE_GROUPS_ENV)
    listed = Path(registry) / f"{proc.pid}.pgid" if registry else None
    if listed is not None:
        listed.parent.mkdir(parents=True, exist_ok=True)
        listed.write_text(f"{' '.join(cmd)}\n(in {cwd}, started by pid {os.getpid()})\n")
    try:
        with ParentWatch(proc.pid, listed=listed):
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)
            proc.wait()
    finally:
        if proc.poll() is None:
            stop_group(proc.pid, leader=proc)
        proc.wait()
        if listed is not None:
            listed.unlink(missing_ok=True)
    return proc.returncode, "\n".join(tail)


def default_remote(workdir: Path, env: Mapping[str, str] | None = None) -> str | None:
    """The name of the DVC remote that push and pull use in `workdir` (`dvc remote default`), or None."""
    proc = subprocess.run(
        [*dvc_command(), "remote", "default"], cwd=workdir, env=dict(env or tool_env()), capture_output=True, text=True
    )
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def pull_stage(workdir: Path, stage: str, log: Callable[[str], None], env: Mapping[str, str] | None = None) -> bool:
    """`dvc pull STAGE`: the stage's outputs that dvc.lock names, from the default remote, when it has
    them; True when they came, False when the remote lacks some (the stage then runs)."""
    code, _ = run_logged([*dvc_command(), "pull", stage], workdir, log, env)
    return code == 0


def push_outputs(workdir: Path, log: Callable[[str], None], env: Mapping[str, str] | None = None) -> None:
    """`dvc push --run-cache`: every output dvc.lock names, and DVC's run cache, to the default remote."""
    code, tail = run_logged([*dvc_command(), "push", "--run-cache"], workdir, log, env)
    if code != 0:
        raise RuntimeError(f"dvc push in {workdir} failed:\n{tail}")


def cache_dir(workdir: Path, env: Mapping[str, str] | None = None) -> Path:
    """The DVC cache folder `workdir` uses (an experiment worktree shares the repository's)."""
    proc = subprocess.run(
        [*dvc_command(), "cache", "dir"], cwd=workdir, env=dict(env or tool_env()), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc cache dir in {workdir} failed: {proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])


def checkout_stage(workdir: Path, stage: str, env: Mapping[str, str] | None = None) -> bool:
    code, _ = run_logged([*dvc_command(), "checkout", "--force", stage], workdir, lambda line: None, env)
    return code == 0


def reuse_outputs(workdir: Path, stage: str, log: Callable[[str], None], env: Mapping[str, str] | None = None) -> bool:
    """For a stage DVC's run cache skips (persist outputs): the outputs of an earlier run with the
    same inputs and params, from any workspace sharing the cache (shapeflow.reuse); True when reused."""
    if not read_stages(workdir)[stage].persist:
        return False
    return reuse.restore(workdir, stage, cache_dir(workdir, env), lambda ws, name: checkout_stage(ws, name, env), log)


def record_outputs(workdir: Path, stage: str, env: Mapping[str, str] | None = None) -> None:
    """Keep a completed persist-output stage's dvc.lock entry for `reuse_outputs` elsewhere."""
    if read_stages(workdir)[stage].persist:
        reuse.record(workdir, stage, cache_dir(workdir, env))


def run_stage(
    workdir: Path,
    stage: str,
    log: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    pull: bool = False,
    reuse_runs: bool = True,
) -> bool:
    """`dvc repro --single-item STAGE` in `workdir`; True when it ran, False when DVC found it up to
    date or its outputs were reused. pull: outputs missing here that the default remote holds are
    pulled instead of rebuilt (`--pull`). reuse_runs: a persist-output stage that is stale takes the
    outputs of an earlier run with the same inputs and params (`reuse_outputs`). Raises StageFailed
    with the output's last lines when the stage fails."""
    if reuse_runs and read_stages(workdir)[stage].persist and not up_to_date(workdir, stage, env):
        if reuse_outputs(workdir, stage, log, env):
            return False
    ran = False

    def watch(line: str) -> None:
        nonlocal ran
        ran = ran or line.startswith(f"Running stage '{stage}'")
        log(line)

    pulling = ["--pull"] if pull else []
    code, tail = run_logged([*dvc_command(), "repro", "--single-item", *pulling, stage], workdir, watch, env)
    if code != 0:
        raise StageFailed(stage, code, tail)
    if reuse_runs:
        record_outputs(workdir, stage, env)
    return ran


def stage_paths(repo: Path, stage: str) -> tuple[str, str]:
    """(SRC, DST) of a per-object stage, from its command in dvc.yaml: `shapeflow <stage> SRC DST`."""
    raw = yaml.safe_load((Path(repo) / "dvc.yaml").read_text())
    words = str(raw["stages"][stage]["cmd"]).split()
    if len(words) < 4 or words[:2] != ["shapeflow", stage]:
        raise ValueError(f"dvc.yaml stage {stage!r}: expected `shapeflow {stage} SRC DST`, got {' '.join(words)!r}")
    return words[2], words[3]


def up_to_date(workdir: Path, stage: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether DVC finds `stage` unchanged against dvc.lock (`dvc status STAGE` reports nothing)."""
    proc = subprocess.run(
        [*dvc_command(), "status", "--json", stage],
        cwd=workdir,
        env=dict(env or tool_env()),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StageFailed(stage, proc.returncode, proc.stderr[-4000:])
    return json.loads(proc.stdout or "{}") == {}


MODEL_STAGES = ("train_vae", "train_dit")


class NoModels(RuntimeError):
    """Evaluation was asked for where there are no up-to-date trained models."""


def check_models(workdir: Path, stages: Sequence[str] = MODEL_STAGES, env: Mapping[str, str] | None = None) -> None:
    """Raise NoModels unless every output of `stages` is on disk and DVC finds the stages up to date:
    an evaluation of existing models must not start hours of training instead."""
    workdir = Path(workdir)
    known = read_stages(workdir)
    problems = []
    for name in stages:
        missing = [out for out in known[name].outs if not (workdir / out).exists()]
        if missing:
            problems.append(f"{name}: {', '.join(missing)} missing")
        elif not up_to_date(workdir, name, env):
            problems.append(f"{name}: stale (its code, params or data changed since it ran)")
    if problems:
        raise NoModels(
            f"{workdir}: no up-to-date trained models ({'; '.join(problems)}). This evaluates existing models "
            "only; train them first (`prefect deployment run pipeline/full`, or `make pipeline` / `dvc repro`), "
            "then run it again."
        )


def commit_stage(workdir: Path, stage: str, log: Callable[[str], None], env: Mapping[str, str] | None = None) -> None:
    """Record outputs made outside `dvc repro` (the fan-out flow) in dvc.lock and the cache."""
    code, tail = run_logged([*dvc_command(), "commit", "--force", stage], workdir, log, env)
    if code != 0:
        raise StageFailed(stage, code, tail)
    record_outputs(workdir, stage, env)


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def experiment_name(overrides: Sequence[str]) -> str:
    """A stable name for a set of overrides: the same overrides, the same experiment (and worktree)."""
    digest = hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]
    return f"sf-{digest}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train_vae.steps=100' -> (['train_vae', 'steps'], 100); the value is read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. train_vae.steps=100")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(params_file: Path, overrides: Sequence[str]) -> None:
    """Write the overrides into `params_file`, creating nested keys as needed."""
    raw = yaml.safe_load(params_file.read_text()) or {}
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a section of {params_file}")
        node[keys[-1]] = value
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def experiment_folder(repo: Path, name: str) -> Path:
    """The worktree folder of experiment `name`: directly under the experiments folder, whatever the
    name says. A name is a flow parameter anyone who can trigger a deployment sets, and its folder may
    be deleted and replaced: a name that is not a plain folder name is refused."""
    if not EXPERIMENT_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"experiment name {name!r}: must match {EXPERIMENT_NAME.pattern} and hold no '..'")
    root = (repo / EXPERIMENTS_DIR).resolve()
    ws = (root / name).resolve()
    if ws.parent != root or not root.is_relative_to(repo.resolve()):  # a link leading elsewhere
        raise ValueError(f"experiment name {name!r}: its folder {ws} is not inside {root}")
    return ws


def experiment_workspace(repo: Path, name: str, overrides: Sequence[str], log: Callable[[str], None]) -> Path:
    """The worktree of experiment `name` with `overrides` applied, created on first use.

    It checks out HEAD, points its DVC cache at the repository's (so outputs of unchanged stages come
    from the cache instead of being recomputed) and checks the tracked outputs out. A worktree made
    at an earlier HEAD is moved to the current one, keeping its own dvc.lock (what its stages last
    ran with), so DVC reruns only the stages whose code or params changed since.
    """
    repo = Path(repo).resolve()
    ws = experiment_folder(repo, name)
    head = git(repo, "rev-parse", "HEAD")
    if (ws / ".git").exists() and git(ws, "rev-parse", "HEAD") != head:
        lock = ws / "dvc.lock"
        kept = lock.read_bytes() if lock.is_file() else None
        git(ws, "checkout", "--quiet", "--force", "--detach", head)
        if kept is not None:
            lock.write_bytes(kept)
        log(f"experiment workspace {ws} moved to HEAD {head[:7]}")
    if not (ws / ".git").exists():
        if ws.exists():
            shutil.rmtree(ws)  # a half-made worktree from an interrupted run
        ws.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "prune")
        git(repo, "worktree", "add", "--detach", str(ws), "HEAD")
        cache = (repo / ".dvc" / "cache").resolve()
        code, tail = run_logged([*dvc_command(), "config", "--local", "cache.dir", str(cache)], ws, log)
        if code != 0:
            raise RuntimeError(f"dvc config in {ws} failed:\n{tail}")
        code, tail = run_logged([*dvc_command(), "checkout", "--quiet"], ws, log)
        if code != 0:
            log(f"dvc checkout in {ws} left some outputs missing (their stages will run):\n{tail}")
        log(f"experiment workspace {ws} created from HEAD {git(repo, 'rev-parse', '--short', 'HEAD')}")
    share_local_remotes(repo, ws, log)
    # Every run starts from the committed params plus its own overrides: those of an earlier run
    # (a typo among them) must not pile up in a reused workspace.
    git(ws, "checkout", "--quiet", head, "--", "params.yaml")
    apply_overrides(ws / "params.yaml", overrides)
    return ws


def share_local_remotes(repo: Path, ws: Path, log: Callable[[str], None]) -> None:
    """The DVC remotes set for this machine only (`dvc remote add --local`, in the repository's
    untracked .dvc/config.local) set in the worktree too, with the same default: a worktree has the
    committed .dvc/config but not that file."""
    listed = subprocess.run(
        [*dvc_command(), "config", "--list", "--local"], cwd=repo, env=tool_env(), capture_output=True, text=True
    )
    for line in listed.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not (key.startswith("remote.") or key == "core.remote"):
            continue
        if key.startswith("remote.") and key.endswith(".url") and "://" not in value and not os.path.isabs(value):
            value = str((Path(repo) / ".dvc" / value).resolve())  # relative to the config file's folder
        code, tail = run_logged([*dvc_command(), "config", "--local", key, value], ws, log)
        if code != 0:
            raise RuntimeError(f"dvc config --local {key} in {ws} failed:\n{tail}")


def list_experiments(repo: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every experiment workspace under the experiments folder."""
    root = (Path(repo) / EXPERIMENTS_DIR).resolve()
    if not root.is_dir():
        return []
    return [(p.name, p) for p in sorted(root.iterdir()) if p.is_dir() and (p / ".git").exists()]


def remove_experiment(repo: Path, name: str) -> Path:
    """Remove the workspace of experiment `name` (its git worktree); the DVC experiment saved from it
    stays (`dvc exp remove` removes that). Returns the folder removed."""
    repo = Path(repo).resolve()
    ws = experiment_folder(repo, name)
    if not (ws / ".git").exists():
        raise ValueError(f"no experiment workspace {name!r} in {ws.parent}")
    git(repo, "worktree", "remove", "--force", str(ws))
    git(repo, "worktree", "prune")
    return ws


def git_kept_outputs(repo: Path) -> list[str]:
    """Outputs of `repo`'s stages that git keeps instead of the DVC cache (`cache: false`: the
    metrics and plots files), as declared in dvc.yaml."""
    return [path for stage in read_stages(repo).values() for path in stage.git_kept]


def save_experiment(ws: Path, name: str, log: Callable[[str], None], targets: Sequence[str] = ()) -> None:
    """Record the worktree's state as DVC experiment `name` (replacing an earlier one of that name).

    `dvc exp save` takes only files git or DVC already track; the metrics and plots files that a
    stage wrote for the first time are untracked still, so they are named with --include-untracked:
    without them `dvc exp show`, `dvc metrics diff` and `dvc plots diff` miss the experiment's figures."""
    untracked = [path for path in git_kept_outputs(ws) if (ws / path).exists()]
    include = [arg for path in untracked for arg in ("--include-untracked", path)]
    # targets: the stages a run with targets went through; the others' outputs may not exist here.
    code, tail = run_logged([*dvc_command(), "exp", "save", "--force", "-n", name, *include, *targets], ws, log)
    if code != 0:
        raise RuntimeError(f"dvc exp save -n {name} in {ws} failed:\n{tail}")
    rev = experiment_rev(ws, name)
    if rev:
        from shapeflow import report, tracking

        runs = report.stage_run_ids(ws)
        missed = tracking.tag_runs(runs, {"dvc_exp_commit": rev})
        tagged = ", ".join(stage for stage in runs if stage not in missed) or "none"
        log(f"experiment {name} is commit {rev}; its MLflow runs tagged with it: {tagged}")


def experiment_rev(ws: Path, name: str) -> str | None:
    """The commit of DVC experiment `name` based on the worktree's HEAD (refs/exps/..../<name>)."""
    head = git(ws, "rev-parse", "HEAD")
    refs = git(ws, "for-each-ref", "--format=%(objectname) %(refname)", f"refs/exps/{head[:2]}/{head[2:]}/")
    for line in refs.splitlines():
        sha, _, ref = line.partition(" ")
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    return None


EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def meshes_experiment(meshes: str | Path, extra: Sequence[str] = ()) -> tuple[str, list[str]]:
    """(name, overrides) of the pipeline on the meshes in folder `meshes`, whose top-level sub-folders
    are the categories: the folder's name, and a local fetch of its absolute path. With `extra`
    overrides (checked here) the name is <folder>-<their hash> and they follow the fetch's."""
    for item in extra:
        parse_override(item)
    folder = Path(meshes).expanduser().resolve()
    if not folder.is_dir():
        raise NotADirectoryError(f"{meshes}: not a folder of meshes")
    if not EXPERIMENT_NAME.fullmatch(folder.name):
        raise ValueError(
            f"{folder}: the folder's name {folder.name!r} names the experiment and must match "
            f"{EXPERIMENT_NAME.pattern}; rename the folder or link it under another name"
        )
    # The path as a JSON string: YAML reads it back verbatim, whatever characters it holds.
    overrides = ["fetch.source=local", f"fetch.local.path={json.dumps(str(folder))}", *extra]
    name = f"{folder.name}-{experiment_name(extra).removeprefix('sf-')}" if extra else folder.name
    return name, overrides


def run_experiment(
    repo: Path, name: str, overrides: Sequence[str], log: Callable[[str], None], force: Sequence[str] = ("fetch",)
) -> Path:
    """The whole pipeline as DVC experiment `name` in its workspace; returns the workspace.

    The `force` stages run even when DVC finds them up to date: fetch reads a folder whose contents
    are no DVC dependency, and rerunning it costs little (it redoes no object it has), while a
    folder that did not change leaves its output, and so every later stage, as it was. Then each
    stage in DAG order (`run_stage`: what is stale runs, a per-object stage that ran with the same
    inputs and params in another workspace is reused), each stage's wall time logged, and `dvc exp
    save` records the experiment.
    The stages' MLflow runs are named after the experiment and go to $MLFLOW_TRACKING_URI, else to
    the repository's mlflow.db.
    With a default DVC remote, outputs it holds are pulled instead of rebuilt (`dvc repro --pull`)
    and what the run made is pushed to it at the end.
    """
    repo = Path(repo).resolve()
    ws = experiment_workspace(repo, name, overrides, log)
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo / 'mlflow.db'}"
    env = tool_env({"DVC_EXP_NAME": name, "MLFLOW_TRACKING_URI": tracking}, ws)
    remote = default_remote(ws, env)
    took: dict[str, float] = {}  # wall seconds per stage; a forced stage's DVC check added to its run
    ran = set(force)
    for stage in force:
        start = time.monotonic()
        code, tail = run_logged([*dvc_command(), "repro", "--force", "--single-item", stage], ws, log, env)
        if code != 0:
            raise StageFailed(stage, code, tail)
        took[stage] = time.monotonic() - start
    for stage in stage_order(ws):
        start = time.monotonic()
        if run_stage(ws, stage, log, env, pull=bool(remote)):
            ran.add(stage)
        took[stage] = took.get(stage, 0.0) + time.monotonic() - start
        log(f"stage {stage}: {'ran' if stage in ran else 'up to date'} in {took[stage]:.0f} s")
    per_stage = (f"{s} {t:.0f} s{'' if s in ran else ' (up to date)'}" for s, t in took.items())
    log("wall time per stage: " + ", ".join(per_stage))
    save_experiment(ws, name, log)
    if remote:
        push_outputs(ws, log, env)
    return ws


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shapeflow.dvc_pipeline",
        description="Run the whole pipeline on a folder of meshes (its top-level sub-folders are the categories) "
        "as the DVC experiment named after the folder, in .shapeflow/experiments/<name>.",
    )
    parser.add_argument("meshes", type=Path, nargs="?", help="folder of mesh files, one sub-folder per category")
    parser.add_argument("--list", action="store_true", help="list the experiment workspaces")
    parser.add_argument("--remove", metavar="NAME", help="remove the workspace of experiment NAME")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a param override for the run, e.g. train_vae.family=grid (repeatable); the experiment is then "
        "named <folder>-<a hash of the overrides>",
    )
    args = parser.parse_args(argv)
    if (args.meshes is not None) + args.list + (args.remove is not None) != 1:
        parser.error("give a meshes folder, --list or --remove NAME")
    try:
        repo = Path(git(Path.cwd(), "rev-parse", "--show-toplevel"))
        if args.list:
            for name, folder in list_experiments(repo):
                print(f"{name}\t{folder}")
            return 0
        if args.remove is not None:
            print(f"removed {remove_experiment(repo, args.remove)}")
            return 0
        name, overrides = meshes_experiment(args.meshes, args.set)
        print(f"experiment {name}: {' '.join(overrides)}", flush=True)
        ws = run_experiment(repo, name, overrides, lambda line: print(line, flush=True))
    except (NotADirectoryError, ValueError, RuntimeError) as exc:  # StageFailed is a RuntimeError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"experiment {name} saved (`dvc exp show`); its outputs are in {ws}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
