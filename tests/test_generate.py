"""Generation: prompts, seeds, shards, data-parallel workers and resume (transformers backend); test_vllm.py
reuses these fixtures for the vLLM backend."""

import json
import sys
from dataclasses import replace

import pytest
import torch
from conftest import write_jsonl
from datasets import Dataset

from sppo_cli import backends
from sppo_cli import generate as gen
from sppo_cli.config import GenerateConfig
from sppo_cli.data import load_stage
from sppo_cli.errors import SettingError, SppoError
from sppo_cli.generate import generate, sample
from sppo_cli.models import chat_prompt, encode_chat_prompt

CONFIG = GenerateConfig(num_samples=3, max_new_tokens=8, seed=7, backend="transformers", batch_size=2, shard_size=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is fastest on one thread; on a busy machine, two threads spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engines():
    engines = {}
    yield engines
    for backend in engines.values():
        backend.close()  # now: vLLM's engine stopping at exit would log to streams pytest has closed


@pytest.fixture(autouse=True)
def shared_backends(monkeypatch, engines):
    """One backend per model configuration for the whole module: engines are slow to start."""
    make = backends.make_backend

    def shared(model: str, engine: GenerateConfig):
        key = (model, engine.backend, engine.dtype, engine.batch_size, engine.max_model_len)
        if key not in engines:
            engines[key] = make(model, engine)
        monkeypatch.setattr(engines[key], "close", lambda: None)  # closed by `engines` at the end
        return engines[key]

    monkeypatch.setattr(gen, "make_backend", shared)


def prompts(*texts: str) -> Dataset:
    return Dataset.from_list([{"prompt": text, "answer": str(i), "conversation": [{"role": "user", "content": text}]}
                              for i, text in enumerate(texts)])  # as load_prompts gives them


SEVEN = prompts(*(f"Question number {i}: name a fruit." for i in range(7)))


@pytest.fixture
def seven_file(tmp_path):
    return write_jsonl(tmp_path / "seven.jsonl", SEVEN.to_list())


def test_prompt_text_is_the_chat_template_with_a_single_bos(tokenizer):
    text = chat_prompt(tokenizer, [{"role": "user", "content": "What is two plus three?"}])
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


def test_k_samples_per_prompt_kept_columns_and_seeded(tmp_path, tiny_model, tokenizer):
    data = prompts("What is two plus three?", "Name a fruit that is red.", "Write a haiku about the sea.")
    first, stats = sample(str(tiny_model), data, CONFIG, tmp_path / "a")
    assert first.column_names == ["prompt", "answer", "conversation", "prompt_text", "prompt_token_ids", "responses",
                                  "response_tokens", "response_token_ids", "finish_reasons"]  # fmt: skip
    assert [len(r) for r in first["responses"]] == [3, 3, 3] and [len(r) for r in first["response_tokens"]] == [3] * 3
    assert all(1 <= n <= 8 for row in first["response_tokens"] for n in row)
    assert first["prompt_token_ids"] == [encode_chat_prompt(tokenizer, text) for text in first["prompt_text"]]
    for responses, counts, ids, reasons in zip(*(first[c] for c in ("responses", "response_tokens",
                                                                     "response_token_ids", "finish_reasons"))):
        assert counts == [len(i) for i in ids]
        assert responses == [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
        assert reasons == ["length" if len(i) == 8 and i[-1] != tokenizer.eos_token_id else "stop" for i in ids]
    assert sum(map(sum, first["response_tokens"])) == stats["generated_tokens"]
    assert first["answer"] == ["0", "1", "2"]
    assert first["prompt_text"][1] == chat_prompt(tokenizer, [{"role": "user", "content": "Name a fruit that is red."}])
    assert stats["prompts"] == 3 and stats["samples"] == 9 and stats["skipped_too_long"] == 0
    assert 0 < stats["generated_tokens"] <= 9 * 8
    again, _ = sample(str(tiny_model), data, CONFIG, tmp_path / "b")
    assert again["responses"] == first["responses"]
    other, _ = sample(str(tiny_model), data, replace(CONFIG, seed=8), tmp_path / "c")
    assert other["responses"] != first["responses"]


def test_a_prompt_s_samples_depend_on_its_seed_only_not_on_its_batch_or_shard(tmp_path, tiny_model):
    """Each sample draws from its own generator (as vLLM seeds each request): --limit, --batch-size and
    --shard-size do not change a prompt's samples."""
    alone, _ = sample(str(tiny_model), SEVEN.select(range(3)), replace(CONFIG, batch_size=1), tmp_path / "a")
    together, _ = sample(str(tiny_model), SEVEN, replace(CONFIG, batch_size=7, shard_size=7), tmp_path / "b")
    assert together["response_token_ids"][:3] == alone["response_token_ids"]
    assert together["responses"][:3] == alone["responses"]
    assert len({tuple(ids) for row in together["response_token_ids"] for ids in row}) > 7  # the K samples differ


def test_a_response_keeps_its_end_of_sequence_token_and_says_why_it_ended(tiny_model):
    from sppo_cli.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(tiny_model), CONFIG)
    eos, pad = backend.tokenizer.eos_token_id, backend.tokenizer.pad_token_id
    sampling = replace(CONFIG, max_new_tokens=4, stop=["xyz"])
    assert backend._response([40, 41, eos, pad], sampling)[1:] == ([40, 41, eos], "stop")  # the model ended it
    assert backend._response([40, 41, 42, eos], sampling)[1:] == ([40, 41, 42, eos], "stop")
    assert backend._response([40, 41, 42, 43], sampling)[1:] == ([40, 41, 42, 43], "length")  # cut off
    stopped = backend.tokenizer("a xyz", add_special_tokens=False)["input_ids"]
    sampling = replace(sampling, max_new_tokens=len(stopped) + 2)
    assert backend._response([*stopped, pad, pad], sampling) == ("a", stopped, "stop")  # a stop string ended it
    assert backend._response([*stopped, 40, 41], sampling)[2] == "stop"  # ... at the very last token
    backend.end_of_sequence.add(pad)  # a tokenizer whose padding is its end of sequence: padding is not sampled
    assert backend._response([*stopped, pad, pad], sampling) == ("a", stopped, "stop")


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, tiny_model):
    config = replace(CONFIG, max_model_len=40)
    generations, stats = sample(str(tiny_model), prompts("short one", "long " * 60, "another short one"), config,
                                tmp_path / "a")  # fmt: skip
    assert generations["prompt"] == ["short one", "another short one"]
    assert stats["skipped_too_long"] == 1 and stats["prompts"] == 2
    with pytest.raises(SppoError, match=r"every prompt is longer than the model's context window \(40 tokens\)"):
        sample(str(tiny_model), prompts("long " * 60), config, tmp_path / "b")


def test_data_parallel_workers_split_the_shards_and_rows_merge_in_order(tmp_path, tiny_model, simulated_processes):
    single, _ = sample(str(tiny_model), SEVEN, CONFIG, tmp_path / "one")
    parallel, stats = sample(str(tiny_model), SEVEN, replace(CONFIG, data_parallel_size=3), tmp_path / "three")
    assert [[shard.index for shard in p.args[1]] for p in simulated_processes] == [[0, 3], [1], [2]]
    assert parallel["answer"] == [str(i) for i in range(7)]
    assert parallel["responses"] == single["responses"]
    assert stats["prompts"] == 7 and stats["samples"] == 21


def test_data_parallel_worker_failure_is_one_clear_error(tmp_path, tiny_model, simulated_processes, monkeypatch):
    def broken(model, engine):
        raise RuntimeError("no GPU left\nsecond line")

    monkeypatch.setattr(gen, "make_backend", broken)
    with pytest.raises(RuntimeError, match="^a data-parallel worker failed: RuntimeError: no GPU left$"):
        sample(str(tiny_model), SEVEN, replace(CONFIG, data_parallel_size=2), tmp_path / "a")


@pytest.mark.slow
def test_data_parallel_worker_processes(tmp_path, tiny_model):
    """Two real worker processes (spawned, each loading the model): the same rows as one process."""
    single, _ = sample(str(tiny_model), SEVEN, CONFIG, tmp_path / "one")
    parallel, stats = sample(str(tiny_model), SEVEN, replace(CONFIG, data_parallel_size=2), tmp_path / "two")
    assert parallel["answer"] == single["answer"] and parallel["responses"] == single["responses"]
    assert stats["generated_tokens"] > 0


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_finished_shards(tmp_path, tiny_model, seven_file, monkeypatch):
    output, reference = tmp_path / "gens", tmp_path / "reference"
    generate(str(tiny_model), str(seven_file), reference, CONFIG)
    backend = gen.make_backend(str(tiny_model), CONFIG)
    real, calls = backend.generate, []

    def generate_then_crash(prompt_ids, seeds, sampling):
        calls.append(len(prompt_ids))
        if len(calls) == 3:
            raise Interrupt
        return real(prompt_ids, seeds, sampling)

    monkeypatch.setattr(backend, "generate", generate_then_crash)
    with pytest.raises(Interrupt):
        generate(str(tiny_model), str(seven_file), output, CONFIG)
    partial = tmp_path / "gens.partial"
    assert not output.exists() and len(list(partial.glob("shards/[0-9]*.json"))) == 2

    calls.clear()
    manifest, done = generate(str(tiny_model), str(seven_file), output, CONFIG)
    assert calls == [2, 1] and not done  # only the unfinished shards were generated
    assert manifest["prompts"] == 7 and manifest["complete"]
    assert not partial.exists() and not (output / "shards").exists()
    assert load_stage(output)[0].to_list() == load_stage(reference)[0].to_list()


def test_a_damaged_shard_is_done_again_with_a_warning_never_shifting_the_rows(tmp_path, tiny_model, seven_file,
                                                                            capsys):  # fmt: skip
    """A shard that lost a row would pair every later prompt with the next one's responses; a cut-short one cannot be
    read. Both are done again."""
    reference = tmp_path / "reference"
    generate(str(tiny_model), str(seven_file), reference, CONFIG)
    data = load_stage(reference)[0]
    shards = tmp_path / "gens.partial" / "shards"  # as an interrupted run with the same settings leaves them
    shards.mkdir(parents=True)
    (tmp_path / "gens.partial" / "run.json").write_text(json.dumps(json.loads(
        (reference / "manifest.json").read_text())["identity"]))  # fmt: skip
    (shards / "layout.json").write_text(json.dumps({"shard_size": 2, "rows": 7}))
    for index in (0, 1, 2):
        rows = data.select(range(2 * index, 2 * index + 2))
        per_row = {c: list(rows[c]) for c in ("prompt_text", "prompt_token_ids", "responses", "response_tokens",
                                        "response_token_ids", "finish_reasons")}  # fmt: skip
        if index == 1:
            per_row = {c: values[1:] for c, values in per_row.items()}  # a row lost
        text = json.dumps({"start": 2 * index, "per_row": per_row, "num_tokens": 0, "max_model_len": 1024})
        (shards / f"{index:06d}.json").write_text(text[:100] if index == 2 else text)  # the third cut short
    manifest, done = generate(str(tiny_model), str(seven_file), tmp_path / "gens", CONFIG)
    assert not done and load_stage(tmp_path / "gens")[0].to_list() == data.to_list()
    err = capsys.readouterr().err
    assert "000001.json is damaged or from an older sppo (unreadable, or not one result per row of prompts 2-3); " \
        "doing that shard again" in err  # fmt: skip
    assert "000002.json is damaged" in err and "000000.json" not in err


def test_settings_that_do_not_change_the_samples_keep_the_finished_shards(tmp_path, tiny_model, seven_file,
                                                                           monkeypatch):  # fmt: skip
    def crash(*args):
        raise Interrupt

    real = gen.sample_shard
    calls = []
    monkeypatch.setattr(gen, "sample_shard", lambda *args: calls.append(1) or (crash() if len(calls) == 3 else
                                                                                real(*args)))  # fmt: skip
    with pytest.raises(Interrupt):
        generate(str(tiny_model), str(seven_file), tmp_path / "gens", CONFIG)
    # a retry with less GPU memory keeps the two finished shards; another temperature may not use them
    with pytest.raises(SppoError, match=r"holds the finished part of an interrupted run made with other settings or "
                       r"inputs: temperature \(0.7 -> 0.9\); re-run with those to resume it, or pass --overwrite"):
        generate(str(tiny_model), str(seven_file), tmp_path / "gens", replace(CONFIG, temperature=0.9))
    calls.clear()
    manifest, _ = generate(str(tiny_model), str(seven_file), tmp_path / "gens",
                           replace(CONFIG, gpu_memory_utilization=0.5, data_parallel_size=1))  # fmt: skip
    assert len(calls) == 2 and manifest["parameters"]["gpu_memory_utilization"] == 0.5


def test_a_run_whose_engine_cannot_start_leaves_nothing_to_mistake_for_output(tmp_path, tiny_model, seven_file,
                                                                               monkeypatch):  # fmt: skip
    def cannot_start(model, engine):
        raise SppoError("vLLM cannot load model: out of memory")

    monkeypatch.setattr(gen, "make_backend", cannot_start)
    with pytest.raises(SppoError, match="out of memory"):
        generate(str(tiny_model), str(seven_file), tmp_path / "gens", CONFIG)
    partial = tmp_path / "gens.partial"
    assert not (tmp_path / "gens").exists()
    assert sorted(p.name for p in partial.iterdir()) == [".sppo.lock", "run.json", "shards", "sppo.log"]
    assert not list((partial / "shards").glob("[0-9]*"))  # no finished shard
    assert "vLLM cannot load model: out of memory" in (partial / "sppo.log").read_text()  # with its traceback
    assert "Traceback" in (partial / "sppo.log").read_text()


def test_manifest_records_every_setting_and_the_identity_leaves_out_how_it_ran(tmp_path, tiny_model, seven_file):
    manifest, _ = generate(str(tiny_model), str(seven_file), tmp_path / "gens", CONFIG)
    assert manifest["parameters"] == {
        "chat_template": None, "split": "train", "prompt_column": "prompt", "system_prompt": None, "limit": None,
        "num_samples": 3, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8, "min_new_tokens": 0, "stop": [],
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "seed": 7,
        "backend": "transformers", "dtype": "auto", "batch_size": 2, "max_model_len": None,
        "gpu_memory_utilization": 0.9, "tensor_parallel_size": 1, "shard_size": 2, "data_parallel_size": 1,
        "ray_address": None, "num_shards": None, "shard_index": None, "wait_for_merge": False,
    }  # fmt: skip
    identity = manifest["identity"]
    assert set(manifest["parameters"]) - set(identity["settings"]) == {
        "gpu_memory_utilization", "data_parallel_size", "batch_size", "shard_size", "ray_address", "num_shards",
        "shard_index", "wait_for_merge"}  # fmt: skip
    assert identity["inputs"]["model"].startswith("sha256:") and identity["inputs"]["prompts"].startswith("sha256:")
    assert manifest["rows"] == 7 and manifest["generated_tokens"] > 0
    assert json.loads((tmp_path / "gens" / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples must be at least 1, got 0"),
        ({"temperature": 0.0}, "temperature must be greater than 0, got 0.0"),
        ({"top_p": 1.5}, "top_p must be at most 1, got 1.5"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
        ({"backend": "tgi"}, "backend must be one of auto, vllm, transformers, got 'tgi'"),
        ({"dtype": "int3"}, "dtype must be one of auto, float32, bfloat16, float16, got 'int3'"),
        ({"shard_size": 0}, "shard_size must be at least 1, got 0"),
        ({"data_parallel_size": 0}, "data_parallel_size must be at least 1, got 0"),
        ({"max_model_len": 0}, "max_model_len must be at least 1, got 0"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be at most 1, got 1.5"),
        ({"backend": "transformers", "tensor_parallel_size": 2}, "tensor_parallel_size needs the vllm backend"),
        ({"num_shards": 2}, "shard_index and --num-shards go together"),
        ({"wait_for_merge": True}, "wait_for_merge is for a slice: it needs --num-shards and --shard-index"),
    ],
)
def test_settings_are_validated_in_the_library_s_own_terms(kwargs, message):
    with pytest.raises(SettingError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        GenerateConfig(**kwargs)


def test_backend_resolution_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setattr(backends, "find_spec", lambda name: None)
    assert backends.resolve_backend("auto") == "transformers"
    assert backends.resolve_backend("transformers") == "transformers"
    with pytest.raises(SppoError, match="the vllm backend needs vLLM"):
        backends.resolve_backend("vllm")


def test_stop_strings_min_new_tokens_and_penalties(tmp_path, tiny_model):
    data = prompts("What is two plus three?", "Name a fruit that is red.")
    plain, _ = sample(str(tiny_model), data, replace(CONFIG, max_new_tokens=12), tmp_path / "a")
    words = [w for rs in plain["responses"] for r in rs for w in r.split() if len(w) > 2]
    stopped, _ = sample(str(tiny_model), data, replace(CONFIG, max_new_tokens=12, stop=[words[0]]), tmp_path / "b")
    assert all(words[0] not in r for rs in stopped["responses"] for r in rs)  # the stop string is left out
    long, _ = sample(str(tiny_model), data, replace(CONFIG, min_new_tokens=8), tmp_path / "c")
    assert all(n == 8 for row in long["response_tokens"] for n in row)  # min = max: no early end
    with pytest.raises(SettingError, match="presence_penalty needs the vllm backend"):
        replace(CONFIG, presence_penalty=0.5)
    with pytest.raises(SettingError, match="stop with min_new_tokens needs the vllm backend"):
        replace(CONFIG, stop=["x"], min_new_tokens=2)
    with pytest.raises(SettingError, match="stop must not be empty"):
        replace(CONFIG, stop=[""])
    with pytest.raises(SettingError, match="presence_penalty must be at most 2"):
        replace(CONFIG, backend="vllm", presence_penalty=5.0)


def test_the_repetition_penalty_is_transformers_own_except_on_the_padding():
    """Row 0 is padded on the left with two of token 3 (as the end-of-sequence token often is); row 1 is not."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from sppo_cli.backends.transformers import RepetitionPenalty

    scores = torch.randn(2, 8)
    scores[:, 3] = -1.0
    ids = torch.tensor([[3, 3, 1, 5, 2], [0, 6, 1, 5, 2]])
    ours = RepetitionPenalty(1.5, torch.tensor([2, 0]))(ids, scores.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(ids, scores.clone())
    assert torch.equal(ours[1], theirs[1])  # no padding: the same penalty
    assert ours[0, 3] == -1.0 and theirs[0, 3] == -1.5  # the padding token is not penalised, unless seen
    assert torch.equal(ours[0, [1, 2, 5]], theirs[0, [1, 2, 5]])


def test_the_repetition_penalty_knows_each_prompt_s_padding(tiny_model):
    from sppo_cli.backends.transformers import RepetitionPenalty, TransformersBackend
    from sppo_cli.config import EngineOptions

    backend = TransformersBackend(str(tiny_model), EngineOptions(backend="transformers", batch_size=2))
    used, build = [], backend.model._get_logits_processor
    backend.model._get_logits_processor = lambda *a, **k: used.append(build(*a, **k)) or used[-1]
    backend.generate([[1, 5, 6, 7, 8], [1, 9]], [0, 1], replace(CONFIG, num_samples=2, repetition_penalty=5.0))
    penalty = next(p for p in used[0] if isinstance(p, RepetitionPenalty))
    assert penalty.penalty == 5.0 and penalty.padding.tolist() == [0, 0, 3, 3]  # K = 2 rows per prompt


def test_transformers_samples_with_the_settings_only_not_the_model_s_generation_defaults(tmp_path, tiny_model):
    """A model may ship sampling defaults (Qwen2.5: repetition penalty 1.05; transformers adds top-k 50): vLLM, given
    explicit SamplingParams, ignores them, and so must the transformers backend."""
    import shutil

    from sppo_cli.backends.transformers import TransformersBackend
    from sppo_cli.config import EngineOptions

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "top_k": 20,
                                                              "repetition_penalty": 1.05}))  # fmt: skip
    backend = TransformersBackend(str(model), EngineOptions(backend="transformers"))
    used, build = [], backend.model._get_logits_processor
    backend.model._get_logits_processor = lambda *a, **k: used.append(build(*a, **k)) or used[-1]
    backend.generate([[1, 5, 6, 7]], [0], replace(CONFIG, num_samples=2, max_new_tokens=3))
    assert [type(p).__name__ for p in used[0]] == ["SeededSampler"]  # the model's top-k and penalty are not used


def test_the_seeded_sampler_draws_from_the_tempered_top_p_distribution():
    """The Gumbel-max draw: the argmax of the scores it returns is distributed as softmax(logits / T) restricted to
    the top-p set, each row from its own generator."""
    from sppo_cli.backends.transformers import SeededSampler

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    draws = 20000
    sampler = SeededSampler(list(range(draws)), temperature=0.7, top_p=0.9, device=torch.device("cpu"))
    picked = sampler(torch.zeros(draws, 1, dtype=torch.long), logits.repeat(draws, 1)).argmax(dim=1)
    probabilities = torch.softmax(logits / 0.7, dim=0)
    keep = torch.cumsum(probabilities, 0) - probabilities < 0.9  # the smallest set with 90% of the probability
    expected = torch.where(keep, probabilities, 0.0) / probabilities[keep].sum()
    observed = torch.bincount(picked, minlength=5) / draws
    assert torch.allclose(observed, expected, atol=0.01) and observed[~keep].sum() == 0
    again = SeededSampler([3, 4], 0.7, 0.9, torch.device("cpu"))(torch.zeros(2, 1, dtype=torch.long),
                                                                  logits.repeat(2, 1))  # fmt: skip
    assert torch.equal(again.argmax(dim=1), picked[3:5])  # a row's draw depends on its own seed only
