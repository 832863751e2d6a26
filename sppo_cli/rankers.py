"""Preference signals behind one interface (`sppo_cli.rank.Ranker`), chosen by a `--ranker` spec:

  PATH_OR_HUB_ID                   a PairRM checkpoint (the default signal of the paper)
  reward-model:PATH_OR_HUB_ID      a scalar reward model (AutoModelForSequenceClassification): P = sigmoid(r_i - r_j)
  rule:math                        a math answer checker against the `--answer-column` reference
  python:package.module:function   a plug-in: fn(prompts, responses) -> per prompt K scores or a K x K matrix
"""

import importlib
import sys
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from sppo_cli.data import PROMPT, RESPONSES
from sppo_cli.errors import SppoError, first_line
from sppo_cli.models import default_device, load_tokenizer, resolve_model
from sppo_cli.pairrm import PairRM, pairwise_probabilities, scores_from_logits
from sppo_cli.rank import Judgement, Ranker
from sppo_cli.verifiers import is_correct

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

    def __init__(self, checkpoint: str, probability_mode: str = "scores", batch_size: int = 32, **max_lengths: int):
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model = PairRM.load(checkpoint, dtype=dtype, **max_lengths)
        self.reduce = scores_from_logits if probability_mode == "scores" else pairwise_probabilities
        self.batch_size = batch_size

    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        logits = self.model.logit_matrices(batch[PROMPT], batch[RESPONSES], batch_size=self.batch_size)
        return [self.reduce(matrix) for matrix in logits]

    def stats(self) -> dict:
        return {"truncated_responses": self.model.num_truncated}


class RewardModelRanker:
    """A scalar reward per response, read on the chat-formatted conversation; longest-first batches."""

    def __init__(self, checkpoint: str, batch_size: int = 32, max_length: int = 4096):
        checkpoint = resolve_model(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        if not self.tokenizer.chat_template:
            raise SppoError(f"the reward model {checkpoint} has no chat template to format conversations with")
        on_gpu = torch.cuda.is_available()
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                checkpoint, dtype=torch.bfloat16 if on_gpu else torch.float32
            )
        except Exception as error:
            raise SppoError(f"cannot load the reward model {checkpoint}: {first_line(error)}") from error
        if self.model.config.num_labels != 1:
            raise SppoError(f"{checkpoint} has {self.model.config.num_labels} outputs; a reward model has one")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(default_device()).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            for prompt, responses in zip(batch[PROMPT], batch[RESPONSES])
            for response in responses
        ]
        rewards = self.rewards(texts)
        judgements, start = [], 0
        for responses in batch[RESPONSES]:
            judgements.append(rewards[start : start + len(responses)])
            start += len(responses)
        return judgements

    @torch.inference_mode()
    def rewards(self, texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        rewards = np.empty(len(texts))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            inputs = self.tokenizer(
                [texts[i] for i in indices], add_special_tokens=False, padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.model.device)
            rewards[indices] = self.model(**inputs).logits[:, 0].float().cpu().numpy()
        return rewards

    def stats(self) -> dict:
        return {}


class MathRuleRanker:
    """Correct beats incorrect: P = 1 or 0, and 1/2 when both are equally right or wrong."""

    def __init__(self, answer_column: str = "answer"):
        self.answer_column = answer_column
        self.correct = 0
        self.judged = 0

    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        if self.answer_column not in batch:
            raise SppoError(
                f"rule:math needs the reference answer column {self.answer_column!r} in the generations "
                f"(it has: {', '.join(batch)}); choose it with --answer-column"
            )
        judgements = []
        for responses, reference in zip(batch[RESPONSES], batch[self.answer_column]):
            correct = np.array([is_correct(response, str(reference)) for response in responses], dtype=np.float64)
            self.correct += int(correct.sum())
            self.judged += len(responses)
            judgements.append(0.5 + 0.5 * (correct[:, None] - correct[None, :]))
        return judgements

    def stats(self) -> dict:
        return {"correct_responses": self.correct, "judged_responses": self.judged}


RULES = {"rule:math": MathRuleRanker}


def load_ranker(
    spec: str,
    probability_mode: str = "scores",
    batch_size: int | None = None,
    answer_column: str = "answer",
    source_max_length: int = 1224,
    candidate_max_length: int = 412,
) -> Ranker:
    if probability_mode not in PROBABILITY_MODES:
        raise SppoError(f"unknown --probability-mode {probability_mode!r} (choose from {', '.join(PROBABILITY_MODES)})")
    if spec.startswith("python:"):
        return PluginRanker(spec)
    # Long rows in big batches spill a CPU's caches (DeBERTa's attention grows with batch x tokens^2): measured in
    # bench/rank.py, pairs/s on a CPU fall from ~9 at 2 rows per forward pass to ~2 at 32. GPUs want big batches.
    batch_size = batch_size or (32 if torch.cuda.is_available() else 2)
    if spec.startswith("reward-model:"):
        return RewardModelRanker(spec.removeprefix("reward-model:"), batch_size)
    if spec.startswith("rule:"):
        if spec not in RULES:
            raise SppoError(f"unknown rule {spec!r} (choose from {', '.join(RULES)})")
        return RULES[spec](answer_column)
    max_lengths = {"source_max_length": source_max_length, "candidate_max_length": candidate_max_length}
    return PairRMRanker(spec, probability_mode, batch_size, **max_lengths)
