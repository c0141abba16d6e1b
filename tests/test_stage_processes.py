"""A stage's processes end with the run that started them: no trainer keeps going after its flow run
or its worker is gone (shapeflow.dvc_pipeline.run_logged, ParentWatch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shapeflow import dvc_pipeline as dp

# A stage stand-in: starts a child that sleeps (as accelerate starts the trainer), writes the child's
# pid to a file, then sleeps itself.
STAGE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(str(child.pid))
    print("child", child.pid, flush=True)
    time.sleep(120)
    """
)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_file(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
        time.sleep(0.05)
    return path.read_text()


def test_a_stage_ended_early_takes_its_children_along_and_leaves_no_group_listed(tmp_path, monkeypatch):
    groups = tmp_path / "groups"
    monkeypatch.setenv(dp.STAGE_GROUPS_ENV, str(groups))
    (tmp_path / "stage.py").write_text(STAGE)
    seen: list[str] = []

    def log(line: str) -> None:
        seen.append(line)
        listed = list(groups.glob("*.pgid"))
        assert len(listed) == 1 and "stage.py" in listed[0].read_text()  # listed while it runs
        raise KeyboardInterrupt  # the user (or Prefect's cancel) stops the run

    with pytest.raises(KeyboardInterrupt):
        dp.run_logged([sys.executable, str(tmp_path / "stage.py"), str(tmp_path / "child.pid")], tmp_path, log)
    child = int((tmp_path / "child.pid").read_text())
    assert seen and seen[0] == f"child {child}"
    assert wait_gone(child), "the stage's child outlived the run"
    assert list(groups.glob("*.pgid")) == []


def test_a_stage_that_ends_by_itself_reports_its_status_and_lines(tmp_path):
    code, tail = dp.run_logged(
        [sys.executable, "-c", "print('one'); print('two'); raise SystemExit(3)"], tmp_path, lambda line: None
    )
    assert code == 3 and tail.splitlines() == ["one", "two"]


# A Prefect worker stand-in: starts a "flow run" in a session of its own (as Prefect's runner does),
# which runs the stage through run_logged, then waits forever.
WORKER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    env = dict(os.environ, PREFECT__FLOW_RUN_ID="test-run")
    code = (
        "import sys; from pathlib import Path; from shapeflow import dvc_pipeline as dp; "
        "dp.run_logged([sys.executable, sys.argv[1], sys.argv[2]], Path.cwd(), print)"
    )
    run = subprocess.Popen([sys.executable, "-c", code, *sys.argv[1:]], env=env, start_new_session=True)
    open(sys.argv[3], "w").write(str(run.pid))
    time.sleep(300)
    """
)


def test_a_flow_run_whose_worker_is_killed_ends_its_stage_and_itself(tmp_path):
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "worker.py").write_text(WORKER)
    files = [str(tmp_path / n) for n in ("stage.py", "child.pid", "run.pid")]
    groups = tmp_path / "groups"
    worker = subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py"), *files],
        cwd=tmp_path,
        start_new_session=True,
        env=dict(os.environ, **{dp.STAGE_GROUPS_ENV: str(groups)}),
    )
    try:
        child = int(wait_file(tmp_path / "child.pid"))
        run = int(wait_file(tmp_path / "run.pid"))
        assert len(list(groups.glob("*.pgid"))) == 1
        os.killpg(worker.pid, signal.SIGKILL)  # the worker's group: the flow run is not in it
        worker.wait()
        assert wait_gone(child), "the stage's child outlived its worker"
        assert wait_gone(run), "the flow run's process outlived its worker"
        # Plain SIGTERM ends this stand-in at once (no Prefect handler, no `finally`): the watch
        # itself took the stage off the list, so `make stop-services` finds nothing stale there.
        assert list(groups.glob("*.pgid")) == []
    finally:
        for pid in (worker.pid,):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
