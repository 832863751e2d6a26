"""Stage 4: did the iteration help? The model's responses judged against a baseline's, on held-out prompts.

Each side is a model, sampled here with the generation settings, or a finished `sppo generate` or `sppo eval` output
whose responses are reused (so the base model is sampled once, and an iteration is compared with the one before
without sampling either again). The i-th response of the model is judged against the i-th of the baseline by the
ranker, P(model beats baseline) (rankers/__init__.py); identical responses tie at 1/2 without asking it, so a model
judged against itself with the same seed scores exactly 1/2. The statistics are in metrics.py.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from datasets import Dataset

from sppo_cli.config import EvalConfig, RankerOptions
from sppo_cli.data import (
    CONVERSATION,
    GENERATED,
    MANIFEST,
    PER_RESPONSE,
    PROMPT,
    RESPONSE_TOKENS,
    RESPONSES,
    conversations,
    load_prompts,
    load_stage,
    published,
    read_manifest,
    sampled_chat_template,
)
from sppo_cli.errors import SppoError
from sppo_cli.generate import check_engine, sample
from sppo_cli.identity import template_fingerprint
from sppo_cli.logs import ProgressBar
from sppo_cli.metrics import length_controlled_win_rate, mean_interval, wilson_interval
from sppo_cli.models import resolve_model
from sppo_cli.rank import judge
from sppo_cli.rankers import check_inputs, load_ranker, preference_matrix, ranker_source
from sppo_cli.rankers.rule_math import is_correct
from sppo_cli.stage import PER_ROW, SHARDS, Shard, StageRun, run_shards, run_stage, save_dataset
from sppo_cli.tracking import log_metrics

BASELINE_RESPONSES = "baseline_responses"
BASELINE_RESPONSE_TOKENS = "baseline_response_tokens"
JUDGEMENTS = "judgements"  # P(model beats baseline), one per response pair
CORRECT, BASELINE_CORRECT = "correct", "baseline_correct"  # rule:math only
ROW = "row"  # the prompt's row, which aligns the two sides
_JUDGED = (BASELINE_RESPONSES, BASELINE_RESPONSE_TOKENS, JUDGEMENTS, CORRECT, BASELINE_CORRECT)
_SAMPLED = (*(c for c in GENERATED if c != CONVERSATION), *_JUDGED)  # CONVERSATION is kept: the prompt as messages


def read_responses(source: str, config: EvalConfig) -> Dataset | None:
    """The responses of a finished `sppo generate` or `sppo eval` output (the first `num_samples` per prompt), or
    None when `source` is a model to sample from. They must have been drawn the way this evaluation draws."""
    path = published(source) or Path(source)
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else {}
    if manifest.get("stage") not in ("generate", "eval"):  # a model: a hub id, a directory, or sppo train's output
        resolve_model(source)
        return None
    sampled = {**manifest.get("parameters", {}), "chat_template": sampled_chat_template(manifest)}
    wanted = {**config.distribution(), "system_prompt": config.system_prompt,
              "chat_template": template_fingerprint(config.chat_template)}  # fmt: skip
    changed = [f"{name} {sampled.get(name)!r}" for name, value in wanted.items() if sampled.get(name, value) != value]
    if changed:
        raise SppoError(f"{source} was sampled with {', '.join(changed)}: evaluate with the settings its responses "
                        "were drawn with, or sample it again")  # fmt: skip
    count = config.num_samples
    data = load_stage(source)[0]
    missing = [c for c in (PROMPT, RESPONSES, RESPONSE_TOKENS) if c not in data.column_names]
    if missing:
        raise SppoError(f"{source} has no {', '.join(missing)} column(s): re-generate it with this version of sppo")
    if CONVERSATION not in data.column_names:  # made before conversations: its prompts were one user turn each
        data = data.add_column(CONVERSATION, conversations({PROMPT: data[PROMPT]}))
    fewest = min(map(len, data[RESPONSES]))
    if fewest < count:
        raise SppoError(f"{source} has {fewest} response(s) for some prompt; --num-samples {count} needs {count}")
    data = data.remove_columns([c for c in (*_JUDGED, ROW) if c in data.column_names])  # an eval output's own
    per_response = [c for c in PER_RESPONSE if c in data.column_names]
    return data.map(lambda row: {c: row[c][:count] for c in per_response}, keep_in_memory=True)


def eval_prompts(model_side: Dataset | None, baseline_side: Dataset | None, prompts: str | None,
                 config: EvalConfig) -> Dataset:  # fmt: skip
    """The prompts both sides answer: those of a side that was already sampled, or --prompts."""
    sampled = [side for side in (model_side, baseline_side) if side is not None]
    given = None
    if prompts is not None:
        given = load_prompts(prompts, config.split, config.prompt_column, config.limit, config.system_prompt)
    if not sampled:
        if given is None:
            raise SppoError("--prompts is needed when both --model and --baseline are models")
        data = given
    else:
        data = sampled[0].remove_columns([c for c in _SAMPLED if c in sampled[0].column_names])
        others = [(side, "the other side") for side in sampled[1:]]
        others += [(given, "--prompts")] if given is not None else []
        for other, name in others:  # the same conversations, system turns included
            if other[CONVERSATION] != data[CONVERSATION]:
                raise SppoError(f"the responses to compare answer other conversations than {name}: evaluate "
                                "both sides on the same prompts, with the same system prompt")  # fmt: skip
    return data.add_column(ROW, list(range(len(data))))


def judge_pair_shard(ranker, comparisons: Dataset, shard: Shard) -> dict:
    """P(model beats baseline) for each comparison of the shard; identical responses tie without the ranker."""
    part = comparisons.select(range(shard.start, shard.stop))
    different = [i for i, pair in enumerate(part[RESPONSES]) if pair[0] != pair[1]]
    probabilities = [0.5] * len(part)
    if different:
        for i, judgement in zip(different, judge(ranker(), part.select(different))):
            matrix = preference_matrix(judgement, 2)[0]
            # both of a matrix's entries: a judge biased towards the first position is biased in both directions
            probabilities[i] = float(0.5 * (matrix[0, 1] + 1 - matrix[1, 0]))
    return {PER_ROW: {"p": probabilities}}


@contextlib.contextmanager
def _judge(options: RankerOptions, comparisons: Dataset) -> Iterator[Callable[[Shard], dict]]:
    loaded = functools.cache(lambda: load_ranker(options))  # only loaded if some response pair differs
    yield functools.partial(judge_pair_shard, loaded, comparisons)


def compare(model_side: Dataset, baseline_side: Dataset, config: EvalConfig, directory: Path) -> Dataset:
    """The prompts both sides answered, with both sides' responses and the judgement of each pair."""
    baseline_side = baseline_side.select_columns([ROW, RESPONSES, RESPONSE_TOKENS])
    rows = {row: i for i, row in enumerate(baseline_side[ROW])}
    model_side = model_side.filter(lambda row: row[ROW] in rows, keep_in_memory=True)  # both answered it
    baseline_side = baseline_side.select([rows[row] for row in model_side[ROW]])
    evaluated = model_side.add_column(BASELINE_RESPONSES, baseline_side[RESPONSES])
    evaluated = evaluated.add_column(BASELINE_RESPONSE_TOKENS, baseline_side[RESPONSE_TOKENS])
    pairs = [{**{c: row[c] for c in row if c not in _SAMPLED}, RESPONSES: [mine, theirs]}
             for row in evaluated for mine, theirs in zip(row[RESPONSES], row[BASELINE_RESPONSES])]  # fmt: skip
    comparisons = Dataset.from_list(pairs)
    with ProgressBar("judge", len(comparisons), unit="pair") as bar:
        shards = run_shards(directory, len(comparisons), functools.partial(_judge, config, comparisons), bar, config)
    probabilities = iter(p for shard in shards for p in shard[PER_ROW]["p"])
    judgements = [[next(probabilities) for _ in row] for row in evaluated[RESPONSES]]
    return evaluated.add_column(JUDGEMENTS, judgements)


def add_correctness(evaluated: Dataset, answer_column: str) -> Dataset:
    """Whether each response of both sides is right (the references were checked before any work)."""
    for column, responses in ((CORRECT, RESPONSES), (BASELINE_CORRECT, BASELINE_RESPONSES)):
        flags = [[is_correct(r, str(answer)) for r in row] for row, answer in
                 zip(evaluated[responses], evaluated[answer_column])]  # fmt: skip
        evaluated = evaluated.add_column(column, flags)
    return evaluated


def summarize(evaluated: Dataset) -> dict:
    """The metrics of metrics.py from the per-prompt judgements (and correctness, with rule:math)."""
    judgements = evaluated[JUDGEMENTS]
    flat = np.array([p for row in judgements for p in row])

    def flatten(column: str, measure=lambda value: value) -> np.ndarray:
        return np.array([measure(value) for row in evaluated[column] for value in row], dtype=np.float64)

    metrics = {
        "win_rate": float(flat.mean()),
        "win_rate_ci": list(mean_interval(np.array([np.mean(row) for row in judgements]))),
        "lc_win_rate": length_controlled_win_rate(flat, flatten(RESPONSES, len), flatten(BASELINE_RESPONSES, len)),
        "ties": int(np.sum(flat == 0.5)),
        "mean_length": float(flatten(RESPONSE_TOKENS).mean()),
        "baseline_mean_length": float(flatten(BASELINE_RESPONSE_TOKENS).mean()),
    }
    for prefix, column in (("", CORRECT), ("baseline_", BASELINE_CORRECT)):
        if column in evaluated.column_names:
            per_prompt = [np.mean(row) for row in evaluated[column]]
            metrics[f"{prefix}accuracy"] = float(np.mean([c for row in evaluated[column] for c in row]))
            metrics[f"{prefix}accuracy_ci"] = list(wilson_interval(float(np.sum(per_prompt)), len(per_prompt)))
    return metrics


def evaluate(model: str, baseline: str, prompts: str | None, output: str | Path, config: EvalConfig,
             overwrite: bool = False, verbose: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """Run the stage: returns the manifest (its `metrics`) and whether `output` was already this run's result."""
    config = check_engine(config)
    model_side = read_responses(model, config)
    baseline_side = read_responses(baseline, config)
    data = eval_prompts(model_side, baseline_side, prompts, config)
    check_inputs(config, data)
    inputs = {"model": model, "baseline": baseline, "prompts": prompts, "ranker": ranker_source(config.ranker)}
    kinds = {"prompts": "dataset", "model": "model" if model_side is None else "dataset",
             "baseline": "model" if baseline_side is None else "dataset"}  # fmt: skip
    run = StageRun("eval", output, config, inputs, overwrite, input_types=kinds)

    def sides(partial: Path) -> tuple[Dataset, Dataset]:
        if model_side is not None:
            sampled = {model: _with_rows(model_side, data)}
        else:
            sampled = {model: sample(model, data, config, partial / SHARDS / "model", "sample model")[0]}
        if baseline not in sampled:  # a model judged against itself is sampled once
            sampled[baseline] = (_with_rows(baseline_side, data) if baseline_side is not None else
                                 sample(baseline, data, config, partial / SHARDS / "baseline", "sample baseline")[0])
        return sampled[model], sampled[baseline]

    def work(partial: Path) -> dict:
        evaluated = compare(*sides(partial), config, partial / SHARDS / "judge")
        if config.ranker == "rule:math":
            evaluated = add_correctness(evaluated, config.answer_column)
        save_dataset(evaluated, partial)
        metrics = summarize(evaluated)
        log_metrics(partial, metrics, config.report_to, config.run_name, config.record())
        return {"rows": len(evaluated), "prompts": len(data), "comparisons": len(evaluated) * config.num_samples,
                "metrics": metrics}  # fmt: skip

    return run_stage(run, work, verbose)


def _with_rows(side: Dataset, prompts: Dataset) -> Dataset:
    """A side that was sampled already, on exactly these prompts (eval_prompts checked), row by row."""
    return side.add_column(ROW, prompts[ROW])
