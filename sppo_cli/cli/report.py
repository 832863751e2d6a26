from pathlib import Path
from typing import Annotated

import typer

from sppo_cli.cli.options import done


def report(
    runs: Annotated[list[Path], typer.Argument(help="Pipeline output directories (several: compared side by side).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write (default: the first run's directory).")] = None,  # fmt: skip
):
    """Rebuild report.md and report.png of pipeline runs from their stages' manifests."""
    from sppo_cli.report import write_report

    markdown, picture = write_report(runs, output)
    done(f"{markdown}, {picture}")
