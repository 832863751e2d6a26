import pytest
from datasets import Dataset

from sppo_cli.errors import SppoError
from sppo_cli.generate import SamplingConfig, TransformersBackend, generate
from sppo_cli.models import chat_prompt, encode_chat_prompt, load_tokenizer


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TransformersBackend(str(tiny_model), batch_size=2)


def prompts(*texts: str) -> Dataset:
    return Dataset.from_list([{"prompt": text, "answer": str(i)} for i, text in enumerate(texts)])


def test_prompt_text_is_the_chat_template_with_a_single_bos(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    text = chat_prompt(tokenizer, "What is two plus three?")
    assert text == "<|begin|><|user|>\nWhat is two plus three?<|end|><|assistant|>\n"
    ids = encode_chat_prompt(tokenizer, text)
    assert ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is two plus three?"}], add_generation_prompt=True
    )["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # the trap the tiny tokenizer reproduces: encoding with special tokens doubles BOS
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_k_samples_per_prompt_kept_columns_and_seeded(backend):
    sampling = SamplingConfig(num_samples=3, max_new_tokens=8, seed=7)
    data = prompts("What is two plus three?", "Name a fruit that is red.", "Write a haiku about the sea.")
    first, stats = generate(data, backend, sampling)
    assert first.column_names == ["prompt", "answer", "prompt_text", "responses"]
    assert [len(r) for r in first["responses"]] == [3, 3, 3]
    assert first["answer"] == ["0", "1", "2"]
    assert first["prompt_text"][1] == chat_prompt(backend.tokenizer, "Name a fruit that is red.")
    assert stats["prompts"] == 3 and stats["samples"] == 9 and stats["skipped_too_long"] == 0
    assert 0 < stats["generated_tokens"] <= 9 * 8
    again, _ = generate(data, backend, sampling)
    assert again["responses"] == first["responses"]
    other, _ = generate(data, backend, SamplingConfig(num_samples=3, max_new_tokens=8, seed=8))
    assert other["responses"] != first["responses"]


def test_prompts_longer_than_the_context_are_skipped_and_counted(tiny_model):
    backend = TransformersBackend(str(tiny_model))
    backend.max_model_len = 40
    data = prompts("short one", "long " * 60, "another short one")
    generations, stats = generate(data, backend, SamplingConfig(num_samples=2, max_new_tokens=4))
    assert generations["prompt"] == ["short one", "another short one"]
    assert stats["skipped_too_long"] == 1 and stats["prompts"] == 2
    with pytest.raises(SppoError, match="every prompt is longer than the model's context window"):
        generate(prompts("long " * 60), backend, SamplingConfig(num_samples=2, max_new_tokens=4))


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
