import json
import queue
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from sppo_cli import cli, parallel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sppo_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    from sppo_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-seed1", seed=1)


@pytest.fixture(scope="session")
def tiny_pairrm(tmp_path_factory) -> Path:
    from sppo_cli.pairrm import build_tiny_pairrm

    return build_tiny_pairrm(tmp_path_factory.mktemp("models") / "pairrm", seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    rows = [
        {"prompt": "What is two plus three?", "answer": "5"},
        {"prompt": "Name a fruit that is red.", "answer": "apple"},
        {"prompt": "How many legs does a spider have?", "answer": "8"},
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Run `sppo ARGS` in-process; returns the exit code and what was printed to stderr."""
    argv = sys.argv
    sys.argv = ["sppo", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


@dataclass
class InlineProcess:
    target: object
    args: tuple
    exitcode: int | None = None

    def start(self):
        self.target(*self.args)
        self.exitcode = 0

    def is_alive(self):
        return False

    def join(self):
        pass


@pytest.fixture
def simulated_processes(monkeypatch) -> list[InlineProcess]:
    """Data-parallel workers run one after the other in this process (sharing its models); returns them."""
    started = []

    def process(target, args):
        started.append(InlineProcess(target, args))
        return started[-1]

    context = SimpleNamespace(Queue=queue.Queue, Process=process)
    monkeypatch.setattr(parallel, "multiprocessing", SimpleNamespace(get_context=lambda method: context))
    return started
