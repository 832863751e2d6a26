"""Backends behind one interface: token ids in, K sampled responses per prompt out.

The transformers backend lives here; the vLLM one in vllm_backend.py, imported only when it is used.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from sppo_cli.errors import SppoError
from sppo_cli.models import load_causal_lm, load_tokenizer


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 5
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    seed: int = 42

    def __post_init__(self):
        if self.num_samples < 2:
            raise SppoError(f"--num-samples must be at least 2 (SPPO compares responses), got {self.num_samples}")
        if self.temperature <= 0:
            raise SppoError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SppoError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise SppoError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    responses: list[str]
    num_tokens: int


class Backend(Protocol):
    max_model_len: int

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: SamplingConfig) -> list[Completion]:
        """K sampled responses for each tokenized prompt, in order; `seeds` has one seed per prompt."""

    def close(self) -> None:
        """Free the model and whatever runs it."""


class TransformersBackend:
    """Plain `model.generate`: K samples per prompt in one batched call (num_return_sequences=K)."""

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 8, max_model_len: int | None = None):
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, dtype).eval()
        self.batch_size = batch_size
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: SamplingConfig) -> list[Completion]:
        completions = []
        for start in range(0, len(prompt_ids), self.batch_size):
            # One generator serves the whole batch: seeding it from the batch's first prompt keeps a batch's
            # samples the same whatever ran before it.
            torch.manual_seed(seeds[start])
            completions += self._generate_batch(prompt_ids[start : start + self.batch_size], sampling)
        return completions

    def _generate_batch(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(self.model.device)
        outputs = self.model.generate(
            **inputs,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.num_samples,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = outputs[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        lengths = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        k = sampling.num_samples
        return [
            Completion([t.strip() for t in texts[i : i + k]], sum(lengths[i : i + k])) for i in range(0, len(texts), k)
        ]
