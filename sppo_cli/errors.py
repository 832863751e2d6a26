class SppoError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits non-zero."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (libraries often add pages of context), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
