"""Helpers for tests that watch a Prefect server: a deployment appearing, its scheduled runs ending, their logs."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_for_deployment(name: str, proc: subprocess.Popen, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                return client.read_deployment_by_name(name)
            except (ObjectNotFound, httpx.TransportError):  # not registered yet, or the server not up yet
                time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared")


def flow_run_logs(flow_run_id, expect: str, timeout: float = 60) -> list[str]:
    """The flow run's log messages on the server (sent in batches: wait until `expect` shows or `timeout`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            messages = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            if any(expect in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scheduled_runs(deployment_id, proc: subprocess.Popen, log: Path, want: int, timeout: float) -> list:
    """The deployment's flow runs once `want` of them, created by the server's scheduler, have ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            ended = [r for r in runs if r.state and r.state.is_final()]
            if len(ended) >= want:
                return sorted(ended, key=lambda r: r.expected_start_time)
            assert time.monotonic() < deadline, f"after {timeout:.0f} s: {[(r.name, r.state_name) for r in runs]}"
            time.sleep(2)
