from pathlib import Path
from typing import Annotated

import typer

from sppo_cli.cli.options import done, parameter, settings_command
from sppo_cli.config import PushConfig

OUTPUT = parameter("output", Annotated[Path, typer.Argument(help="A finished output of any sppo command.")])
REPO_ID = parameter("repo_id", Annotated[str, typer.Option(help="Where to publish it: ORG/NAME (nothing is "
                                                           "assumed).")])  # fmt: skip


@settings_command(PushConfig, OUTPUT, REPO_ID)
def push(config: PushConfig, output: Path, repo_id: str):
    """Publish a finished output to the Hugging Face Hub with a card written from its manifest."""
    from sppo_cli.hub import push as publish

    done(f"{output}: {publish(output, repo_id, config)}")
