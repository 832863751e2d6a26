import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from sppo_cli.data import save_stage
from sppo_cli.errors import SppoError
from sppo_cli.rank import conversation
from sppo_cli.train import SPPOConfig, SPPOTrainer, load_rankings, sppo_loss, to_trainer_format, train

ROWS = [
    ("What is two plus three?", "five", "seven and more", 0.9, 0.7, 0.3),
    ("Name a fruit that is red.", "an apple", "blue", 0.6, 0.55, 0.45),
    ("How many legs does a spider have?", "eight legs", "two", 0.75, 0.6, 0.35),
    ("Write a haiku about the sea.", "waves fold into foam", "no", 0.55, 0.52, 0.5),
]


def rankings() -> Dataset:
    return Dataset.from_list(
        [
            {
                "chosen": conversation(prompt, chosen),
                "rejected": conversation(prompt, rejected),
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
    full_ids = tokenizer.apply_chat_template(conversation(prompt, response))
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
    with pytest.raises(SppoError, match="--loss must be one of"):
        SPPOConfig(output_dir="x", loss_type=["sigmoid"], report_to=[])
    with pytest.raises(SppoError, match="--beta must be positive"):
        SPPOConfig(output_dir="x", beta=0.0, report_to=[])


def test_load_rankings_validates_the_published_format(tmp_path):
    bad = rankings().remove_columns("chosen_probs_lose")
    save_stage(bad, tmp_path / "bad", "rank", {}, {})
    with pytest.raises(SppoError, match="missing column.*'chosen_probs_lose'"):
        load_rankings(str(tmp_path / "bad"))
    path = tmp_path / "published.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rankings()))
    assert len(load_rankings(str(path))) == len(ROWS)


def test_train_saves_a_model_the_next_iteration_can_load(tmp_path, tiny_model):
    save_stage(rankings(), tmp_path / "rankings", "rank", {}, {})
    config = SPPOConfig(output_dir="unused", per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                        gradient_checkpointing=False)
    manifest = train(str(tiny_model), str(tmp_path / "rankings"), tmp_path / "model", config)
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
