"""Stage 1: sample K responses per prompt from the current policy.

Prompts are rendered with the model's own chat template and tokenized here, once, so every backend samples from
the same token ids (the exact text is kept as `prompt_text`). Every prompt has its own seed, derived from --seed and
its row, so the samples do not depend on which process drew them. The work is cut into shards (stage.py): an
interrupted run resumes after its finished shards, and with data parallelism each worker takes every
data_parallel_size-th shard.
"""

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from datasets import Dataset

from sppo_cli.backends import Backend, Completion, make_backend, resolve_backend
from sppo_cli.config import GenerateConfig, SamplingOptions
from sppo_cli.data import (
    CONVERSATION,
    FINISH_REASONS,
    PER_RESPONSE,
    PROMPT_TEXT,
    PROMPT_TOKEN_IDS,
    RESPONSES,
    SAMPLED_VOCABULARY,
    TRUNCATED,
    load_prompts,
)
from sppo_cli.errors import SppoError
from sppo_cli.identity import vocabulary_fingerprint
from sppo_cli.logs import ProgressBar
from sppo_cli.models import chat_prompt, encode_chat_prompt, gpu_count, load_tokenizer
from sppo_cli.stage import PER_ROW, SHARDS, Shard, StageRun, run_shards, run_stage, save_dataset


def prompt_seed(seed: int, row: int) -> int:
    # Hashed, not seed + row: vLLM seeds the K samples of a request seed, seed + 1, ..., seed + K - 1, and those
    # must not overlap another prompt's or another run's (--seed 43). 63 bits leave room for the + K.
    return int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0]) >> 1


def sample_shard(backend: Backend, sampling: SamplingOptions, texts: list[str], prompt_ids: list[list[int]],
                 shard: Shard) -> dict:  # fmt: skip
    """The responses to one shard's prompts, with the exact text they were sampled from (a chat template may render
    differently on another run); a prompt that leaves no room to answer is skipped (None)."""
    ids = prompt_ids[shard.start : shard.stop]
    kept = [i for i, row in enumerate(ids) if len(row) < backend.max_model_len]
    seeds = [prompt_seed(sampling.seed, shard.start + i) for i in kept]
    completions = backend.generate([ids[i] for i in kept], seeds, sampling) if kept else []
    sampled: list[Completion | None] = [None] * len(ids)
    for i, completion in zip(kept, completions):
        sampled[i] = completion
    per_row = {PROMPT_TEXT: texts[shard.start : shard.stop], PROMPT_TOKEN_IDS: ids,
               **{column: [getattr(c, field) if c else None for c in sampled] for column, field in _COMPLETION.items()}}
    return {PER_ROW: per_row, "num_tokens": sum(c.num_tokens for c in completions),
            "max_model_len": backend.max_model_len}  # fmt: skip


_COMPLETION = dict(zip(PER_RESPONSE, ("responses", "token_counts", "token_ids", "finish_reasons")))  # Completion's


@contextlib.contextmanager
def _sampler(model: str, config: GenerateConfig, texts: list[str],
             prompt_ids: list[list[int]]) -> Iterator[Callable[[Shard], dict]]:  # fmt: skip
    with contextlib.closing(make_backend(model, config)) as backend:
        yield functools.partial(sample_shard, backend, config, texts, prompt_ids)


def check_engine(config: GenerateConfig) -> GenerateConfig:
    """Resolve `auto` to the backend that will run, and check the GPUs asked for are there."""
    config = replace(config, backend=resolve_backend(config.backend))
    gpus, wanted = gpu_count(), config.data_parallel_size * config.tensor_parallel_size
    if gpus and wanted > gpus and not config.ray_address:  # on Ray, the cluster's GPUs count, not this machine's
        raise SppoError(f"{config.data_parallel_size} data-parallel replicas of {config.tensor_parallel_size} GPU(s) "
                        f"need {wanted} GPUs; {gpus} are visible")  # fmt: skip
    return config


def sample(model: str, prompts: Dataset, config: GenerateConfig, directory: Path, description: str = "generate"):
    """K responses per prompt, as a generations dataset (prompts too long for the context are left out), and the
    counts. Shards already in `directory` are reused."""
    tokenizer = load_tokenizer(model, config.chat_template)
    texts = [chat_prompt(tokenizer, messages) for messages in prompts[CONVERSATION]]
    prompt_ids = [encode_chat_prompt(tokenizer, text) for text in texts]
    open_worker = functools.partial(_sampler, model, config, texts, prompt_ids)
    started = time.perf_counter()
    with ProgressBar(description, len(texts)) as bar:
        results = run_shards(directory, len(texts), open_worker, bar, config, config.tensor_parallel_size)
    seconds = time.perf_counter() - started
    # by row, as sampled (in an earlier run or this one)
    columns = {column: [row for result in results for row in result[PER_ROW][column]] for column in (PROMPT_TEXT,
               PROMPT_TOKEN_IDS, *_COMPLETION)}  # fmt: skip
    kept = [i for i, row in enumerate(columns[RESPONSES]) if row is not None]
    if not kept:
        context = results[0]["max_model_len"]
        raise SppoError(f"every prompt is longer than the model's context window ({context} tokens)")
    generations = prompts.select(kept)
    for column, values in columns.items():
        generations = generations.add_column(column, [values[i] for i in kept])
    tokens = sum(result["num_tokens"] for result in results)
    stats = {
        "prompts": len(kept),
        "skipped_too_long": len(texts) - len(kept),
        "samples": len(kept) * config.num_samples,
        "truncated_samples": sum(reasons.count(TRUNCATED) for reasons in generations[FINISH_REASONS]),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
    }
    return generations, stats


def generate(model: str, prompts: str, output: str | Path, config: GenerateConfig, overwrite: bool = False,
             verbose: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """Run the stage: returns the manifest and whether `output` was already this run's finished result."""
    config = check_engine(config)
    prompt_data = load_prompts(prompts, config.split, config.prompt_column, config.limit, config.system_prompt)
    tokenizer = load_tokenizer(model, config.chat_template)
    chat_prompt(tokenizer, prompt_data[0][CONVERSATION])  # fails before writing
    run = StageRun("generate", output, config, {"model": model, "prompts": prompts}, overwrite,
                   input_types={"prompts": "dataset"})  # fmt: skip

    def work(partial: Path) -> dict:
        generations, stats = sample(model, prompt_data, config, partial / SHARDS)
        save_dataset(generations, partial)
        return {"rows": len(generations), **stats, SAMPLED_VOCABULARY: vocabulary_fingerprint(tokenizer)}

    return run_stage(run, work, verbose)
