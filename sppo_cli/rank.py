"""Stage 2: judge the K responses of each prompt and turn the judgement into SPPO's training signal.

A ranker judges a prompt's K responses with either K scores (higher is better) or a K x K matrix of
P(i beats j). From it (SPPO_REFERENCE.md section 2):
  P[i][j]  = sigmoid(s_i - s_j) for scores, the matrix itself otherwise; the diagonal is 1/2
  win rate = (1/K) * sum_j P[i][j]          (the estimate of P(y_i beats the current policy))
  winner w = argmax, loser l = argmin       (of the scores, or of the win rates for a matrix)
  chosen_probs = P[w][l], chosen_probs_win = win rate of w, chosen_probs_lose = win rate of l
"""

import functools
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from sppo_cli.data import (
    CHOSEN,
    CHOSEN_PROBS,
    CHOSEN_PROBS_LOSE,
    CHOSEN_PROBS_WIN,
    PROBABILITY,
    PROMPT,
    REJECTED,
    RESPONSES,
    SCORES,
)
from sppo_cli.errors import SppoError
from sppo_cli.parallel import run_workers

Judgement = Sequence[float] | Sequence[Sequence[float]] | np.ndarray


class Ranker(Protocol):
    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        """One judgement per row of `batch` (columns as lists: `prompt`, `responses`, and any other column)."""

    def stats(self) -> dict:
        """Counts worth keeping in the manifest (e.g. truncated responses)."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free, and exactly 1/2 at 0


def preference_matrix(judgement: Judgement, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """P (K x K) from a judgement, and the scores when the judgement was scores."""
    values = np.asarray(judgement, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise SppoError(f"the ranker returned a non-finite value: {values.tolist()}")
    if values.shape == (k,):
        return sigmoid(values[:, None] - values[None, :]), values
    if values.shape == (k, k):
        if values.min() < 0 or values.max() > 1:
            raise SppoError("the ranker returned a preference matrix with values outside [0, 1]")
        matrix = values.copy()
        np.fill_diagonal(matrix, 0.5)
        return matrix, None
    raise SppoError(f"the ranker returned shape {values.shape} for {k} responses; expected ({k},) or ({k}, {k})")


def win_rates(matrix: np.ndarray) -> np.ndarray:
    return matrix.mean(axis=1)


def ranking_row(prompt: str, responses: list[str], judgement: Judgement) -> dict | None:
    """The training row for one prompt, or None when all K responses tie (no preference to learn)."""
    matrix, scores = preference_matrix(judgement, len(responses))
    rates = win_rates(matrix)
    order = scores if scores is not None else rates
    winner, loser = int(np.argmax(order)), int(np.argmin(order))
    if order[winner] == order[loser]:
        return None
    return {
        CHOSEN: conversation(prompt, responses[winner]),
        REJECTED: conversation(prompt, responses[loser]),
        CHOSEN_PROBS: float(matrix[winner, loser]),
        CHOSEN_PROBS_WIN: float(rates[winner]),
        CHOSEN_PROBS_LOSE: float(rates[loser]),
        SCORES: (scores if scores is not None else rates).tolist(),
        PROBABILITY: matrix.tolist(),
    }


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def judge_all(generations: Dataset, ranker: Ranker, progress: Callable[[int], None], batch_size: int = 64) -> dict:
    """Judge every prompt: the ranking rows (tied prompts left out), the tie count and the ranker's counts."""
    rows, ties = [], 0
    for start in range(0, len(generations), batch_size):
        batch = generations[start : start + batch_size]
        judgements = ranker.judge(batch)
        if len(judgements) != len(batch[PROMPT]):
            raise SppoError(f"the ranker returned {len(judgements)} judgements for {len(batch[PROMPT])} prompts")
        for index, judgement in enumerate(judgements):
            extra = {c: batch[c][index] for c in batch if c not in (PROMPT, RESPONSES)}
            row = ranking_row(batch[PROMPT][index], batch[RESPONSES][index], judgement)
            if row is None:
                ties += 1
            else:
                rows.append({PROMPT: batch[PROMPT][index], RESPONSES: batch[RESPONSES][index], **extra, **row})
        progress(len(judgements))
    return {"rows": rows, "tied_prompts": ties, "ranker": ranker.stats()}


def _judge_slice(make_ranker: Callable[[], Ranker], directory: Path, job: tuple[int, Dataset], progress) -> None:
    index, generations = job
    result = judge_all(generations, make_ranker(), progress)
    (directory / f"{index:06d}.json").write_text(json.dumps(result))


def rank(generations: Dataset, make_ranker: Callable[[], Ranker], data_parallel_size: int = 1) -> tuple[Dataset, dict]:
    """Judge every prompt's responses, on `data_parallel_size` workers (one per GPU) each building its own ranker.

    Returns the rankings, in prompt order, with prompts whose responses all tie left out, and the run's counts.
    """
    if data_parallel_size < 1:
        raise SppoError(f"--data-parallel-size must be at least 1, got {data_parallel_size}")
    workers = min(data_parallel_size, len(generations))
    with tqdm(total=len(generations), desc="rank", unit="prompt") as bar:
        if workers <= 1:
            results = [judge_all(generations, make_ranker(), bar.update)]
        else:
            with tempfile.TemporaryDirectory() as directory:
                slices = [(i, generations.shard(workers, i, contiguous=True)) for i in range(workers)]
                run_workers(functools.partial(_judge_slice, make_ranker, Path(directory)), slices, bar.update)
                results = [json.loads(path.read_text()) for path in sorted(Path(directory).glob("*.json"))]
    rows = [row for result in results for row in result["rows"]]
    if not rows:
        raise SppoError(f"all {len(generations)} prompts had tied responses: nothing to train on")
    stats = {"prompts": len(generations), "pairs": len(rows), "tied_prompts": sum(r["tied_prompts"] for r in results)}
    for result in results:
        for name, count in result["ranker"].items():
            stats[name] = stats.get(name, 0) + count
    return Dataset.from_list(rows), stats
