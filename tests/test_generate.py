"""Generation: prompts, seeds, shards, data-parallel workers and resume (transformers backend); test_vllm.py
reuses these fixtures for the vLLM backend."""

import json
import sys
from dataclasses import replace

import pytest
import torch
from datasets import Dataset

from sppo_cli import generate as gen
from sppo_cli.data import load_stage
from sppo_cli.errors import SppoError
from sppo_cli.generate import EngineConfig, SamplingConfig, generate, generate_to_disk, resolve_backend
from sppo_cli.models import chat_prompt, encode_chat_prompt, load_tokenizer

SAMPLING = SamplingConfig(num_samples=3, max_new_tokens=8, seed=7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is fastest on one thread; on a busy machine, two threads spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backends():
    backends = {}
    yield backends
    for backend in backends.values():
        backend.close()  # now: vLLM's engine stopping at exit would log to streams pytest has closed


@pytest.fixture(autouse=True)
def shared_backends(monkeypatch, backends):
    """One backend per model configuration for the whole module: engines are slow to start."""
    make = gen.make_backend

    def shared(engine: EngineConfig):
        key = replace(engine, data_parallel_size=1, shard_size=1)  # what the backend is built from
        if key not in backends:
            backends[key] = make(engine)
        monkeypatch.setattr(backends[key], "close", lambda: None)  # closed by `backends` at the end
        return backends[key]

    monkeypatch.setattr(gen, "make_backend", shared)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture
def engine(tiny_model):
    return EngineConfig(str(tiny_model), batch_size=2, shard_size=2)


def prompts(*texts: str) -> Dataset:
    return Dataset.from_list([{"prompt": text, "answer": str(i)} for i, text in enumerate(texts)])


SEVEN = prompts(*(f"Question number {i}: name a fruit." for i in range(7)))


def test_prompt_text_is_the_chat_template_with_a_single_bos(tokenizer):
    text = chat_prompt(tokenizer, "What is two plus three?")
    assert text == "<|begin|><|user|>\nWhat is two plus three?<|end|><|assistant|>\n"
    ids = encode_chat_prompt(tokenizer, text)
    assert (
        ids
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is two plus three?"}], add_generation_prompt=True
        )["input_ids"]
    )
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # the trap the tiny tokenizer reproduces: encoding with special tokens doubles BOS
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_k_samples_per_prompt_kept_columns_and_seeded(tmp_path, tokenizer, engine):
    data = prompts("What is two plus three?", "Name a fruit that is red.", "Write a haiku about the sea.")
    first, stats = generate(data, tokenizer, engine, SAMPLING, tmp_path / "a")
    assert first.column_names == ["prompt", "answer", "prompt_text", "responses"]
    assert [len(r) for r in first["responses"]] == [3, 3, 3]
    assert first["answer"] == ["0", "1", "2"]
    assert first["prompt_text"][1] == chat_prompt(tokenizer, "Name a fruit that is red.")
    assert stats["prompts"] == 3 and stats["samples"] == 9 and stats["skipped_too_long"] == 0
    assert 0 < stats["generated_tokens"] <= 9 * 8
    again, _ = generate(data, tokenizer, engine, SAMPLING, tmp_path / "b")
    assert again["responses"] == first["responses"]
    other, _ = generate(data, tokenizer, engine, replace(SAMPLING, seed=8), tmp_path / "c")
    assert other["responses"] != first["responses"]


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, tokenizer, engine):
    engine = replace(engine, max_model_len=40)
    data = prompts("short one", "long " * 60, "another short one")
    generations, stats = generate(data, tokenizer, engine, SAMPLING, tmp_path / "a")
    assert generations["prompt"] == ["short one", "another short one"]
    assert stats["skipped_too_long"] == 1 and stats["prompts"] == 2
    with pytest.raises(SppoError, match=r"every prompt is longer than the model's context window \(40 tokens\)"):
        generate(prompts("long " * 60), tokenizer, engine, SAMPLING, tmp_path / "b")


def test_data_parallel_workers_split_the_shards_and_rows_merge_in_order(
    tmp_path, tokenizer, engine, simulated_processes
):
    single, _ = generate(SEVEN, tokenizer, engine, SAMPLING, tmp_path / "one")
    parallel, stats = generate(SEVEN, tokenizer, replace(engine, data_parallel_size=3), SAMPLING, tmp_path / "three")
    assert [[shard.index for shard in p.args[1]] for p in simulated_processes] == [[0, 3], [1], [2]]
    assert parallel["answer"] == [str(i) for i in range(7)]
    assert parallel["responses"] == single["responses"]
    assert stats["prompts"] == 7 and stats["samples"] == 21


def test_data_parallel_worker_failure_is_one_clear_error(tmp_path, tokenizer, engine, simulated_processes, monkeypatch):
    def broken(engine):
        raise RuntimeError("no GPU left\nsecond line")

    monkeypatch.setattr(gen, "make_backend", broken)
    with pytest.raises(SppoError, match="^a data-parallel worker failed: RuntimeError: no GPU left$"):
        generate(SEVEN, tokenizer, replace(engine, data_parallel_size=2), SAMPLING, tmp_path / "a")


def test_data_parallel_worker_processes(tmp_path, tokenizer, engine):
    """Two real worker processes (spawned, each loading the model): the same rows as one process."""
    single, _ = generate(SEVEN, tokenizer, engine, SAMPLING, tmp_path / "one")
    parallel, stats = generate(SEVEN, tokenizer, replace(engine, data_parallel_size=2), SAMPLING, tmp_path / "two")
    assert parallel["answer"] == single["answer"] and parallel["responses"] == single["responses"]
    assert stats["generated_tokens"] > 0


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_finished_shards(tmp_path, tokenizer, engine, monkeypatch):
    output, reference = tmp_path / "gens", tmp_path / "reference"
    generate_to_disk(SEVEN, engine, SAMPLING, reference, {})
    backend = gen.make_backend(engine)
    real, calls = backend.generate, []

    def generate_then_crash(prompt_ids, seeds, sampling):
        calls.append(len(prompt_ids))
        if len(calls) == 3:
            raise Interrupt
        return real(prompt_ids, seeds, sampling)

    monkeypatch.setattr(backend, "generate", generate_then_crash)
    with pytest.raises(Interrupt):
        generate_to_disk(SEVEN, engine, SAMPLING, output, {})
    partial = tmp_path / "gens.partial"
    assert not output.exists() and len(list(partial.glob("shards/*/*.json"))) == 2

    calls.clear()
    manifest = generate_to_disk(SEVEN, engine, SAMPLING, output, {})
    assert calls == [2, 1]  # only the unfinished shards were generated
    assert manifest["reused_shards"] == 2 and manifest["prompts"] == 7 and manifest["complete"]
    assert not partial.exists() and not (output / "shards").exists()
    assert load_stage(output)[0].to_list() == load_stage(reference)[0].to_list()


def test_other_arguments_never_reuse_shards(tmp_path, tokenizer, engine):
    generate(SEVEN, tokenizer, engine, SAMPLING, tmp_path)
    (key,) = [p.name for p in tmp_path.iterdir()]
    _, stats = generate(SEVEN, tokenizer, engine, replace(SAMPLING, temperature=0.9), tmp_path)
    assert stats["reused_shards"] == 0 and key not in [p.name for p in tmp_path.iterdir()]
    # the number of workers only decides who draws a shard: it keeps the shards
    _, stats = generate(SEVEN, tokenizer, replace(engine, data_parallel_size=4), replace(SAMPLING, temperature=0.9),
                        tmp_path)  # fmt: skip
    assert stats["reused_shards"] == 4


def test_a_run_that_finished_nothing_leaves_no_partial_output(tmp_path, engine, monkeypatch):
    def cannot_start(engine):
        raise SppoError("vLLM cannot load model: out of memory")

    monkeypatch.setattr(gen, "make_backend", cannot_start)
    with pytest.raises(SppoError, match="out of memory"):
        generate_to_disk(SEVEN, engine, SAMPLING, tmp_path / "gens", {})
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_every_argument(tmp_path, engine):
    manifest = generate_to_disk(SEVEN, engine, SAMPLING, tmp_path / "gens", {"model": engine.model})
    assert manifest["parameters"] == {
        "num_samples": 3, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8, "seed": 7,
        "backend": "transformers", "dtype": "auto", "batch_size": 2, "max_model_len": None,
        "gpu_memory_utilization": 0.9, "tensor_parallel_size": 1, "data_parallel_size": 1, "shard_size": 2,
    }  # fmt: skip
    assert manifest["rows"] == 7 and manifest["generated_tokens"] > 0
    assert json.loads((tmp_path / "gens" / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 1}, "--num-samples must be at least 2"),
        ({"temperature": 0.0}, "--temperature must be positive"),
        ({"top_p": 1.5}, "--top-p must be in"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
    ],
)
def test_sampling_config_is_validated(kwargs, message):
    with pytest.raises(SppoError, match=message):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "tgi"}, "unknown backend 'tgi'"),
        ({"dtype": "int3"}, "unknown dtype 'int3'"),
        ({"shard_size": 0}, "--shard-size must be at least 1"),
        ({"data_parallel_size": 0}, "--data-parallel-size must be at least 1"),
        ({"max_model_len": 0}, "--max-model-len must be at least 1"),
        ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization must be in"),
        ({"tensor_parallel_size": 2}, "--tensor-parallel-size needs --backend vllm"),
    ],
)
def test_engine_config_is_validated(kwargs, message):
    with pytest.raises(SppoError, match=message):
        EngineConfig("model", **kwargs)


def test_backend_resolution_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setattr(gen, "find_spec", lambda name: None)
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(SppoError, match="the vllm backend needs vLLM"):
        resolve_backend("vllm")
    with pytest.raises(SppoError, match="unknown backend 'tgi'"):
        resolve_backend("tgi")
