"""Screenshot the MLflow UI's compare view of two or more runs, for the README.

The script starts a private `mlflow server` on a free local port, looks the runs up
through the server's REST API, opens the UI's compare page in a headless Chromium and
saves the screenshot. The server is always stopped again, also when something fails.

Usage (from the repository root):

    .venv/bin/python scripts/mlflow_compare.py
        # the two newest FINISHED runs of experiment shapeflow-evaluate in ./mlflow.db
    .venv/bin/python scripts/mlflow_compare.py --runs RUN_A RUN_B RUN_C --out docs/mlflow-compare.png
    .venv/bin/python scripts/mlflow_compare.py --tracking-uri sqlite:////tmp/other.db --window 1600,1800
    .venv/bin/python scripts/mlflow_compare.py --server http://127.0.0.1:5000
        # the runs of a server that is already running (`make services`); nothing is started

Needs chromium, chromium-browser or google-chrome on PATH (or --browser PATH) and
Pillow. The compare-page route (`#/compare-runs?runs=[...]&experiments=[...]`) is the
one the MLflow 3.x UI builds itself; other major versions may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# The UI pops its "MLflow Assistant" side panel open on the first visit when the page
# is served from localhost/127.0.0.1, which would cover a third of the screenshot.
# Chromium therefore reaches the server under this made-up name (mapped to 127.0.0.1
# by --host-resolver-rules) and the server is told to accept it.
UI_HOST = "mlflow-compare.test"

# A page still showing MLflow's grey loading skeleton has only a handful of colours;
# the rendered compare page (text, links, plot) has thousands.
MIN_COLOURS = 16
SCREENSHOT_ATTEMPTS = 3
BROWSER_TIMEOUT_S = 180
LOG_TAIL_LINES = 15


class Fail(Exception):
    """An error that ends the script: the first line says what failed and where; a log tail may follow."""


class ApiError(Fail):
    """An error answer from the MLflow REST API; `code` is MLflow's error_code, e.g. RESOURCE_DOES_NOT_EXIST."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.code = code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Screenshot the MLflow UI's compare view of two or more runs.")
    parser.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="backend store URI (default: %(default)s)"
    )
    parser.add_argument(
        "--server", metavar="URL", help="a running MLflow server to use instead of starting one on --tracking-uri"
    )
    parser.add_argument(
        "--experiment", default="shapeflow-evaluate", help="experiment to take runs from (default: %(default)s)"
    )
    parser.add_argument(
        "--runs", nargs="+", metavar="RUN_ID", help="runs to compare (default: the two newest FINISHED runs)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/mlflow-compare.png"), help="PNG to write (default: %(default)s)"
    )
    parser.add_argument(
        "--window", type=parse_window, default=(1600, 1200), help="browser window W,H (default: 1600,1200)"
    )
    parser.add_argument("--browser", help=f"browser binary (default: first of {', '.join(BROWSERS)} on PATH)")
    parser.add_argument(
        "--virtual-time-ms", type=int, default=15000, help="page settle time per attempt (default: %(default)s)"
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60.0, help="seconds to wait for the server (default: %(default)s)"
    )
    return parser.parse_args(argv)


def parse_window(text: str) -> tuple[int, int]:
    """'1600,1200' -> (1600, 1200)."""
    try:
        width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTH,HEIGHT, got {text!r}") from None
    if width < 200 or height < 200:
        raise argparse.ArgumentTypeError(f"window {text!r} is too small")
    return width, height


def find_browser(choice: str | None) -> str:
    """The browser binary to use: --browser if given, else the first known name on PATH."""
    names = [choice] if choice else list(BROWSERS)
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    if choice:
        raise Fail(f"browser {choice!r} not found (not an executable, not on PATH)")
    raise Fail(f"no browser found: none of {', '.join(BROWSERS)} is on PATH (install one or pass --browser)")


def check_sqlite_file(uri: str) -> None:
    """Refuse a sqlite URI whose file is missing: the server would silently create an empty database."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.is_file():
        raise Fail(f"no tracking database at {path.resolve()} (from --tracking-uri {uri})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(uri: str, port: int, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """Start `mlflow server` in its own process group; its output goes to a log file."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if not mlflow:
        raise Fail(f"the mlflow command was found neither next to {sys.executable} nor on PATH")
    command = [
        mlflow,
        "server",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--allowed-hosts",
        f"127.0.0.1:{port},localhost:{port},{UI_HOST}:{port}",
        "--cors-allowed-origins",
        f"http://{UI_HOST}:{port}",
    ]
    env = dict(os.environ)
    # A screenshot needs no background job runner (it starts several worker processes) and no telemetry.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    log_path = workdir / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc, log_path


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def wait_for_health(proc: subprocess.Popen, base: str, log_path: Path, timeout: float) -> None:
    """Poll /health until the server answers; fail if it exits or takes longer than timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Fail(
                f"mlflow server exited with code {proc.returncode} before {base} was up; "
                f"its log ends:\n{log_tail(log_path)}"
            )
        try:
            with open_url(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise Fail(
        f"mlflow server did not answer {base}/health within {timeout:.0f} s; its log ends:\n{log_tail(log_path)}"
    )


def kill_group(proc: subprocess.Popen, grace: float) -> None:
    """Stop a process and everything in its process group: SIGTERM, then SIGKILL after `grace` seconds."""
    from shapeflow.dvc_pipeline import stop_group

    stop_group(proc.pid, grace, leader=proc)  # start_new_session=True made the process its group's leader
    proc.wait()


def open_url(url: str, data: bytes | None = None, timeout: float = 30):
    """urlopen without any HTTP proxy from the environment (the server is on 127.0.0.1)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Content-Type": "application/json"} if data is not None else {}
    return opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=timeout)


def api(base: str, endpoint: str, query: dict | None = None, body: dict | None = None) -> dict:
    """Call an MLflow REST endpoint: GET with query parameters, or POST with a JSON body."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    try:
        with open_url(url, data) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        try:
            detail = json.load(err)
        except ValueError:
            detail = {}
        raise ApiError(err.code, detail.get("error_code", ""), detail.get("message", str(err))) from None


def experiment_id(base: str, name: str, uri: str) -> str:
    try:
        reply = api(base, "experiments/get-by-name", {"experiment_name": name})
    except ApiError as err:
        if err.code == "RESOURCE_DOES_NOT_EXIST":
            raise Fail(f"no experiment named {name!r} in {uri}") from None
        raise
    return reply["experiment"]["experiment_id"]


def newest_finished_runs(base: str, exp_id: str, count: int = 2) -> list[dict]:
    """The `count` most recently started FINISHED runs of an experiment, oldest first."""
    body = {
        "experiment_ids": [exp_id],
        "filter": "attributes.status = 'FINISHED'",
        "order_by": ["attributes.start_time DESC"],
        "max_results": count,
    }
    runs = [run["info"] for run in api(base, "runs/search", body=body).get("runs", [])]
    return runs[::-1]  # oldest first, so the compare columns read left to right in time


def named_runs(base: str, run_ids: list[str], uri: str) -> list[dict]:
    """Look up the runs given with --runs, in the order given."""
    infos = []
    for run_id in run_ids:
        try:
            infos.append(api(base, "runs/get", {"run_id": run_id})["run"]["info"])
        except ApiError as err:
            if err.code == "RESOURCE_DOES_NOT_EXIST":
                raise Fail(f"no run {run_id} in {uri}") from None
            raise
    return infos


def compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def compare_url(base: str, runs: list[dict]) -> str:
    """The UI's hash route for the compare page, as the MLflow 3.x UI builds it."""
    run_ids = [run["run_id"] for run in runs]
    experiment_ids = sorted({run["experiment_id"] for run in runs})
    # Compact JSON lists, as the UI's own JSON.stringify writes them.
    query = urllib.parse.urlencode({"runs": compact_json(run_ids), "experiments": compact_json(experiment_ids)})
    return f"{base}/#/compare-runs?{query}"


def run_browser(browser: str, url: str, png: Path, window: tuple[int, int], budget_ms: int, profile: Path) -> None:
    """Load `url` in a headless browser and write a screenshot to `png`."""
    command = [
        browser,
        "--headless=new",
        "--no-sandbox",  # we may run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",  # a fresh profile: nothing remembered from earlier visits
        # Only the server is reachable; any other host fails at once instead of stalling the page.
        f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={window[0]},{window[1]}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={png}",
        url,
    ]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Fail(f"{browser} did not finish within {BROWSER_TIMEOUT_S} s loading {url}") from None
    finally:
        kill_group(proc, grace=3)  # helper processes may outlive the main one
    if proc.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        tail = "\n".join(output.decode(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:])
        raise Fail(f"{browser} exited with code {proc.returncode} without a screenshot of {url}:\n{tail}")


def colour_count(png: Path) -> int:
    """How many distinct colours the image has (1 means blank)."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        return len(rgb.getcolors(maxcolors=rgb.width * rgb.height))


def capture(browser: str, url: str, out: Path, window: tuple[int, int], budget_ms: int, workdir: Path) -> None:
    """Screenshot `url` into `out`, retrying with more settle time while the page looks blank or unloaded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=".png")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for attempt in range(1, SCREENSHOT_ATTEMPTS + 1):
            tmp.unlink(missing_ok=True)
            run_browser(browser, url, tmp, window, budget_ms, workdir / f"profile-{attempt}")
            colours = colour_count(tmp)
            if colours >= MIN_COLOURS:
                os.replace(tmp, out)  # same folder, so the PNG appears in one step
                return
            print(
                f"attempt {attempt}: page looks {'blank' if colours == 1 else 'still loading'} "
                f"({colours} colours); retrying",
                file=sys.stderr,
            )
            budget_ms *= 2
        raise Fail(
            f"screenshot of {url} stayed blank or unloaded after {SCREENSHOT_ATTEMPTS} attempts ({colours} colours)"
        )
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Turn SIGTERM into an exception so the `finally` below still stops the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        browser = find_browser(args.browser)
        if args.server is None:
            check_sqlite_file(args.tracking_uri)
        if args.runs is not None and len(args.runs) < 2:
            raise Fail(f"--runs needs at least 2 run ids, got {len(args.runs)}")
        with tempfile.TemporaryDirectory(prefix="mlflow-compare-") as tmp:
            workdir = Path(tmp)
            server = None
            try:
                if args.server:
                    base = ui = args.server.rstrip("/")
                    source = base
                    if not base.startswith(("http://", "https://")):
                        raise Fail(f"--server {args.server!r}: an http(s) URL is required")
                else:
                    port = free_port()
                    server, log_path = start_server(args.tracking_uri, port, workdir)
                    base, ui, source = f"http://127.0.0.1:{port}", f"http://{UI_HOST}:{port}", args.tracking_uri
                    wait_for_health(server, base, log_path, args.start_timeout)
                if args.runs:
                    runs = named_runs(base, args.runs, source)
                else:
                    exp_id = experiment_id(base, args.experiment, source)
                    runs = newest_finished_runs(base, exp_id)
                    if len(runs) < 2:
                        raise Fail(
                            f"experiment {args.experiment!r} in {source} has {len(runs)} FINISHED run(s); need 2"
                        )
                url = compare_url(ui, runs)
                print(
                    f"comparing {', '.join(run['run_name'] or run['run_id'] for run in runs)}: {url}", file=sys.stderr
                )
                capture(browser, url, args.out, args.window, args.virtual_time_ms, workdir)
            finally:
                if server is not None:
                    kill_group(server, grace=5)
    except Fail as err:
        print(f"mlflow_compare: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
