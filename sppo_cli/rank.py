"""Stage 2: judge the K responses of each prompt and turn the judgement into SPPO's training signal.

From a ranker's judgement of a prompt's K responses (rankers/__init__.py), per the paper and the published code:
  P[i][j]  = sigmoid(s_i - s_j) for scores, the matrix itself otherwise; the diagonal is 1/2
  win rate = (1/K) * sum_j P[i][j]          (the estimate of P(y_i beats the current policy))
  winner w = argmax, loser l = argmin       (of the scores, or of the win rates for a matrix)
  chosen_probs = P[w][l], chosen_probs_win = win rate of w, chosen_probs_lose = win rate of l
Prompts are judged a shard at a time (stage.py): an interrupted run resumes after its finished shards.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from datasets import Dataset

from sppo_cli.config import RankConfig, RankerOptions
from sppo_cli.data import (
    CHOSEN,
    CHOSEN_PROBS,
    CHOSEN_PROBS_LOSE,
    CHOSEN_PROBS_WIN,
    PROBABILITY,
    PROMPT,
    REJECTED,
    RESPONSES,
    SAMPLED_CHAT_TEMPLATE,
    SCORES,
    conversations,
    load_stage,
    sampled_chat_template,
    validate_generations,
)
from sppo_cli.errors import SppoError
from sppo_cli.logs import ProgressBar
from sppo_cli.rankers import Judgement, Ranker, load_ranker, preference_matrix, ranker_source, win_rates
from sppo_cli.stage import SHARDS, Shard, StageRun, run_shards, run_stage, save_dataset

JUDGE_BATCH = 64  # prompts handed to the ranker at once


def ranking_row(prompt: list[dict[str, str]], responses: list[str], judgement: Judgement) -> dict | None:
    """The training row for one prompt (its chat messages), or None when all K responses tie (no preference to
    learn). `chosen` and `rejected` are the whole conversation with the response as the assistant's last turn."""
    matrix, scores = preference_matrix(judgement, len(responses))
    rates = win_rates(matrix)
    order = scores if scores is not None else rates
    winner, loser = int(np.argmax(order)), int(np.argmin(order))
    if order[winner] == order[loser]:
        return None
    return {
        CHOSEN: [*prompt, {"role": "assistant", "content": responses[winner]}],
        REJECTED: [*prompt, {"role": "assistant", "content": responses[loser]}],
        CHOSEN_PROBS: float(matrix[winner, loser]),
        CHOSEN_PROBS_WIN: float(rates[winner]),
        CHOSEN_PROBS_LOSE: float(rates[loser]),
        SCORES: (scores if scores is not None else rates).tolist(),
        PROBABILITY: matrix.tolist(),
    }


def judge(ranker: Ranker, generations: Dataset) -> list[Judgement]:
    """The ranker's judgement of every row, JUDGE_BATCH prompts at a time."""
    judgements = []
    for start in range(0, len(generations), JUDGE_BATCH):
        batch = generations[start : start + JUDGE_BATCH]
        batch_judgements = ranker.judge(batch)
        if len(batch_judgements) != len(batch[PROMPT]):
            raise SppoError(f"the ranker returned {len(batch_judgements)} judgements for {len(batch[PROMPT])} prompts")
        judgements += batch_judgements
    return judgements


def rank_shard(ranker: Ranker, generations: Dataset, shard: Shard) -> dict:
    """The ranking columns of one shard's prompts, by row (tied prompts left out), and the ranker's counts."""
    rows, counted_before = {}, ranker.stats()
    part = generations.select(range(shard.start, shard.stop))
    for index, prompt, responses, judgement in zip(range(shard.start, shard.stop), conversations(part[:]),
                                                   part[RESPONSES], judge(ranker, part)):  # fmt: skip
        row = ranking_row(prompt, responses, judgement)
        if row is not None:
            rows[index] = row
    counts = {name: count - counted_before.get(name, 0) for name, count in ranker.stats().items()}
    return {"rows": rows, "tied_prompts": shard.size - len(rows), "ranker": counts}


@contextlib.contextmanager
def _judge(options: RankerOptions, generations: Dataset) -> Iterator[Callable[[Shard], dict]]:
    yield functools.partial(rank_shard, load_ranker(options), generations)


def rank_all(generations: Dataset, config: RankConfig, directory: Path) -> tuple[Dataset, dict]:
    """Rank every prompt, a shard at a time (shards already in `directory` are reused)."""
    with ProgressBar("rank", len(generations)) as bar:
        results = run_shards(directory, len(generations), config.shard_size, functools.partial(_judge, config,
                             generations), bar, config.data_parallel_size)  # fmt: skip
    # The shards hold only what ranking computed; every column of the generations is kept as it is.
    rows = {int(index): row for result in results for index, row in result["rows"].items()}
    if not rows:
        raise SppoError(f"all {len(generations)} prompts had tied responses: nothing to train on")
    stats = {"prompts": len(generations), "pairs": len(rows), "tied_prompts": sum(r["tied_prompts"] for r in results)}
    for result in results:
        for name, count in result["ranker"].items():
            stats[name] = stats.get(name, 0) + count
    indices = sorted(rows)
    rankings = generations.select(indices)
    for column in rows[indices[0]]:
        rankings = rankings.add_column(column, [rows[i][column] for i in indices])
    return rankings, stats


def rank(generations: str, output: str | Path, config: RankConfig, overwrite: bool = False,
         verbose: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """Run the stage: returns the manifest and whether `output` was already this run's finished result."""
    data, sampled = load_stage(generations, "generate")
    data = validate_generations(data, generations)
    inputs = {"generations": generations, "ranker": ranker_source(config.ranker)}
    run = StageRun("rank", output, config, inputs, overwrite, input_types={"generations": "dataset"})

    def work(partial: Path) -> dict:
        rankings, stats = rank_all(data, config, partial / SHARDS)
        save_dataset(rankings, partial)
        return {"rows": len(rankings), **stats, SAMPLED_CHAT_TEMPLATE: sampled_chat_template(sampled)}

    return run_stage(run, work, verbose)
