"""The tiny offline models and data the demo and the tests are built on."""

from collections.abc import Callable
from typing import Annotated

import typer

from sppo_cli.cli.options import parameter, report, stage_command
from sppo_cli.config import TinyConfig

OUTPUT = parameter("output", Annotated[str, typer.Argument(help="Directory to write.")])
BUILDS = {
    "tiny-model": "Build a tiny random Llama with its own tokenizer and chat template (offline).",
    "tiny-pairrm": "Build a tiny random PairRM checkpoint (PairRM-hf layout, offline).",
    "tiny-reward-model": "Build a tiny random scalar reward model sharing the tiny model's tokenizer (offline).",
    "tiny-math-model": "Pretrain the demo's tiny policy on single-digit addition, right a quarter of the time "
    "(offline, ~40 s).",
    "tiny-math-prompts": "Write the demo's prompt sets: heldout.jsonl and disjoint iter1.jsonl, iter2.jsonl, ... "
    "(with answers).",
}


def build_command(kind: str) -> Callable:
    """The command that builds `kind` as a stage (atomic, with a manifest; done once per seed)."""

    def build(config: TinyConfig, output, overwrite: bool, verbose: bool):
        from sppo_cli.tiny import build as run

        _, done = run(kind, output, config, overwrite, verbose)
        report(output, done, kind)

    build.__name__, build.__doc__ = kind.replace("-", "_"), BUILDS[kind]
    return stage_command(TinyConfig, output=OUTPUT, publishable=False)(build)
