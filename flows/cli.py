"""The `emoprune` command line: run a stage or the whole pipeline, check params, open the MLflow UI."""

from __future__ import annotations

import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from tasks.paths import STAGES

app = typer.Typer(
    help="Evolutionary multi-objective channel pruning (EMO-DIR) as a DVC + Prefect + MLflow pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


Stage = Enum("Stage", {name: name for name in STAGES}, type=str)  # type: ignore[misc]  # typer choices, one per DVC stage


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pruning.channels import UnsupportedLayerError
    from tasks.checkpoints import CheckpointError
    from tasks.config import ConfigError
    from tasks.datasets import DataError

    return (ConfigError, DataError, CheckpointError, UnsupportedLayerError)


def _load(params: Path):
    from tasks.config import ConfigError, load_params

    try:
        return load_params(params)
    except ConfigError as e:
        _fail(str(e))


def _preflight(p, stages: list[str], project: Path = Path(".")) -> None:
    """Every input the stages need, checked before any heavy work (tasks/preflight.py); problems exit with code 2."""
    from tasks.preflight import PreflightError, preflight

    try:
        for note in preflight(p, stages, project):
            err.print(f"note: {note}", highlight=False, markup=False)
    except PreflightError as e:
        _fail(str(e))


@app.command()
def check(params: Path = typer.Option(Path("params.yaml"), help="params file to validate")) -> None:
    """Validate a params file and print the resolved settings."""
    p = _load(params)
    _preflight(p, [s.value for s in Stage], params.parent)
    Console().print_json(p.model_dump_json())


@app.command()
def stage(
    name: Stage = typer.Argument(..., help="stage to run"), params: Path = typer.Option(Path("params.yaml"), help="params file")
) -> None:
    """Run one stage as a Prefect flow (what each dvc.yaml stage calls)."""
    _preflight(_load(params), [name.value])  # bad params and inputs fail here, before Prefect or any heavy work starts
    from flows.stages import run_stage

    try:
        run_stage(name.value, str(params))
    except _user_errors() as e:
        _fail(str(e))


@app.command()
def sources(params: Path = typer.Option(Path("params.yaml"), help="params file naming data.root and model.checkpoint")) -> None:
    """Fingerprint the inputs outside the repository into data/sources.json (what dvc.yaml's first stage calls)."""
    from tasks.sources import SOURCES, write

    changed = write(params, params.parent / SOURCES)
    typer.echo(f"{SOURCES}: {'changed' if changed else 'unchanged'}")


@app.command()
def run(
    force: bool = typer.Option(False, help="rerun every stage even if DVC finds it up to date"),
    project: Path = typer.Option(Path("."), help="project folder holding dvc.yaml and params.yaml"),
) -> None:
    """Bring the whole pipeline up to date: `dvc repro` stage by stage inside one Prefect flow and one MLflow parent run."""
    p = _load(project / "params.yaml")
    _preflight(p, [s.value for s in Stage], project)
    from flows.stages import with_retries

    try:
        result = with_retries(p)(str(project), force)
    except _user_errors() as e:
        _fail(str(e))
    except RuntimeError as e:
        _fail(str(e), code=1)
    typer.echo("up to date: no stage ran" if result["up_to_date"] else f"stages run: {', '.join(result['ran']) or 'none'}")
    _print_summary(project)


def _print_summary(project: Path) -> None:
    """The run's result in a few lines: what was pruned, what it cost, where the files are."""
    import json

    from tasks import paths

    path = project / paths.SUMMARY
    if not path.is_file():
        return
    s = json.loads(path.read_text())
    base, pruned, onnx = s["base"], s["pruned"], s["onnx"]
    lines = [
        f"{s['method']} at target {s['target']['reduction']:g} ({s['target']['metric']}):",
        f"  test accuracy  {base['test_acc']:.2%} base -> {pruned['test_acc']:.2%} pruned and finetuned "
        f"({pruned['val_acc_before_finetune']:.2%} val before finetuning)",
        f"  FLOPs          {base['flops']:,} -> {pruned['flops']:,} ({pruned['flops_reduction']:.1%} removed)",
        f"  parameters     {base['params']:,} -> {pruned['params']:,} ({pruned['params_reduction']:.1%} removed)",
    ]
    if "top1_agreement" in onnx:
        lines.append(f"  ONNX           top-1 agreement with PyTorch {onnx['top1_agreement']:.2%}, max |diff| {onnx['max_abs_diff']:.1e}")
    for key in sorted(k for k in onnx if k.startswith("latency_ratio_b")):
        b = key.removeprefix("latency_ratio_b")
        lines.append(
            f"  latency b{b:<4}   {onnx[f'latency_ms_base_b{b}']:.2f} ms -> {onnx[f'latency_ms_pruned_b{b}']:.2f} ms "
            f"({onnx[key]:.2f}x the base's time, ONNX Runtime on this machine)"
        )
    lines.append(f"  files          {paths.PRUNED} {paths.PRUNED_ONNX} {paths.SCHEME} {paths.SUMMARY}; `emoprune ui` for every run")
    typer.echo("\n".join(lines))


@app.command()
def serve(
    cron: Optional[str] = typer.Option(None, help="when to run, as a cron expression (default: 02:00 every day)"),
    interval: Optional[float] = typer.Option(None, min=10, help="or: every this many seconds"),
    name: str = typer.Option("scheduled", help="deployment name (the flow is emoprune-pipeline)"),
    timezone: str = typer.Option("UTC", help="time zone of the cron expression"),
    server_port: int = typer.Option(4200, help="port of the local Prefect server started when none answers"),
    project: Path = typer.Option(Path("."), help="project folder holding dvc.yaml and params.yaml"),
) -> None:
    """Serve the pipeline flow as a scheduled Prefect deployment until stopped (Ctrl-C or SIGTERM).

    Each scheduled run does what `emoprune run` does: only the stages whose inputs changed rerun, and a run
    with nothing changed ends at once. The Prefect server is the one PREFECT_API_URL names, or one answering
    on --server-port; if neither, this command starts one (log: .emoprune/prefect-server.log) and stops it on exit."""
    import os
    from datetime import timedelta

    from prefect.client.schemas.schedules import construct_schedule

    p = _load(project / "params.yaml")
    if cron is not None and interval is not None:
        _fail(f"--cron {cron!r} and --interval {interval:g}: give one of them, not both")
    when = f"every {interval:g} s" if interval is not None else repr(cron := cron or "0 2 * * *")
    try:
        schedule = (
            construct_schedule(interval=timedelta(seconds=interval))
            if interval is not None
            else construct_schedule(cron=cron, timezone=timezone)
        )
    except ValueError as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(e, "errors") else str(e)
        _fail(f"--cron {cron!r} / --timezone {timezone!r}: {why}; allowed: a 5-field cron expression such as '0 2 * * *' and an IANA zone")
    from flows.serving import prefect_server, serve_until_stopped

    log = project.resolve() / ".emoprune" / "prefect-server.log"
    try:
        with prefect_server(server_port, log) as (url, started):
            os.environ["PREFECT_API_URL"] = url
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from flows.stages import pipeline_flow, retry_settings

            os.environ.update(retry_settings(p))  # the runner's flow-run processes inherit these
            typer.echo(
                f"serving emoprune-pipeline/{name} {when} ({timezone}) for {project.resolve()}; "
                f"{p.orchestration.retries} retries; Prefect server {url}"
                + (f" (started here, log {log})" if started else "")
                + ". Ctrl-C stops."
            )
            with temporary_settings({PREFECT_API_URL: url}):
                deployment = pipeline_flow.to_deployment(
                    name=name,
                    schedule=schedule,  # type: ignore[arg-type]  # construct_schedule's union, each a valid schedule
                    parameters={"project_dir": str(project.resolve())},
                    tags=["emoprune"],
                    description="emoprune pipeline: dvc repro of every stage, logged in MLflow",
                )
                serve_until_stopped(deployment)
    except RuntimeError as e:
        _fail(str(e), code=1)
    typer.echo("stopped")


@app.command()
def scheme(
    target: float = typer.Option(..., help="fraction of prune.metric (FLOPs, params or predicted latency) to remove, in (0, 1)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Take another target from the finished search: rank again, no new search or constrained training."""
    p = _load(params)
    if not 0.0 < target < 1.0:
        _fail(f"--target {target} is out of range; allowed: a fraction in (0, 1)")
    from tasks.rank import scheme_for_target

    try:
        doc, doc_path, model_path = scheme_for_target(p, target)
    except _user_errors() + (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    info = doc["info"]
    typer.echo(
        f"{doc['method']} at target {target:g}: removes {doc['flops']['reduction']:.2%} of FLOPs "
        f"({doc['flops']['pruned']:,} of {doc['flops']['base']:,}), {doc['params']['reduction']:.2%} of params; "
        + (
            f"val acc predicted {info['predicted_val_acc']:.4f}, measured {info['measured_val_acc']:.4f}"
            if "measured_val_acc" in info
            else f"search error {info.get('search_error', float('nan')):.4f}"
        )
        + f"\nscheme: {doc_path}\nmodel (not finetuned): {model_path}"
    )


@app.command()
def compare(
    last: int = typer.Option(10, min=1, help="how many of the latest pipeline results"),
    params: Path = typer.Option(Path("params.yaml"), help="params file naming the tracking store"),
) -> None:
    """A table of the last runs' results from the tracking store: method, target, FLOPs, params, accuracy, search time."""
    p = _load(params)
    from rich.table import Table

    from tasks.tracking import report_runs

    rows = report_runs(p, last)
    if not rows:
        _fail(f"no finished pipeline run in {p.tracking.uri} (experiment {p.tracking.experiment!r}); run `emoprune run` first", 1)
    table = Table(title=f"last {len(rows)} runs in {p.tracking.uri}")
    for col in ("finished", "data", "model", "method", "target", "FLOPs", "FLOPs removed", "params", "test acc", "base acc", "search s"):
        table.add_column(col, justify="left" if col in ("finished", "data", "model", "method") else "right")
    for r in rows:
        table.add_row(
            r["finished"],
            r["data"],
            r["model"],
            r["method"],
            r["target"],
            f"{r['flops']:,.0f}",
            f"{r['flops_reduction']:.1%}",
            f"{r['params']:,.0f}",
            f"{r['test_acc']:.2%}",
            f"{r['base_test_acc']:.2%}",
            f"{r['search_seconds']:.0f}",
        )
    Console(width=200).print(table)


@app.command()
def ui(
    port: int = typer.Option(5000, help="port for the MLflow UI"),
    params: Path = typer.Option(Path("params.yaml"), help="params file naming the tracking store"),
    workers: int = typer.Option(
        1, min=1, envvar="MLFLOW_WORKERS", help="server worker processes (MLflow's own default is 4, for a shared server)"
    ),
) -> None:
    """Open the MLflow UI on the project's tracking store."""
    p = _load(params)
    from flows.serving import run_until_stopped

    # one worker by default: the UI of one user's project answers from one process, starts in about 8 s instead
    # of 11 s (measured with 4 on the idle machine) and runs a quarter of the server processes.
    # Its own process group, stopped whole: a plain subprocess.run left the UI's workers running after Ctrl-C.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", p.tracking.uri, "--port", str(port), "--workers", str(workers)]
    code = run_until_stopped(cmd)
    raise typer.Exit(code)


_stopped_by: int | None = None


def _stop_request() -> int | None:
    """The signal that told this process to stop, if one did: seen by `_interrupted` or, inside a stage's flow
    (where Prefect's handler replaces it), recorded by pruning.stopping (not imported here unless loaded)."""
    stopping = sys.modules.get("pruning.stopping")
    return _stopped_by or (stopping.requested() if stopping is not None else None)


def _interrupted(signum: int, frame) -> None:
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: open MLflow runs end FAILED, Prefect marks the
    # flow run crashed, temporary files are removed; without this the process would vanish mid-write
    global _stopped_by
    _stopped_by = signum
    if (stopping := sys.modules.get("pruning.stopping")) is not None:
        stopping.request(signum)  # the loops' checks see it too, should this exception be lost
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def main() -> None:
    import os

    # before Prefect or MLflow load: no usage reports from an offline machine (each failed one logs an error)
    for key, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_ENABLE_TELEMETRY", "false"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(key, value)
    # a stage run by bare `dvc repro` starts Prefect's ephemeral server, which must answer within 20 s by default;
    # its first start on a fresh machine creates and migrates the database (a one-task flow took 31 s on 2 idle
    # cores, 20 s with the database there), and under load it timed out and failed the stage. Only the wait is longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        app()
    except SystemExit as done:
        # a stop whose exception was lost (pruning/stopping.py) and that no loop saw: the work went on to the
        # end, but a stopped command never reports success (DVC must not record the stage as done)
        if done.code in (0, None) and (signum := _stop_request()) is not None:
            typer.echo(f"stopped by signal {signal.Signals(signum).name} (after the work had finished)", err=True)
            raise SystemExit(128 + signum) from None
        raise


if __name__ == "__main__":
    main()
