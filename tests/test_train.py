import json
from pathlib import Path

import pytest
import torch
from conftest import finished_output
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from sppo_cli.config import TrainConfig
from sppo_cli.data import load_stage
from sppo_cli.errors import SppoError
from sppo_cli.train import load_rankings, to_trainer_format, train
from sppo_cli.trainer import SPPOConfig, SPPOTrainer, sppo_loss

ROWS = [
    ("What is two plus three?", "five", "seven and more", 0.9, 0.7, 0.3),
    ("Name a fruit that is red.", "an apple", "blue", 0.6, 0.55, 0.45),
    ("How many legs does a spider have?", "eight legs", "two", 0.75, 0.6, 0.35),
    ("Write a haiku about the sea.", "waves fold into foam", "no", 0.55, 0.52, 0.5),
]


def reply(prompt: str, response: str) -> list[dict[str, str]]:
    """A one-turn conversation and its answer, as rankings hold them."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def rankings() -> Dataset:
    return Dataset.from_list(
        [
            {
                "chosen": reply(prompt, chosen),
                "rejected": reply(prompt, rejected),
                "chosen_probs": probs,
                "chosen_probs_win": win,
                "chosen_probs_lose": lose,
            }
            for prompt, chosen, rejected, probs, win, lose in ROWS
        ]
    )


def test_losses_against_hand_computed_values():
    dw, dl = torch.tensor([3.0]), torch.tensor([-2.0])
    rates = {"chosen_probs": torch.tensor([0.8]), "chosen_probs_win": torch.tensor([0.7]),
             "chosen_probs_lose": torch.tensor([0.4])}
    # beta = 0.1, eta = 10
    # sppo: 1/2 [(3 - 10*0.2)^2 + (-2 - 10*(-0.1))^2] = 1/2 [1 + 1] = 1
    assert sppo_loss(dw, dl, rates, 0.1, "sppo").item() == pytest.approx(1.0)
    # sppo_single: 1/2 [(3 - 10*0.3)^2 + (-2 + 10*0.3)^2] = 1/2 [0 + 1] = 0.5
    assert sppo_loss(dw, dl, rates, 0.1, "sppo_single").item() == pytest.approx(0.5)
    # sppo_hard: (3 - 5)^2 + (-2 + 5)^2 = 4 + 9 = 13
    assert sppo_loss(dw, dl, rates, 0.1, "sppo_hard").item() == pytest.approx(13.0)
    with pytest.raises(SppoError, match="unknown loss"):
        sppo_loss(dw, dl, rates, 0.1, "dpo")


def make_trainer(tmp_path, model_path, loss="sppo", beta=0.001, ref_model=None, precompute=False):
    config = SPPOConfig(
        output_dir=str(tmp_path / "out"),
        loss_type=[loss],
        beta=beta,
        per_device_train_batch_size=4,
        report_to=[],
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return SPPOTrainer(
        model=str(model_path),
        ref_model=ref_model,
        args=config,
        train_dataset=to_trainer_format(rankings()),
        processing_class=tokenizer,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_first_step_loss_with_theta_equal_to_reference(tmp_path, tiny_model):
    trainer = make_trainer(tmp_path, tiny_model)
    batch = first_batch(trainer)
    assert batch["chosen_probs_win"].dtype == torch.float32
    loss = trainer.compute_loss(trainer.model, batch).item()
    eta = 1000.0
    expected = sum(0.5 * ((eta * (w - 0.5)) ** 2 + (eta * (l - 0.5)) ** 2) for *_, w, l in ROWS) / len(ROWS)
    assert loss == pytest.approx(expected, rel=1e-6)


def sequence_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log pi(response | prompt), summed over the response tokens, computed the plain way."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(reply(prompt, response))
    prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(full_ids[1:])[:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].sum().item()


@pytest.mark.parametrize("loss", ["sppo", "sppo_single", "sppo_hard"])
def test_loss_with_a_different_reference_matches_plain_log_probs(tmp_path, tiny_model, other_tiny_model, loss):
    reference = AutoModelForCausalLM.from_pretrained(other_tiny_model)
    trainer = make_trainer(tmp_path, tiny_model, loss=loss, beta=0.5, ref_model=reference)
    batch = first_batch(trainer)
    actual = trainer.compute_loss(trainer.model, batch).item()

    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    plain_reference = AutoModelForCausalLM.from_pretrained(other_tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eta, losses = 2.0, []
    for prompt, chosen, rejected, probs, win, lose in ROWS:
        dw = sequence_logp(policy, tokenizer, prompt, chosen) - sequence_logp(plain_reference, tokenizer, prompt, chosen)
        dl = sequence_logp(policy, tokenizer, prompt, rejected) - sequence_logp(
            plain_reference, tokenizer, prompt, rejected
        )
        if loss == "sppo":
            losses.append(0.5 * ((dw - eta * (win - 0.5)) ** 2 + (dl - eta * (lose - 0.5)) ** 2))
        elif loss == "sppo_single":
            losses.append(0.5 * ((dw - eta * (probs - 0.5)) ** 2 + (dl + eta * (probs - 0.5)) ** 2))
        else:
            losses.append((dw - eta / 2) ** 2 + (dl + eta / 2) ** 2)
    assert actual == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_sppo_hard_equals_trl_dpo_trainer_sppo_hard(tmp_path, tiny_model, other_tiny_model):
    ours = make_trainer(tmp_path, tiny_model, loss="sppo_hard", beta=0.5,
                        ref_model=AutoModelForCausalLM.from_pretrained(other_tiny_model))
    config = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=["sppo_hard"], beta=0.5, bf16=False,
                       per_device_train_batch_size=4, report_to=[], gradient_checkpointing=False)
    trl = DPOTrainer(model=str(tiny_model), ref_model=AutoModelForCausalLM.from_pretrained(other_tiny_model),
                     args=config, train_dataset=to_trainer_format(rankings()),
                     processing_class=AutoTokenizer.from_pretrained(tiny_model))
    ours_batch, trl_batch = first_batch(ours), first_batch(trl)
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    assert ours.compute_loss(ours.model, ours_batch).item() == pytest.approx(
        trl.compute_loss(trl.model, trl_batch).item(), rel=1e-6
    )


def test_config_rejects_unknown_loss_and_bad_beta():
    with pytest.raises(SppoError, match="loss must be one of"):
        SPPOConfig(output_dir="x", loss_type=["hinge"], report_to=[])
    with pytest.raises(SppoError, match="beta must be positive"):
        SPPOConfig(output_dir="x", beta=0.0, report_to=[])


def test_load_rankings_validates_the_published_format(tmp_path):
    bad = rankings().remove_columns("chosen_probs_lose")
    finished_output(bad, tmp_path / "bad", "rank")
    with pytest.raises(SppoError, match="missing column.*'chosen_probs_lose'"):
        load_rankings(str(tmp_path / "bad"))
    path = tmp_path / "published.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rankings()))
    data, vocabulary = load_rankings(str(path))
    assert len(data) == len(ROWS) and vocabulary is None  # no sampled token ids to train on


def test_train_saves_a_model_the_next_iteration_can_load(tmp_path, tiny_model):
    finished_output(rankings(), tmp_path / "rankings", "rank")
    config = TrainConfig(per_device_train_batch_size=2, learning_rate=1e-3, report_to="none",
                         gradient_checkpointing=False)  # fmt: skip
    manifest, _ = train(str(tiny_model), str(tmp_path / "rankings"), tmp_path / "model", config)
    assert manifest["stage"] == "train" and manifest["steps"] == 2 and manifest["rows"] == 4
    out = tmp_path / "model"
    assert not list(out.glob("checkpoint-*")) and not (tmp_path / "model.partial").exists()
    history = json.loads((out / "log_history.json").read_text())
    assert {"loss", "rewards/chosen", "logratios/chosen", "logratios/rejected"} <= set(history[0])
    trained = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)


# ---- what training conditions on ------------------------------------------------------------------------------------

CLOCK_TEMPLATE = (  # renders differently at every call, like a template that prints today's date
    "{{ bos_token }}<|system|>\nnow {{ strftime_now('%H:%M:%S.%f') }}<|end|>"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def clock_model(tmp_path_factory, tiny_model):
    import shutil

    path = tmp_path_factory.mktemp("clock") / "model"
    shutil.copytree(tiny_model, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CLOCK_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_training_conditions_on_exactly_the_prompt_text_that_was_sampled_from(tmp_path, clock_model):
    from sppo_cli.config import GenerateConfig, RankConfig
    from sppo_cli.generate import sample
    from sppo_cli.rank import rank_all

    prompts = Dataset.from_list([{"prompt": f"Question {i}?",
                                  "conversation": [{"role": "user", "content": f"Question {i}?"}]}
                                 for i in range(4)])  # fmt: skip
    config = GenerateConfig(num_samples=3, max_new_tokens=6, backend="transformers")
    generations, _ = sample(str(clock_model), prompts, config, tmp_path / "g")
    rankings, _ = rank_all(generations, RankConfig(ranker="python:plugin_rankers:by_length"), tmp_path / "r")
    tokenizer = AutoTokenizer.from_pretrained(clock_model)
    rendered_now = tokenizer.apply_chat_template(rankings[0]["chosen"][:-1], tokenize=False, add_generation_prompt=True)
    assert rendered_now != rankings[0]["prompt_text"]  # the template would not give back what was sampled from

    config = SPPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[],
                        gradient_checkpointing=False)  # fmt: skip
    trainer = SPPOTrainer(model=str(clock_model), args=config, train_dataset=to_trainer_format(rankings),
                          processing_class=tokenizer)  # fmt: skip
    by_prompt = {tuple(row["prompt_ids"]): row for row in trainer.train_dataset}
    for row in rankings:
        sampled_ids = tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
        tokenized = by_prompt[tuple(sampled_ids)]  # the very ids generation fed the model
        end = tokenizer.convert_tokens_to_ids("<|end|>")
        assert tokenized["chosen_ids"] == tokenizer(row["chosen"][-1]["content"], add_special_tokens=False)[
            "input_ids"] + [end]  # fmt: skip
        assert sampled_ids.count(tokenizer.bos_token_id) == 1


def test_published_format_rows_are_rendered_by_the_template_and_long_prompts_cut_from_the_left(tmp_path, tiny_model):
    from sppo_cli.trainer import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = rankings()[0]
    tokenized = tokenize_row(tokenizer, 1024, None, row)
    assert tokenized["prompt_ids"] == tokenizer.apply_chat_template(row["chosen"][:-1], add_generation_prompt=True)[
        "input_ids"]  # fmt: skip
    long_row = {**row, "prompt_text": "<|begin|>" + "the cat likes " * 40}
    full = tokenize_row(tokenizer, 1024, 16, long_row)
    cut = tokenize_row(tokenizer, 40, 16, long_row)
    assert len(full["prompt_ids"]) > 40 and cut["prompt_ids"] == full["prompt_ids"][-16:]  # old TRL's keep-end rule
    assert cut["chosen_ids"] == full["chosen_ids"]


# ---- trl parity: mixture of experts, gradient accumulation, settings ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    from sppo_cli.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                           num_experts_per_tok=2, router_aux_loss_coef=0.5, max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("moe") / "moe"
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_mixture_of_experts_policy_keeps_its_router_load_balancing_loss_as_in_trl(tmp_path, tiny_moe):
    ours = make_trainer(tmp_path, tiny_moe, loss="sppo_hard", beta=0.5)
    assert ours.aux_loss_enabled and ours.router_aux_loss_coef == 0.5
    config = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=["sppo_hard"], beta=0.5, bf16=False,
                       per_device_train_batch_size=4, report_to=[], gradient_checkpointing=False)  # fmt: skip
    trl = DPOTrainer(model=str(tiny_moe), args=config, train_dataset=Dataset.from_list(
        [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rankings()]),
        processing_class=AutoTokenizer.from_pretrained(tiny_moe))  # fmt: skip
    ours_batch, trl_batch = first_batch(ours), first_batch(trl)
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    ours_loss = ours.compute_loss(ours.model, ours_batch).item()
    assert ours_loss == pytest.approx(trl.compute_loss(trl.model, trl_batch).item(), rel=1e-6)
    mode = "train" if ours.model.training else "eval"
    aux = ours._metrics[mode]["aux_loss"][-1]
    ours.aux_loss_enabled = False
    without_aux = ours.compute_loss(ours.model, ours_batch).item()
    assert aux > 0 and ours_loss == pytest.approx(without_aux + 0.5 * aux, rel=1e-6)


def test_gradient_accumulation_gives_the_larger_batch_s_update(tmp_path, tiny_model):
    finished_output(rankings(), tmp_path / "rankings", "rank")
    # plain SGD: an update proportional to the gradient (Adam's first step would only show the gradient's sign)
    common = dict(learning_rate=1e-5, warmup_steps=0, max_steps=1, report_to="none", gradient_checkpointing=False,
                  optim="sgd", max_grad_norm=0.0)  # fmt: skip
    train(str(tiny_model), str(tmp_path / "rankings"), tmp_path / "big",
          TrainConfig(per_device_train_batch_size=4, **common))  # fmt: skip
    train(str(tiny_model), str(tmp_path / "rankings"), tmp_path / "accumulated",
          TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, **common))  # fmt: skip
    big = AutoModelForCausalLM.from_pretrained(tmp_path / "big")
    accumulated = AutoModelForCausalLM.from_pretrained(tmp_path / "accumulated")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(big.lm_head.weight, base.lm_head.weight)
    for (name, p), (_, q), (_, b) in zip(big.named_parameters(), accumulated.named_parameters(),
                                         base.named_parameters()):  # fmt: skip
        torch.testing.assert_close(p - b, q - b, rtol=1e-3, atol=1e-7)  # float32 rounding of the weights: ~1e-8


def test_every_train_setting_reaches_the_trainer(tmp_path):
    import dataclasses

    from sppo_cli.train import _EXPLICIT, sppo_config

    trainer_fields = {f.name for f in dataclasses.fields(SPPOConfig)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - trainer_fields <= _EXPLICIT
    config = TrainConfig(optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=3, weight_decay=0.1,
                         max_grad_norm=0.5, max_prompt_length=64, run_name="r1", logging_steps=5,
                         attn_implementation="eager", dtype="bfloat16", report_to="none",
                         loss="sppo_single")  # fmt: skip
    trainer_config = sppo_config(config, tmp_path)
    assert (trainer_config.optim, trainer_config.lr_scheduler_type, trainer_config.warmup_steps) == (
        "adamw_torch", "cosine", 3)  # fmt: skip
    assert (trainer_config.weight_decay, trainer_config.max_grad_norm, trainer_config.max_prompt_length) == (0.1, 0.5,
                                                                                                            64)
    assert trainer_config.run_name == "r1" and trainer_config.logging_steps == 5 and trainer_config.report_to == []
    assert trainer_config.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "eager"}
    assert trainer_config.loss_type == ["sppo_single"]
    # the paper's settings are the defaults of both the command line and the library
    paper = SPPOConfig(output_dir=str(tmp_path))
    assert (paper.learning_rate, paper.beta, paper.optim, paper.warmup_steps, paper.lr_scheduler_type) == (
        5e-7, 0.001, "rmsprop", 0.1, "linear")  # fmt: skip


def test_an_unsupported_trl_is_refused_with_a_clear_message():
    from sppo_cli.trainer import check_trl_version

    check_trl_version("1.16.3")
    with pytest.raises(SppoError, match=r"sppo needs trl <1.17,>=1.16 \(found 1.17.0\)"):
        check_trl_version("1.17.0")


def test_a_resumed_generation_keeps_the_prompt_text_its_finished_shards_were_sampled_from(tmp_path, clock_model,
                                                                                         monkeypatch):  # fmt: skip
    from sppo_cli import generate as gen
    from sppo_cli.config import GenerateConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    config = GenerateConfig(num_samples=2, max_new_tokens=4, backend="transformers", shard_size=1)
    real, calls = gen.sample_shard, []

    def sample_then_crash(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gen, "sample_shard", sample_then_crash)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(str(clock_model), str(prompts), tmp_path / "gens", config)
    first = json.loads((tmp_path / "gens.partial" / "shards" / "000000.json").read_text())["per_row"]["prompt_text"]
    monkeypatch.setattr(gen, "sample_shard", real)
    gen.generate(str(clock_model), str(prompts), tmp_path / "gens", config)
    from sppo_cli.data import load_stage

    generations = load_stage(tmp_path / "gens")[0]
    assert generations["prompt_text"][:1] == first  # not the template's rendering on the second run
    assert generations["prompt_text"][1] != first[0].replace("Question 0", "Question 1")


def test_a_prompt_that_fills_max_length_is_dropped_and_counted(tmp_path, tiny_model):
    rows = rankings().to_list()
    rows[0]["prompt_text"] = "<|begin|>" + "the cat likes " * 40
    for row in rows[1:]:
        row["prompt_text"] = None
    finished_output(Dataset.from_list(rows), tmp_path / "rankings", "rank")
    config = TrainConfig(per_device_train_batch_size=2, max_length=64, report_to="none", gradient_checkpointing=False)
    manifest, _ = train(str(tiny_model), str(tmp_path / "rankings"), tmp_path / "model", config)
    assert manifest["rows"] == 3 and manifest["dropped_prompt_too_long"] == 1


CHATS = [
    {"messages": [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Hi there."},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a red fruit."},
                  {"role": "assistant", "content": "Apple."}]},  # UltraFeedback-style: ends with an answer
    {"messages": [{"role": "user", "content": "What is two plus three?"}]},  # gets the --system-prompt
]


def conversation_through_the_pipeline(tmp_path, model: str, monkeypatch, **engine):
    """generate -> rank -> the trainer's token ids, for multi-turn and system-prompt conversations; returns the
    prompt ids each backend was fed and the trainer's rows."""
    from sppo_cli import generate as gen
    from sppo_cli.config import GenerateConfig, RankConfig
    from sppo_cli.data import load_stage
    from sppo_cli.rank import rank

    fed = []
    make = gen.make_backend

    def recording(*args):
        backend_ = make(*args)
        real = backend_.generate
        monkeypatch.setattr(backend_, "generate", lambda ids, seeds, s: fed.extend(ids) or real(ids, seeds, s))
        return backend_

    monkeypatch.setattr(gen, "make_backend", recording)
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    config = GenerateConfig(num_samples=3, max_new_tokens=6, prompt_column="messages", system_prompt="Be kind.",
                            **engine)  # fmt: skip
    gen.generate(model, str(prompts), tmp_path / "gens", config)
    rank(str(tmp_path / "gens"), tmp_path / "ranks", RankConfig(ranker="python:plugin_rankers:by_length"))
    rankings = load_stage(tmp_path / "ranks")[0]
    config = SPPOConfig(output_dir=str(tmp_path / "out"), report_to=[], gradient_checkpointing=False)
    trainer = SPPOTrainer(model=model, args=config, train_dataset=to_trainer_format(rankings),
                          processing_class=AutoTokenizer.from_pretrained(model))  # fmt: skip
    return fed, rankings, list(trainer.train_dataset)


def test_conversations_reach_every_stage_with_the_tokens_that_were_sampled_from(tmp_path, tiny_model, monkeypatch):
    fed, rankings, trained = conversation_through_the_pipeline(tmp_path, str(tiny_model), monkeypatch,
                                                               backend="transformers")  # fmt: skip
    first, second = rankings["chosen"][0], rankings["chosen"][1]
    assert first[:4] == CHATS[0]["messages"][:4] and first[4]["role"] == "assistant"  # the whole conversation
    assert second[:2] == [{"role": "system", "content": "Be kind."}, CHATS[1]["messages"][0]]
    assert [row["prompt_ids"] for row in trained] == fed  # training conditions on the very tokens sampled from
    assert "<|system|>\nYou answer in one word.<|end|><|user|>\nHi there.<|end|><|assistant|>\nHello.<|end|>" in \
        rankings["prompt_text"][0]  # fmt: skip


def test_training_uses_the_chat_template_the_responses_were_sampled_with(tmp_path, tiny_model):
    from sppo_cli.config import GenerateConfig, RankConfig
    from sppo_cli.generate import generate
    from sppo_cli.rank import rank
    from sppo_cli.train import load_inputs

    template, other = tmp_path / "t.jinja", tmp_path / "other.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    other.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt, *_ in ROWS))
    generate(str(tiny_model), str(prompts), tmp_path / "g", GenerateConfig(
        num_samples=4, max_new_tokens=8, backend="transformers", chat_template=str(template)))  # fmt: skip
    rank(str(tmp_path / "g"), tmp_path / "r", RankConfig(ranker="python:plugin_rankers:by_length"))
    with pytest.raises(SppoError, match="sampled with another --chat-template: train with the one it was sampled"):
        load_inputs(str(tiny_model), str(tmp_path / "r"))
    with pytest.raises(SppoError, match="sampled with another --chat-template"):
        load_inputs(str(tiny_model), str(tmp_path / "r"), str(other))
    tokenizer, _ = load_inputs(str(tiny_model), str(tmp_path / "r"), str(template))
    assert tokenizer.chat_template == template.read_text()


@pytest.mark.parametrize("loss, trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_the_dpo_and_ipo_baselines_are_trl_s_own_losses(tmp_path, tiny_model, other_tiny_model, loss, trl_loss):
    from sppo_cli.train import sppo_config

    config = sppo_config(TrainConfig(loss=loss, beta=0.1, per_device_train_batch_size=4, report_to="none",
                                     gradient_checkpointing=False), tmp_path / "ours")  # fmt: skip
    ours = SPPOTrainer(model=str(tiny_model), ref_model=AutoModelForCausalLM.from_pretrained(other_tiny_model),
                       args=config, train_dataset=to_trainer_format(rankings()),
                       processing_class=AutoTokenizer.from_pretrained(tiny_model))  # fmt: skip
    reference = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[trl_loss], beta=0.1, bf16=False,
                          per_device_train_batch_size=4, report_to=[], gradient_checkpointing=False)  # fmt: skip
    trl = DPOTrainer(model=str(tiny_model), ref_model=AutoModelForCausalLM.from_pretrained(other_tiny_model),
                     args=reference, train_dataset=to_trainer_format(rankings()),
                     processing_class=AutoTokenizer.from_pretrained(tiny_model))  # fmt: skip
    ours_batch, trl_batch = first_batch(ours), first_batch(trl)
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    value = ours.compute_loss(ours.model, ours_batch).item()
    assert value == pytest.approx(trl.compute_loss(trl.model, trl_batch).item(), rel=1e-6)


# ---- training scores what was sampled --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_rankings(tmp_path_factory, tiny_model) -> Path:
    """`sppo generate` then `sppo rank` outputs: the random tiny model samples bytes that are not valid UTF-8 on their
    own, and --max-new-tokens 6 cuts off most responses."""
    from sppo_cli.config import GenerateConfig, RankConfig
    from sppo_cli.generate import generate
    from sppo_cli.rank import rank

    directory = tmp_path_factory.mktemp("sampled")
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: name a fruit."}) + "\n" for i in range(8)))
    generate(str(tiny_model), str(prompts), directory / "gens", GenerateConfig(num_samples=4, max_new_tokens=6,
             backend="transformers"))  # fmt: skip
    rank(str(directory / "gens"), directory / "ranks", RankConfig(ranker="python:plugin_rankers:by_length"))
    return directory / "ranks"


def test_training_scores_the_sampled_token_ids_not_the_re_tokenized_text(tmp_path, tiny_model, sampled_rankings):
    from sppo_cli.train import load_inputs

    tokenizer, dataset = load_inputs(str(tiny_model), str(sampled_rankings))
    config = SPPOConfig(output_dir=str(tmp_path / "out"), report_to=[], gradient_checkpointing=False)
    trainer = SPPOTrainer(model=str(tiny_model), args=config, train_dataset=dataset, processing_class=tokenizer)
    rankings = load_stage(sampled_rankings)[0]
    trained = list(trainer.train_dataset)
    assert [row["prompt_ids"] for row in trained] == rankings["prompt_token_ids"]
    assert [row["chosen_ids"] for row in trained] == rankings["chosen_token_ids"]
    assert [row["rejected_ids"] for row in trained] == rankings["rejected_token_ids"]
    for row in rankings:  # the ids are the sampled ones: the K responses' ids at the chosen and rejected positions
        assert row["chosen_token_ids"] == row["response_token_ids"][row["chosen_index"]]
        assert row["rejected_token_ids"] == row["response_token_ids"][row["rejected_index"]]
    text = rankings["chosen"]
    retokenized = [tokenizer(t[-1]["content"], add_special_tokens=False)["input_ids"] for t in text]
    assert any(ids != again for ids, again in zip(rankings["chosen_token_ids"], retokenized))  # text loses them
    end = tokenizer.convert_tokens_to_ids("<|end|>")  # the template's end of turn, and the model's end of sequence
    truncated = [row for row in rankings if row["finish_reasons"][row["chosen_index"]] == "length"]
    assert truncated and all(len(r["chosen_token_ids"]) == 6 and end not in r["chosen_token_ids"] for r in truncated)


def test_token_ids_of_another_vocabulary_are_not_trained_on(tmp_path, tiny_model, sampled_rankings):
    import shutil

    from sppo_cli.train import load_inputs

    other = tmp_path / "ranks"
    shutil.copytree(sampled_rankings, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "sampled_vocabulary": "sha256:another"}))
    _, dataset = load_inputs(str(tiny_model), str(other))
    assert "chosen_token_ids" not in dataset.column_names  # re-tokenized from the text instead
    _, dataset = load_inputs(str(tiny_model), str(sampled_rankings))
    assert "chosen_token_ids" in dataset.column_names


def test_the_paper_s_warmup_starts_below_the_peak_learning_rate(tmp_path, tiny_model):
    finished_output(rankings(), tmp_path / "rankings", "rank")
    config = TrainConfig(per_device_train_batch_size=1, num_train_epochs=3, learning_rate=1e-3, optim="adamw_torch",
                         report_to="none", gradient_checkpointing=False)  # fmt: skip
    assert config.warmup_steps == 0.1  # the paper's warm-up ratio: 2 of 12 steps
    train(str(tiny_model), str(tmp_path / "rankings"), tmp_path / "model", config)
    rates = [entry["learning_rate"] for entry in json.loads((tmp_path / "model" / "log_history.json").read_text())
             if "learning_rate" in entry]  # fmt: skip
    assert rates[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and max(rates) == pytest.approx(1e-3)  # then linear decay
    assert rates[3:] == pytest.approx([1e-3 * (12 - step) / 10 for step in range(3, 12)])


def test_progress_metrics_have_the_signs_of_known_targets():
    """Targets eta (P - 1/2): the chosen's positive, the rejected's negative here; a log-ratio counts as toward its
    target when it has the target's sign; drift is the mean log-ratio of the two responses."""
    from sppo_cli.trainer import sppo_targets

    rates = {"chosen_probs": torch.tensor([0.8, 0.6]), "chosen_probs_win": torch.tensor([0.7, 0.6]),
             "chosen_probs_lose": torch.tensor([0.4, 0.2])}  # fmt: skip
    chosen, rejected = sppo_targets(rates, 0.001, "sppo")
    assert chosen.tolist() == pytest.approx([200.0, 100.0]) and rejected.tolist() == pytest.approx([-100.0, -300.0])
    assert torch.cat(sppo_targets(rates, 0.5, "sppo_single")).tolist() == pytest.approx([0.6, 0.2, -0.6, -0.2])
    assert torch.cat(sppo_targets(rates, 0.5, "sppo_hard")).tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0])


def test_training_logs_progress_toward_the_targets(tmp_path, tiny_model, sampled_rankings):
    """At the paper's beta, targets of hundreds of nats: the log-ratios move toward them, a few nats at a time."""
    config = TrainConfig(per_device_train_batch_size=2, num_train_epochs=4, learning_rate=1e-3, optim="adamw_torch",
                         warmup_steps=0, report_to="none", gradient_checkpointing=False)  # fmt: skip
    manifest, _ = train(str(tiny_model), str(sampled_rankings), tmp_path / "model", config)
    history = [entry for entry in json.loads((tmp_path / "model" / "log_history.json").read_text()) if "loss" in entry]
    first, last = history[0], manifest["final_progress"]
    assert first["logratios/chosen"] == first["logratios/drift"] == 0.0  # the policy is its reference
    assert first["targets/chosen"] > 0 > first["targets/rejected"]
    assert last["logratios/chosen"] > 0 > last["logratios/rejected"] and last["logratios/toward_target"] == 1.0
    assert last["logratios/drift"] == pytest.approx((last["logratios/chosen"] + last["logratios/rejected"]) / 2)
    assert manifest["responses_trained_as"] == "sampled token ids"
