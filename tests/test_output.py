"""What `emoprune run` shows of each `dvc repro`: stage log lines once, DVC's own lines, no git hints."""
from __future__ import annotations

from flows.stages import output_route

# lines as `dvc repro --single-item prepare` prints them, stage flow log lines included
REPRO = """Running stage 'prepare':
> emoprune stage prepare
23:35:53.829 | INFO    | Flow run 'prepare' - Beginning flow run 'prepare' for flow 'emoprune-stage'
23:35:56.925 | INFO    | Flow run 'prepare' - Finished in state Completed()
Generating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock data/.gitignore

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
"""


def test_stage_log_lines_pass_as_they_are_dvc_lines_go_to_the_flow_log_hints_and_blanks_are_dropped():
    routes = [(line, output_route(line + "\n")) for line in REPRO.splitlines()]
    assert [line for line, r in routes if r == "raw"] == [
        "23:35:53.829 | INFO    | Flow run 'prepare' - Beginning flow run 'prepare' for flow 'emoprune-stage'",
        "23:35:56.925 | INFO    | Flow run 'prepare' - Finished in state Completed()",
    ]
    assert [line for line, r in routes if r == "log"] == [
        "Running stage 'prepare':", "> emoprune stage prepare", "Generating lock file 'dvc.lock'"]
