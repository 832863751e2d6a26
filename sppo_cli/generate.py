"""Stage 1: sample K responses per prompt from the current policy.

A backend turns rendered prompt texts into K sampled responses each. Both backends sample from the same text,
built here from the model's own chat template, so which backend ran never changes what the policy saw.
"""

import time
from dataclasses import dataclass
from typing import Protocol

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sppo_cli.data import PROMPT, PROMPT_TEXT, RESPONSES
from sppo_cli.errors import SppoError
from sppo_cli.models import chat_prompt, encode_chat_prompt, load_causal_lm, load_tokenizer


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
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """K sampled responses for each tokenized prompt, in order."""


class TransformersBackend:
    """Plain `model.generate`: K samples per prompt in one batched call (num_return_sequences=K)."""

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 8):
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, dtype).eval()
        self.batch_size = batch_size
        self.max_model_len = self.model.config.max_position_embeddings

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        completions = []
        with tqdm(total=len(prompt_ids), desc="generate", unit="prompt") as progress:
            for start in range(0, len(prompt_ids), self.batch_size):
                # Seeding per batch keeps a batch's samples the same whatever ran before it.
                torch.manual_seed(sampling.seed + start)
                batch = self._generate_batch(prompt_ids[start : start + self.batch_size], sampling)
                completions += batch
                progress.update(len(batch))
                progress.set_postfix(tokens=sum(c.num_tokens for c in completions))
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
            Completion([t.strip() for t in texts[i : i + k]], sum(lengths[i : i + k]))
            for i in range(0, len(texts), k)
        ]


BACKENDS = ("transformers", "vllm", "auto")


def make_backend(name: str, model: str, dtype: str = "auto", batch_size: int = 8) -> Backend:
    if name not in BACKENDS:
        raise SppoError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "vllm":
        raise SppoError("the vllm backend is not available in this version; use --backend transformers")
    return TransformersBackend(model, dtype=dtype, batch_size=batch_size)


def generate(prompts: Dataset, backend: Backend, sampling: SamplingConfig) -> tuple[Dataset, dict]:
    """Sample `sampling.num_samples` responses per prompt; returns the generations and run statistics."""
    texts = [chat_prompt(backend.tokenizer, prompt) for prompt in prompts[PROMPT]]
    prompt_ids = [encode_chat_prompt(backend.tokenizer, text) for text in texts]
    # A prompt that fills the context window leaves no room to answer: skip and count it instead of failing the run.
    kept = [i for i, ids in enumerate(prompt_ids) if len(ids) < backend.max_model_len]
    if not kept:
        raise SppoError(f"every prompt is longer than the model's context window ({backend.max_model_len} tokens)")

    started = time.perf_counter()
    completions = backend.generate([prompt_ids[i] for i in kept], sampling)
    seconds = time.perf_counter() - started

    generations = prompts.select(kept)
    generations = generations.add_column(PROMPT_TEXT, [texts[i] for i in kept])
    generations = generations.add_column(RESPONSES, [c.responses for c in completions])
    stats = {
        "prompts": len(kept),
        "skipped_too_long": len(prompt_ids) - len(kept),
        "samples": len(kept) * sampling.num_samples,
        "generated_tokens": sum(c.num_tokens for c in completions),
        "seconds": round(seconds, 3),
    }
    return generations, stats
