"""Preference signals behind one interface (`sppo_cli.rank.Ranker`), chosen by a `--ranker` spec:

  PATH_OR_HUB_ID                   a PairRM checkpoint (the default signal of the paper)
  python:package.module:function   a plug-in: fn(prompts, responses) -> per prompt K scores or a K x K matrix
"""

import importlib
import sys
from collections.abc import Callable

import numpy as np

from sppo_cli.data import PROMPT, RESPONSES
from sppo_cli.errors import SppoError
from sppo_cli.pairrm import PairRM, pairwise_probabilities, scores_from_logits
from sppo_cli.rank import Judgement, Ranker

PROBABILITY_MODES = ("scores", "pairwise")


class PluginRanker:
    """A user function called with (prompts: list[str], responses: list[list[str]])."""

    def __init__(self, spec: str):
        self.spec = spec
        self.function = _import_function(spec.removeprefix("python:"))

    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        try:
            judgements = self.function(batch[PROMPT], batch[RESPONSES])
        except Exception as error:
            raise SppoError(f"the plug-in ranker {self.spec} failed: {type(error).__name__}: {error}") from error
        if not isinstance(judgements, (list, tuple, np.ndarray)):
            raise SppoError(f"the plug-in ranker {self.spec} must return a list, got {type(judgements).__name__}")
        return list(judgements)

    def stats(self) -> dict:
        return {}


def _import_function(target: str) -> Callable:
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise SppoError(f"plug-in rankers are written python:package.module:function, got python:{target}")
    if "" not in sys.path:  # let a user's own module next to their data be found
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise SppoError(f"cannot import plug-in module {module_name}: {error}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SppoError(f"plug-in module {module_name} has no function {function_name}")
    return function


class PairRMRanker:
    """PairRM on every ordered pair; `scores` mode is the published reduction, `pairwise` keeps P(i beats j)."""

    def __init__(self, checkpoint: str, probability_mode: str = "scores", batch_size: int = 32):
        self.model = PairRM.load(checkpoint)
        self.probability_mode = probability_mode
        self.batch_size = batch_size

    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        logits = self.model.logit_matrices(batch[PROMPT], batch[RESPONSES], batch_size=self.batch_size)
        reduce = scores_from_logits if self.probability_mode == "scores" else pairwise_probabilities
        return [reduce(matrix) for matrix in logits]

    def stats(self) -> dict:
        return {"truncated_responses": self.model.num_truncated}


def load_ranker(spec: str, probability_mode: str = "scores", batch_size: int = 32) -> Ranker:
    if probability_mode not in PROBABILITY_MODES:
        raise SppoError(f"unknown --probability-mode {probability_mode!r} (choose from {', '.join(PROBABILITY_MODES)})")
    if spec.startswith("python:"):
        return PluginRanker(spec)
    return PairRMRanker(spec, probability_mode, batch_size)
