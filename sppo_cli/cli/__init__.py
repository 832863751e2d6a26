"""The `sppo` command: registers one module per command group; known errors become one line, bugs are shown as
bugs."""

import os
import sys
import traceback

import typer

from sppo_cli.cli import eval, generate, push, rank, report, tiny, train
from sppo_cli.cli.options import failed
from sppo_cli.errors import SettingError, SppoError, first_line
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


def main() -> None:
    if "--verbose" not in sys.argv:
        quiet_libraries()
    try:
        app()
    except SppoError as error:
        failed("error:", f"{_user_message(error)}{_log_hint()}")
        sys.exit(1)
    except KeyboardInterrupt:
        failed("interrupted;", "run the same command again to resume")
        sys.exit(130)
    except Exception as error:  # a bug, in sppo or a library: shown as one, with its traceback
        if os.environ.get("SPPO_DEBUG"):
            raise
        from sppo_cli.logs import last_log

        log = last_log()
        if log is None:
            traceback.print_exc()
        where = f"its traceback is in {log}" if log else "its traceback is above"
        failed("internal error:", f"{type(error).__name__}: {first_line(error)} (a bug in sppo or a library it "
                                  f"uses; {where})")  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
