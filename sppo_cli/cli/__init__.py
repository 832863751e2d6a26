"""The `sppo` command: registers one module per command group; known errors become one line, bugs are shown as
bugs."""

import errno
import os
import shutil
import signal
import sys
import traceback

import typer

from sppo_cli.cli import eval, generate, push, rank, report, tiny, train
from sppo_cli.cli.options import done, failed
from sppo_cli.errors import SettingError, SliceDone, SppoError, first_line
from sppo_cli.logs import quiet_libraries

app = typer.Typer(
    help="Self-Play Preference Optimization: generate → rank → train, one iteration at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(generate.generate)
app.command()(rank.rank)
app.command()(train.train)
app.command()(eval.eval)
app.command()(report.report)
app.command()(push.push)
for kind in tiny.BUILDS:
    app.command(kind)(tiny.build_command(kind))


def _user_message(error: SppoError) -> str:
    if isinstance(error, SettingError):  # the library names a setting by its field, the command line by its flag
        return f"--{error.setting.replace('_', '-')} {error.problem}"
    return str(error)


def _log_hint() -> str:
    from sppo_cli.logs import last_log

    log = last_log()
    return f" (log: {log})" if log else ""


def _full_disk(error: Exception, log) -> str | None:
    """The directory whose disk is full, when that is what the error comes from (libraries report it in their own
    words: torch's "unexpected pos" while saving an optimizer, for one)."""
    cause, errors = error, []
    while cause is not None:  # the error and what it was raised from
        errors.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in errors):
        return getattr(errors[-1], "filename", None) or (str(log.parent) if log else "the output")
    if log is not None and shutil.disk_usage(log.parent).free < 2**24 and "unexpected pos" in str(error):
        return str(log.parent)
    return None


class Stopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM: unwinds like an exception, so every stage stops its workers and engines on the way
    out (typer would swallow a KeyboardInterrupt without a word)."""


def _stop(signum: int, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def main() -> None:
    if "--verbose" not in sys.argv:
        quiet_libraries()
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        app()
    except SliceDone as done_:
        done(str(done_))
    except SppoError as error:
        failed("error:", f"{_user_message(error)}{_log_hint()}")
        sys.exit(1)
    except (Stopped, KeyboardInterrupt) as stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one line, however often Ctrl-C is pressed while it unwinds
        name = str(stop) or "SIGINT"
        failed("stopped", f"by {name}; run the same command again to resume")
        sys.exit(128 + signal.Signals[name].value)
    except Exception as error:  # a bug, in sppo or a library: shown as one, with its traceback
        if os.environ.get("SPPO_DEBUG"):
            raise
        from sppo_cli.logs import last_log

        log = last_log()
        full = _full_disk(error, log)
        if full:
            failed("error:", f"no space left on the device holding {full} ({first_line(error)}); free some space and "
                             "run the same command again: finished work is kept")  # fmt: skip
            sys.exit(1)
        if log is None:
            traceback.print_exc()
        where = f"its traceback is in {log}" if log else "its traceback is above"
        failed("internal error:", f"{type(error).__name__}: {first_line(error)} (a bug in sppo or a library it "
                                  f"uses; {where})")  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
