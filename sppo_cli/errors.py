class SppoError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits non-zero."""


class SettingError(SppoError):
    """A setting with a value it cannot take. The library names it by its field (`num_samples`); the command line
    names it by its flag (`--num-samples`)."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


def first_line(error: BaseException) -> str:
    """The first line of an error's message (libraries often add pages of context), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class SliceDone(Exception):
    """Not an error: one slice of a run (--num-shards, --shard-index) is done; the command without them finishes it."""
