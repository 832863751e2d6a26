"""Preference signals behind one interface, chosen by a `--ranker` spec:

  PATH_OR_HUB_ID                   a PairRM checkpoint (the paper's signal)
  reward-model:PATH_OR_HUB_ID      a scalar reward model (AutoModelForSequenceClassification): P = sigmoid(r_i - r_j)
  rule:math                        a math answer checker against the `--answer-column` reference
  python:package.module:function   a plug-in: fn(prompts, responses) -> per prompt K scores or a K x K matrix

A ranker judges the K responses of each prompt with either K scores (higher is better) or a K x K matrix of
P(i beats j); `preference_matrix` turns either into P.
"""

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from datasets import Dataset

from sppo_cli.config import RankerOptions, ranker_kind
from sppo_cli.errors import SppoError

Judgement = Sequence[float] | Sequence[Sequence[float]] | np.ndarray
RULES = ("rule:math",)


class Ranker(Protocol):
    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        """One judgement per row of `batch` (columns as lists: `prompt`, `responses`, and any other column)."""

    def stats(self) -> dict:
        """Counts worth keeping in the manifest (e.g. truncated responses)."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free, and exactly 1/2 at 0


def preference_matrix(judgement: Judgement, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """P (K x K) from a judgement, and the scores when the judgement was scores. The diagonal is 1/2."""
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
    """The estimate of P(y_i beats the current policy): (1/K) * sum_j P[i][j], the 1/2 diagonal included."""
    return matrix.mean(axis=1)


def ranker_source(spec: str) -> str | None:
    """What a ranker's judgements depend on besides its settings: a checkpoint, or a plug-in's source file."""
    if spec.startswith("python:"):
        from sppo_cli.rankers.plugin import plugin_source

        return plugin_source(spec)
    if spec.startswith("rule:"):
        if spec not in RULES:
            raise SppoError(f"unknown rule {spec!r} (choose from {', '.join(RULES)})")
        return None
    from sppo_cli.models import resolve_model

    checkpoint = spec.removeprefix("reward-model:")
    try:
        return resolve_model(checkpoint)
    except SppoError:
        kind = "reward model" if spec.startswith("reward-model:") else "PairRM checkpoint"
        raise SppoError(f"{kind} not found: there is no directory {checkpoint}") from None


def check_inputs(options: RankerOptions, data: Dataset) -> None:
    """What the ranker needs from the data, checked before any work: rule:math's reference answers."""
    if ranker_kind(options.ranker) == "rule:math":
        from sppo_cli.rankers.rule_math import check_references

        check_references(data, options.answer_column)


def load_ranker(options: RankerOptions) -> Ranker:
    """Build the ranker `options.ranker` names."""
    spec = options.ranker
    if spec.startswith("python:"):
        from sppo_cli.rankers.plugin import PluginRanker

        return PluginRanker(spec)
    if spec.startswith("rule:"):
        from sppo_cli.rankers.rule_math import MathRuleRanker

        return MathRuleRanker(options.answer_column)
    from sppo_cli.models import on_gpu

    # Long rows in big batches spill a CPU's caches (DeBERTa's attention grows with batch x tokens^2): measured in
    # bench/rank.py, pairs/s on a CPU fall from ~9 at 2 rows per forward pass to ~2 at 32. GPUs want big batches.
    batch_size = options.ranker_batch_size or (32 if on_gpu() else 2)
    if spec.startswith("reward-model:"):
        from sppo_cli.rankers.reward_model import RewardModelRanker

        return RewardModelRanker(spec.removeprefix("reward-model:"), batch_size, options.reward_max_length)
    from sppo_cli.rankers.pairrm import PairRMRanker

    return PairRMRanker(spec, options.probability_mode, batch_size, options.source_max_length,
                        options.candidate_max_length)  # fmt: skip
