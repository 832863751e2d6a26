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

from datasets import Dataset

from sppo_cli.config import RankConfig
from sppo_cli.data import (
    CHOSEN,
    CHOSEN_INDEX,
    CHOSEN_PROBS,
    CHOSEN_PROBS_LOSE,
    CHOSEN_PROBS_WIN,
    CHOSEN_TOKEN_IDS,
    FINISH_REASONS,
    PROBABILITY,
    PROMPT,
    REJECTED,
    REJECTED_INDEX,
    REJECTED_TOKEN_IDS,
    RESPONSE_TOKEN_IDS,
    RESPONSES,
    SAMPLED_CHAT_TEMPLATE,
    SAMPLED_VOCABULARY,
    SCORES,
    STOPPED,
    TRUNCATED,
    conversations,
    load_stage,
    sampled_chat_template,
    validate_generations,
)
from sppo_cli.errors import SppoError
from sppo_cli.logs import ProgressBar
from sppo_cli.rankers import Judgement, Ranker, check_inputs, load_ranker, preference_matrix, ranker_source, win_rates
from sppo_cli.stage import PER_ROW, SHARDS, Shard, StageRun, run_shards, run_stage, save_dataset

JUDGE_BATCH = 64  # prompts handed to the ranker at once


def ranking_row(prompt: list[dict[str, str]], responses: list[str], judgement: Judgement,
                candidates: list[int] | None = None) -> dict | None:  # fmt: skip
    """The training row for one prompt (its chat messages), or None when the responses that may be chosen or rejected
    (`candidates`, all by default) tie (no preference to learn). `chosen` and `rejected` are the whole conversation
    with the response as the assistant's last turn."""
    matrix, scores = preference_matrix(judgement, len(responses))
    rates = win_rates(matrix)
    order = scores if scores is not None else rates
    candidates = list(range(len(responses))) if candidates is None else candidates
    winner, loser = max(candidates, key=order.__getitem__), min(candidates, key=order.__getitem__)
    if order[winner] == order[loser]:
        return None
    return {
        CHOSEN: [*prompt, {"role": "assistant", "content": responses[winner]}],
        REJECTED: [*prompt, {"role": "assistant", "content": responses[loser]}],
        CHOSEN_PROBS: float(matrix[winner, loser]),
        CHOSEN_PROBS_WIN: float(rates[winner]),
        CHOSEN_PROBS_LOSE: float(rates[loser]),
        CHOSEN_INDEX: winner,
        REJECTED_INDEX: loser,
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


def rank_shard(ranker: Ranker, generations: Dataset, drop_truncated: bool, shard: Shard) -> dict:
    """The ranking row of each of one shard's prompts (None for a tied prompt, and with `drop_truncated` for one with
    fewer than two finished responses), and the counts."""
    rows, counted_before = [], ranker.stats()
    part = generations.select(range(shard.start, shard.stop))
    dropped = 0
    for prompt, responses, reasons, judgement in zip(conversations(part[:]), part[RESPONSES], finish_reasons(part),
                                                     judge(ranker, part)):  # fmt: skip
        finished = [i for i, reason in enumerate(reasons) if reason != TRUNCATED] if drop_truncated else None
        if finished is not None and len(finished) < 2:
            dropped += 1
            rows.append(None)
        else:
            rows.append(ranking_row(prompt, responses, judgement, finished))
    counts = {name: count - counted_before.get(name, 0) for name, count in ranker.stats().items()}
    return {PER_ROW: {"row": rows}, "tied_prompts": rows.count(None) - dropped, "dropped_truncated_prompts": dropped,
            "ranker": counts}  # fmt: skip


def finish_reasons(generations: Dataset) -> list[list[str]]:
    """Why each response ended; generations made before finish reasons were recorded count as stopped."""
    if FINISH_REASONS in generations.column_names:
        return generations[FINISH_REASONS]
    return [[STOPPED] * len(responses) for responses in generations[RESPONSES]]


@contextlib.contextmanager
def _judge(config: RankConfig, generations: Dataset) -> Iterator[Callable[[Shard], dict]]:
    yield functools.partial(rank_shard, load_ranker(config), generations, config.drop_truncated)


def rank_all(generations: Dataset, config: RankConfig, directory: Path) -> tuple[Dataset, dict]:
    """Rank every prompt, a shard at a time (shards already in `directory` are reused)."""
    with ProgressBar("rank", len(generations)) as bar:
        results = run_shards(directory, len(generations), functools.partial(_judge, config, generations), bar, config)
    # The shards hold only what ranking computed; every column of the generations is kept as it is.
    rows = {index: row for index, row in enumerate(row for result in results for row in result[PER_ROW]["row"])
            if row is not None}  # fmt: skip
    stats = {"prompts": len(generations), "pairs": len(rows),
             **{count: sum(r[count] for r in results) for count in ("tied_prompts", "dropped_truncated_prompts")}}
    if not rows:
        why = "had tied responses" if not stats["dropped_truncated_prompts"] else "had tied responses or fewer than " \
            "two finished ones (--drop-truncated)"  # fmt: skip
        raise SppoError(f"all {len(generations)} prompts {why}: nothing to train on")
    for result in results:
        for name, count in result["ranker"].items():
            stats[name] = stats.get(name, 0) + count
    indices = sorted(rows)
    rankings = generations.select(indices)
    for column in rows[indices[0]]:
        rankings = rankings.add_column(column, [rows[i][column] for i in indices])
    stats["pairs_with_truncated"] = sum(TRUNCATED in (reasons[chosen], reasons[rejected]) for reasons, chosen, rejected
                                        in zip(finish_reasons(rankings), rankings[CHOSEN_INDEX],
                                               rankings[REJECTED_INDEX]))  # fmt: skip
    return with_sampled_tokens(rankings), stats


def with_sampled_tokens(rankings: Dataset) -> Dataset:
    """With the chosen and rejected responses' sampled token ids, which training scores."""
    if RESPONSE_TOKEN_IDS not in rankings.column_names:  # generations made before token ids were kept
        return rankings
    ids, chosen, rejected = rankings[RESPONSE_TOKEN_IDS], rankings[CHOSEN_INDEX], rankings[REJECTED_INDEX]
    rankings = rankings.add_column(CHOSEN_TOKEN_IDS, [row[i] for row, i in zip(ids, chosen)])
    return rankings.add_column(REJECTED_TOKEN_IDS, [row[i] for row, i in zip(ids, rejected)])


def rank(generations: str, output: str | Path, config: RankConfig, overwrite: bool = False,
         verbose: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """Run the stage: returns the manifest and whether `output` was already this run's finished result."""
    data, sampled = load_stage(generations, "generate")
    data = validate_generations(data, generations)
    check_inputs(config, data)
    inputs = {"generations": generations, "ranker": ranker_source(config.ranker)}
    run = StageRun("rank", output, config, inputs, overwrite, input_types={"generations": "dataset"})

    def work(partial: Path) -> dict:
        rankings, stats = rank_all(data, config, partial / SHARDS)
        save_dataset(rankings, partial)
        return {"rows": len(rankings), **stats, SAMPLED_CHAT_TEMPLATE: sampled_chat_template(sampled),
                SAMPLED_VOCABULARY: sampled.get(SAMPLED_VOCABULARY)}  # fmt: skip

    return run_stage(run, work, verbose)
