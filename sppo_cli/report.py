"""The per-iteration report of one or more pipeline runs: `report.md` (a table) and `report.png` (four plots), read
from the stages' manifests alone, so it can be rebuilt at any time.

A pipeline run's directory (pipeline.sh) holds `iter0/eval` (the base model judged against itself: its responses are
every later evaluation's baseline) and, per iteration t, `iter{t}/{generations,rankings,model,eval,eval-previous}`:
`eval` judges model t against the base model, `eval-previous` against model t-1.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sppo_cli.data import MANIFEST
from sppo_cli.errors import SppoError
from sppo_cli.stage import atomic_write

STAGES = ("generations", "rankings", "model", "eval", "eval-previous")


@dataclass
class Iteration:
    number: int
    manifests: dict[str, dict] = field(default_factory=dict)  # by stage directory name
    losses: list[float] = field(default_factory=list)

    def metric(self, stage: str, name: str):
        return self.manifests.get(stage, {}).get("metrics", {}).get(name)


def read_run(directory: Path) -> list[Iteration]:
    """The finished stages of each iteration of a pipeline run, base model first."""
    if not directory.is_dir():
        raise SppoError(f"{directory}: no such directory")
    iterations = []
    numbered = [(int(match[1]), path) for path in directory.iterdir()
                if (match := re.fullmatch(r"iter(\d+)", path.name))]  # fmt: skip
    for number, path in sorted(numbered):
        iteration = Iteration(number)
        for stage in STAGES:
            file = path / stage / MANIFEST
            manifest = json.loads(file.read_text()) if file.is_file() else {}
            if manifest.get("complete"):
                iteration.manifests[stage] = manifest
        history = path / "model" / "log_history.json"
        if "model" in iteration.manifests and history.is_file():
            iteration.losses = [entry["loss"] for entry in json.loads(history.read_text()) if "loss" in entry]
        if iteration.manifests:
            iterations.append(iteration)
    if not iterations:
        raise SppoError(f"{directory} holds no finished iteration (iter0/eval, iter1/..., as pipeline.sh writes them)")
    return iterations


def vs_previous(iteration: Iteration) -> str:
    """Iteration 1's previous model is the base model: its comparison is the one against the base."""
    return "eval-previous" if iteration.number > 1 else "eval"


def table(name: str, iterations: list[Iteration]) -> str:
    has_accuracy = any(it.metric("eval", "accuracy") is not None for it in iterations)
    columns = ["iteration", "win rate vs base [95% CI]", "LC win rate vs base", "win rate vs previous [95% CI]"]
    columns += ["held-out accuracy [95% CI]"] if has_accuracy else []
    columns += ["mean length (tokens)", "final train loss", "log-ratios toward targets", "seconds in generate / rank / "
                "train / eval"]  # fmt: skip
    lines = [f"### {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for it in iterations:
        base = it.number == 0
        cells = [str(it.number) + (" (base)" if base else "")]
        cells += ["0.500 (itself)" if base else _with_interval(it, "eval", "win_rate")]
        cells += ["" if base else _number(it.metric("eval", "lc_win_rate"))]
        cells += ["" if base else _with_interval(it, vs_previous(it), "win_rate")]
        if has_accuracy:
            cells += [_with_interval(it, "eval", "accuracy")]
        cells += [_number(it.metric("eval", "mean_length"), 1)]
        cells += [_number(it.manifests.get("model", {}).get("final_loss"), 4, general=True)]
        progress = it.manifests.get("model", {}).get("final_progress") or {}
        toward = progress.get("logratios/toward_target")
        cells += ["–" if toward is None else f"{toward:.0%}"]
        seconds = [it.manifests.get(stage, {}).get("seconds") for stage in ("generations", "rankings", "model")]
        evals = [it.manifests[s]["seconds"] for s in ("eval", "eval-previous") if s in it.manifests]
        cells += ["" if base else " / ".join(_number(s, 0) for s in [*seconds, sum(evals) if evals else None])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value, digits: int = 3, general: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if general else f"{value:.{digits}f}"


def _with_interval(it: Iteration, stage: str, name: str) -> str:
    value, interval = it.metric(stage, name), it.metric(stage, f"{name}_ci")
    if value is None:
        return "–"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def plot(runs: dict[str, list[Iteration]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_accuracy = any(it.metric("eval", "accuracy") is not None for its in runs.values() for it in its)
    figure, ((wins, second), (lengths, losses)) = plt.subplots(2, 2, figsize=(12, 8.5))
    for color, (name, iterations) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        label = f"{name}: " if len(runs) > 1 else ""
        evaluated = [it for it in iterations if "eval" in it.manifests]
        steps = [it.number for it in evaluated]
        _errorbars(wins, evaluated, "eval", "win_rate", color, f"{label}vs base", base_value=0.5)
        wins.plot(steps, [0.5 if it.number == 0 else it.metric("eval", "lc_win_rate") for it in evaluated], "--",
                  color=color, alpha=0.6, label=f"{label}LC vs base")  # fmt: skip
        later = [it for it in evaluated if it.number > 0 and vs_previous(it) in it.manifests]
        if later:
            _errorbars(wins, later, None, "win_rate", color, f"{label}vs previous", marker="s", linestyle=":")
        if has_accuracy:
            _errorbars(second, evaluated, "eval", "accuracy", color, name)
        lengths.plot(steps, [it.metric("eval", "mean_length") for it in evaluated], "o-", color=color,
                     label=f"{label}model")  # fmt: skip
        lengths.plot(steps, [it.metric("eval", "baseline_mean_length") for it in evaluated], ":", color=color,
                     alpha=0.6, label=f"{label}base model")  # fmt: skip
        _loss_curves(losses, iterations, color, name)
    wins.axhline(0.5, color="grey", linewidth=0.8)
    wins.set(title="Win rate against the base model and the previous one (95% CI)", xlabel="iteration",
             ylabel="P(model beats baseline)")  # fmt: skip
    second.set(title="Held-out accuracy (95% CI)" if has_accuracy else "", xlabel="iteration", ylabel="accuracy")
    if not has_accuracy:
        second.axis("off")
    lengths.set(title="Mean response length", xlabel="iteration", ylabel="tokens")
    highest = max((y for line in lengths.get_lines() for y in line.get_ydata() if y is not None), default=0)
    lengths.set_ylim(0, 1.2 * highest or None)  # from zero, with room above lengths that hardly change
    losses.set(title="Training loss", xlabel="optimizer step (all iterations)", ylabel="loss (each run's --loss)")
    for axes in (wins, second, lengths):
        axes.set_xticks(sorted({it.number for its in runs.values() for it in its}))
    for axes in (wins, second, lengths, losses):
        if axes.get_legend_handles_labels()[0] and (axes in (wins, lengths, losses) or len(runs) > 1):
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _errorbars(axes, iterations: list[Iteration], stage: str | None, name: str, color: str, label: str,
               base_value: float | None = None, **style) -> None:  # fmt: skip
    numbers, values, lows, highs = [], [], [], []
    for it in iterations:
        source = stage or vs_previous(it)
        value, interval = it.metric(source, name), it.metric(source, f"{name}_ci")
        if it.number == 0 and base_value is not None:
            value, interval = base_value, [base_value, base_value]
        if value is None or interval is None:  # a run without this metric (no rule:math, say)
            continue
        numbers.append(it.number)
        values.append(value)
        lows.append(value - interval[0])
        highs.append(interval[1] - value)
    if numbers:
        axes.errorbar(numbers, values, yerr=[lows, highs], capsize=4, color=color, label=label,
                      **({"marker": "o", "linestyle": "-"} | style))  # fmt: skip


def _loss_curves(axes, iterations: list[Iteration], color: str, name: str) -> None:
    start = 0
    for it in iterations:
        if it.losses:
            steps = range(start + 1, start + len(it.losses) + 1)
            axes.plot(steps, it.losses, color=color, alpha=0.5 + 0.5 * it.number / max(1, iterations[-1].number),
                      label=f"{name} iteration {it.number}")  # fmt: skip
            start += len(it.losses)


def write_report(directories: list[Path], output: Path | None = None) -> tuple[Path, Path]:
    """Write report.md and report.png for the pipeline runs into `output` (the first run's directory by default)."""
    names = [directory.resolve().name for directory in directories]
    names = [name if names.count(name) == 1 else str(directory) for name, directory in zip(names, directories)]
    runs = {name: read_run(directory) for name, directory in zip(names, directories)}
    output = output or directories[0]
    output.mkdir(parents=True, exist_ok=True)
    markdown, picture = output / "report.md", output / "report.png"
    text = "# SPPO report\n\n" + "\n\n".join(table(name, its) for name, its in runs.items()) + "\n\n![](report.png)\n"
    atomic_write(markdown, lambda path: path.write_text(text))
    atomic_write(picture, lambda path: plot(runs, path))
    return markdown, picture
