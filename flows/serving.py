"""Long-running processes the CLI owns: a local Prefect server, the served pipeline, the MLflow UI, each
stopped cleanly by Ctrl-C or SIGTERM (children included, no tracebacks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group `proc` leads (a server and its workers), SIGKILL what is left after `grace` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_server(port: int, log: Path, timeout: float = 180.0) -> Iterator[tuple[str, bool]]:
    """The Prefect API to serve against: the one `PREFECT_API_URL` names, or one already answering on
    127.0.0.1:`port`, or else a server started here (its output in `log`) and stopped on exit.

    Yields (api_url, started_here). A configured URL that does not answer is an error, not a reason to
    start another server."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        if not answers(configured):
            raise RuntimeError(
                f"PREFECT_API_URL={configured} does not answer; start that server, or unset "
                "PREFECT_API_URL to let `emoprune serve` start one"
            )
        yield configured, False
        return
    url = f"http://127.0.0.1:{port}/api"
    if answers(url):
        yield url, False
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with open(log, "ab") as out:
        # its own session: a Ctrl-C in the terminal reaches only the CLI, which stops the runner first and
        # the server last, so the runner never logs a vanished server
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not answers(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before answering; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not answer on {url} within {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield url, True
    finally:
        stop_group(proc)


def serve_until_stopped(deployment: Any, limit: int = 1) -> None:
    """Serve `deployment` (a Prefect RunnerDeployment) until SIGINT or SIGTERM, then stop the runner cleanly.

    Prefect's own `serve` answers SIGTERM with a coroutine it never awaits and leaves the process running;
    here both signals set an event and the runner is stopped from inside its loop. `limit` runs at a time:
    two `dvc repro` in one project would fight over DVC's lock, so a scheduled run that comes due while
    another runs waits for it."""
    from prefect.logging.handlers import APILogHandler
    from prefect.runner import Runner

    async def main() -> None:
        runner = Runner(limit=limit, pause_on_shutdown=True)
        await runner.aadd_deployment(deployment)
        started = asyncio.create_task(runner.start())
        await asyncio.sleep(0)  # runner.start() installs its SIGTERM handler first thing; ours replace it
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not started.done():
            print("stopping: the runner finishes, then any server this command started", flush=True)
            await runner.astop()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        # the runner's last records (a run cancelled at Ctrl-C, "deployments paused") wait in Prefect's
        # background log worker; send them while the server still answers, or the worker prints
        # "Error logging to API" at exit after the server this command started is gone
        await APILogHandler.aflush()

    asyncio.run(main())


def run_until_stopped(cmd: list[str], grace: float = 10.0) -> int:
    """Run `cmd` (a server, perhaps with worker processes, such as the MLflow UI) until it exits or this process gets
    SIGINT or SIGTERM; then stop its whole process group within `grace` seconds. Returns its exit code."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopped = []

    def on_signal(signum: int, frame: Any) -> None:
        stopped.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None and not stopped:
            time.sleep(0.2)
    finally:
        stop_group(proc, grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if stopped else int(proc.returncode or 0)
