"""Command-line options built from the settings dataclasses (config.py), and `--config` recipes.

A stage command's options are its settings' fields, each named `--field-name`, with the field's help and default;
its `--config` recipe section takes the same names (`field_name`), so a recipe can set exactly what the flags can.
"""

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from sppo_cli.config import PushConfig, Settings
from sppo_cli.errors import SppoError, first_line

console = Console(stderr=True)
_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _read_config(ctx: typer.Context, path: Path | None) -> Path | None:
    """Defaults for this command from the `<command>:` section of a YAML recipe; flags given still win."""
    if path is None:
        return None
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SppoError(f"cannot read the recipe {path}: {first_line(error)}") from error
    section = recipe.get(ctx.command.name) or {} if isinstance(recipe, dict) else None
    if not isinstance(section, dict):
        raise SppoError(f"{path}: `{ctx.command.name}:` must be a mapping of option names to values")
    known = {spec.name: spec for spec in dataclasses.fields(ctx.command.callback.settings)}  # inputs, --output
    defaults = {key.replace("-", "_"): value for key, value in section.items()}  # and --overwrite stay explicit
    unknown = sorted(set(defaults) - set(known))
    if unknown:
        raise SppoError(f"{path}: unknown option(s) for `sppo {ctx.command.name}`: {', '.join(unknown)}")
    for name, value in defaults.items():
        if not _is_a(known[name].type, value):
            raise SppoError(f"{path}: `{ctx.command.name}: {name}:` must be {_describe(known[name].type)}, got "
                            f"{value!r}")  # fmt: skip
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def _is_a(kind: Any, value: Any) -> bool:
    """Whether a recipe's value fits a settings field's type (typer would report it as the flag's, not the recipe's)."""
    if get_origin(kind) in (Union, UnionType):
        return any(_is_a(member, value) for member in get_args(kind))
    if get_origin(kind) is Literal:
        return value in get_args(kind)
    if get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if kind is float:  # YAML reads 5e-7 (no dot) as a string
        return isinstance(value, (int, float, str)) and not isinstance(value, bool) and _is_number(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if kind is type(None) else isinstance(value, kind)


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def _describe(kind: Any) -> str:
    if get_origin(kind) in (Union, UnionType):
        return " or ".join(_describe(member) for member in get_args(kind))
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "empty (null)"}
    return "a list of strings" if get_origin(kind) is list else names[kind]


def parameter(name: str, kind: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, _KEYWORD, default=default, annotation=kind)


def required(name: str, help: str) -> inspect.Parameter:
    """A required `--name` option naming an input."""
    return parameter(name, Annotated[str, typer.Option(help=help)])


CONFIG = parameter("config", Annotated[Path | None, typer.Option(
    help="YAML recipe: its `<command>:` section sets defaults (same names as the flags); flags override.",
    is_eager=True, callback=_read_config)], None)  # fmt: skip
OUTPUT = parameter("output", Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")])
OVERWRITE = parameter("overwrite", Annotated[bool, typer.Option(
    help="Replace --output, or discard an interrupted run's finished part, made with other settings.")], False)
VERBOSE = parameter("verbose", Annotated[bool, typer.Option(
    help="Show the libraries' own output in the terminal too (it always goes to the log).")], False)
PUSH_TO_HUB = parameter("push_to_hub", Annotated[str | None, typer.Option(
    help="Then publish the output to this hub repository (ORG/NAME); see `sppo push`.")], None)
PUBLIC = parameter("public", Annotated[bool, typer.Option(
    help="With --push-to-hub: publish openly; repositories are private otherwise.")], False)


def option(spec: dataclasses.Field) -> inspect.Parameter:
    """The `--field-name` option of a settings field."""
    flag = "--" + spec.name.replace("_", "-")
    names = [f"{flag}/--no-{flag[2:]}"] if spec.type in (bool, bool | None) else [flag]
    if spec.metadata.get("alias"):
        names.append(spec.metadata["alias"])
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    help = f"{spec.metadata['help']} (recipe: {spec.name})"
    return parameter(spec.name, Annotated[spec.type, typer.Option(*names, help=help)], default)


def settings_command(settings: type[Settings], *arguments: inspect.Parameter,
                     after: tuple[inspect.Parameter, ...] = ()) -> Callable[[Callable], Callable]:  # fmt: skip
    """Turn `run(config, *arguments, *after)` into a command whose options are the arguments, `--config`, one option
    per settings field, then `after`."""
    names = [spec.name for spec in dataclasses.fields(settings)]

    def decorate(run: Callable) -> Callable:
        def command(**values):
            values.pop("config")  # the recipe, already read into the defaults
            return run(settings(**{name: values.pop(name) for name in names}), **values)

        options = [option(spec) for spec in dataclasses.fields(settings)]
        command.__signature__ = inspect.Signature([*arguments, CONFIG, *options, *after])
        command.__name__, command.__doc__ = run.__name__, run.__doc__
        command.settings = settings
        return command

    return decorate


def stage_command(settings: type[Settings], *inputs: inspect.Parameter, output: inspect.Parameter = OUTPUT,
                  publishable: bool = True) -> Callable[[Callable], Callable]:  # fmt: skip
    """Turn `run(config, *inputs, output, overwrite, verbose)` into a command whose options are the inputs,
    `--output`, `--config`, one option per settings field, `--overwrite`, `--verbose` and, for the stages whose output
    may be published, `--push-to-hub` and `--public` (the output is pushed once it is finished)."""

    def decorate(run: Callable) -> Callable:
        def run_and_publish(config: Settings, push_to_hub: str | None = None, public: bool = False, **values):
            result = run(config, **values)
            if push_to_hub:
                from sppo_cli.hub import push

                done(f"{values['output']}: {push(values['output'], push_to_hub, PushConfig(public=public))}")
            return result

        run_and_publish.__name__, run_and_publish.__doc__ = run.__name__, run.__doc__
        publishing = (PUSH_TO_HUB, PUBLIC) if publishable else ()
        return settings_command(settings, *inputs, output, after=(OVERWRITE, VERBOSE, *publishing))(run_and_publish)

    return decorate


def report(output: Path, already_done: bool, summary: str) -> None:
    """The stage's one summary line."""
    if already_done:
        summary = "already done with these settings and inputs; nothing to do (--overwrite to redo it)"
    done(f"{output}: {summary}")


def done(text: str) -> None:
    """A line saying what was done; `text` (paths, values) is printed as it is, never read as markup."""
    console.print("[green]✓[/green] " + escape(text), soft_wrap=True, highlight=False)


def failed(kind: str, text: str) -> None:
    """`sppo: error: ...` and the like, one line; `text` is printed as it is, never read as markup."""
    console.print(f"[red]sppo: {kind}[/red] " + escape(text), soft_wrap=True, highlight=False)
