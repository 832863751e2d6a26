"""Training beyond one plain process: precomputed reference, LoRA, resume, recipes, DeepSpeed ZeRO-3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, finished_output, run_cli
from test_train import ROWS, first_batch, make_trainer, rankings, sequence_logp
from transformers import AutoModelForCausalLM, AutoTokenizer

from sppo_cli.config import TrainConfig
from sppo_cli.errors import SppoError
from sppo_cli.train import last_complete_checkpoint, lora_config, sppo_config, to_trainer_format, train
from sppo_cli.trainer import SPPOTrainer


@pytest.fixture
def rankings_dir(tmp_path):
    return finished_output(rankings(), tmp_path / "rankings", "rank")


def config(**overrides) -> TrainConfig:
    defaults = dict(per_device_train_batch_size=2, learning_rate=1e-3, report_to="none", gradient_checkpointing=False)
    return TrainConfig(**{**defaults, **overrides})


def history(model_dir: Path) -> list[dict]:
    return json.loads((model_dir / "log_history.json").read_text())


def test_precomputed_reference_gives_the_on_the_fly_loss(tmp_path, tiny_model, other_tiny_model):
    reference = AutoModelForCausalLM.from_pretrained(other_tiny_model)
    on_the_fly = make_trainer(tmp_path / "a", tiny_model, beta=0.5, ref_model=reference)
    precomputed = make_trainer(tmp_path / "b", tiny_model, beta=0.5, ref_model=reference, precompute=True)
    batch = first_batch(precomputed)
    assert "ref_chosen_logps" in batch and "chosen_probs_win" in batch
    assert precomputed.compute_loss(precomputed.model, batch).item() == pytest.approx(
        on_the_fly.compute_loss(on_the_fly.model, first_batch(on_the_fly)).item(), rel=1e-5
    )


def test_precomputed_training_matches_on_the_fly_training(tmp_path, tiny_model, rankings_dir):
    train(str(tiny_model), str(rankings_dir), tmp_path / "fly", config())
    train(str(tiny_model), str(rankings_dir), tmp_path / "pre", config(precompute_ref_log_probs=True))
    fly, pre = history(tmp_path / "fly"), history(tmp_path / "pre")
    assert [h["loss"] for h in fly[:2]] == pytest.approx([h["loss"] for h in pre[:2]], rel=1e-5)


def test_lora_reference_is_the_model_without_adapter_and_the_merged_model_is_saved(
    tmp_path, tiny_model, rankings_dir
):
    lora = config(learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj")
    manifest, _ = train(str(tiny_model), str(rankings_dir), tmp_path / "lora", lora)
    assert manifest["parameters"]["lora_r"] == 4
    out = tmp_path / "lora"
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model: the next iteration's generate loads it
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    changed = {n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_lora_trainer_reference_log_probs_are_the_base_model(tmp_path, tiny_model):
    trainer = SPPOTrainer(
        model=str(tiny_model),
        args=sppo_config(config(per_device_train_batch_size=4), tmp_path),
        train_dataset=to_trainer_format(rankings()),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
        peft_config=lora_config(config(lora_r=4, lora_alpha=8)),
    )
    for name, parameter in trainer.model.named_parameters():  # move the policy away from the base
        if "lora_B" in name:
            parameter.data.fill_(0.05)
    batch = first_batch(trainer)
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = trainer.processing_class
    expected = [sequence_logp(base, tokenizer, prompt, chosen) for prompt, chosen, *_ in ROWS]
    assert sorted(ref_chosen.tolist()) == pytest.approx(sorted(expected), rel=1e-5)  # the loader shuffles rows
    assert trainer.compute_loss(trainer.model, batch).item() != pytest.approx(
        sum(0.5 * ((1000 * (w - 0.5)) ** 2 + (1000 * (l - 0.5)) ** 2) for *_, w, l in ROWS) / len(ROWS), rel=1e-9
    )


def test_a_rerun_resumes_from_the_last_checkpoint(tmp_path, tiny_model, rankings_dir, monkeypatch):
    steps = dict(per_device_train_batch_size=1, save_steps=1)
    train(str(tiny_model), str(rankings_dir), tmp_path / "straight", config(**steps))

    original = SPPOTrainer.training_step
    calls = []

    def crash_on_third_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SPPOTrainer, "training_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_model), str(rankings_dir), tmp_path / "resumed", config(**steps))
    partial = tmp_path / "resumed.partial"
    assert (partial / "checkpoint-2").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(SPPOTrainer, "training_step", original)

    with pytest.raises(SppoError, match=r"interrupted run made with other settings or inputs: learning_rate \(0.001 -> "
                       r"0.5\)"):  # fmt: skip
        train(str(tiny_model), str(rankings_dir), tmp_path / "resumed", config(**steps, learning_rate=0.5))
    manifest, _ = train(str(tiny_model), str(rankings_dir), tmp_path / "resumed", config(**{**steps, "save_steps": 3}))
    assert manifest["resumed_from"] == "checkpoint-2" and manifest["steps"] == 4
    assert not partial.exists() and not list((tmp_path / "resumed").glob("checkpoint-*"))
    assert not (tmp_path / "resumed" / "run.json").exists()
    straight = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)  # over all steps, not since resume
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    for (name, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_recipe_sets_defaults_and_flags_override(capsys, tmp_path, tiny_model, rankings_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  learning_rate: 3.0e-4\n  beta: 0.2\n  per_device_train_batch_size: 4\n"
                      "  report_to: none\n  gradient_checkpointing: false\n")
    code, err = run_cli(capsys, "train", "--config", recipe, "--model", tiny_model, "--data", rankings_dir,
                        "--output", tmp_path / "m", "--beta", "0.5")
    assert code == 0, err
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["parameters"]["learning_rate"] == 3e-4 and manifest["parameters"]["beta"] == 0.5
    assert manifest["steps"] == 1

    recipe.write_text("train:\n  learning_rat: 3.0e-4\n")
    code, err = run_cli(capsys, "train", "--config", recipe, "--model", tiny_model, "--data", rankings_dir,
                        "--output", tmp_path / "m2")
    assert code == 1 and "unknown option(s) for `sppo train`: learning_rat" in err


def test_shipped_recipes_are_valid_for_every_stage(capsys):
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        for command in ("generate", "rank", "train"):
            code, err = run_cli(capsys, command, "--config", recipe, "--help")
            assert code == 0, f"{recipe.name} {command}: {err}"


def run_deepspeed(tmp_path, tiny_model, rankings_dir, name, processes, batch):
    command = [
        str(Path(sys.executable).parent / "sppo"), "train", "--model", str(tiny_model), "--data", str(rankings_dir),
        "--output", str(tmp_path / name), "--per-device-train-batch-size", str(batch), "--learning-rate", "1e-3",
        "--report-to", "none", "--no-gradient-checkpointing", "--num-processes", str(processes), "--warmup-steps", "0",
        "--deepspeed", str(REPO / "recipes/deepspeed/zero3.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_deepspeed_zero3_matches_the_plain_run(tmp_path, tiny_model, rankings_dir, processes):
    train(str(tiny_model), str(rankings_dir), tmp_path / "plain", config(per_device_train_batch_size=2, warmup_steps=0))
    zero3 = run_deepspeed(tmp_path, tiny_model, rankings_dir, "zero3", processes, batch=2 // processes)
    plain_history, zero3_history = history(tmp_path / "plain"), history(zero3)
    assert zero3_history[0]["loss"] == pytest.approx(plain_history[0]["loss"], rel=1e-6)
    assert zero3_history[1]["loss"] == pytest.approx(plain_history[1]["loss"], rel=1e-4)
    assert json.loads((zero3 / "manifest.json").read_text())["parameters"]["num_processes"] == processes
    trained = AutoModelForCausalLM.from_pretrained(zero3)  # full 16-bit weights gathered on save
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for (name, p), (_, q) in zip(trained.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


def test_a_launched_process_never_replaces_an_existing_output(capsys, tmp_path, tiny_model, rankings_dir, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # as under accelerate launch or torchrun
    code, err = run_cli(capsys, "train", "--model", tiny_model, "--data", rankings_dir, "--output", rankings_dir)
    assert code == 1 and "pass --overwrite to replace it" in err
    assert (rankings_dir / "manifest.json").exists()


def test_training_leaves_the_rankings_directory_untouched(tmp_path, tiny_model, rankings_dir):
    before = sorted(p.name for p in rankings_dir.iterdir())
    train(str(tiny_model), str(rankings_dir), tmp_path / "model", config(precompute_ref_log_probs=True))
    assert sorted(p.name for p in rankings_dir.iterdir()) == before


def test_a_checkpoint_whose_state_was_cut_short_or_whose_files_are_gone_is_not_resumed_from(tmp_path):
    for step, state in [(2, "{}"), (4, '{"global_st')]:  # the second one's save was killed midway
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
            (tmp_path / f"checkpoint-{step}" / name).write_bytes(b"x")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    for name in ("model.safetensors", "optimizer.pt"):  # a cleanup killed midway: the state is left, not the weights
        (tmp_path / "checkpoint-4" / name).unlink()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-6" / "global_step6").mkdir(parents=True)  # DeepSpeed's layout
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


@pytest.mark.slow
def test_launched_training_honours_overwrite_and_verbose(tmp_path, tiny_model, rankings_dir):
    sppo = str(Path(sys.executable).parent / "sppo")
    args = [sppo, "train", "--model", str(tiny_model), "--data", str(rankings_dir), "--output", str(tmp_path / "m"),
            "--per-device-train-batch-size", "1", "--report-to", "none", "--no-gradient-checkpointing",
            "--num-processes", "2"]  # fmt: skip
    assert subprocess.run(args, capture_output=True, timeout=600).returncode == 0
    result = subprocess.run([*args, "--learning-rate", "1e-4", "--overwrite", "--verbose"], capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[rank 0] INFO sppo: finished" in result.stderr  # the training processes reach the terminal too
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["parameters"]["learning_rate"] == 1e-4 and manifest["parameters"]["num_processes"] == 2


@pytest.mark.slow
def test_two_nodes_train_as_one_node_with_their_processes_together(tmp_path, tiny_model, rankings_dir):
    """Two `sppo train` launchers on this machine, node ranks 0 and 1, one process each (CPU, gloo): the run equals
    the single-process one with the two processes' batch, as the ZeRO-3 test finds for one node."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "sppo"), "train", "--model", str(tiny_model), "--data",
               str(rankings_dir), "--output", str(tmp_path / "two-nodes"), "--per-device-train-batch-size", "1",
               "--learning-rate", "1e-3", "--report-to", "none", "--no-gradient-checkpointing", "--warmup-steps", "0",
               "--num-nodes", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", str(port)]  # fmt: skip
    nodes = [subprocess.Popen([*command, "--node-rank", str(rank)], stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]  # fmt: skip
    errors = [node.communicate(timeout=900)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    train(str(tiny_model), str(rankings_dir), tmp_path / "plain", config(per_device_train_batch_size=2, warmup_steps=0))
    two, plain = history(tmp_path / "two-nodes"), history(tmp_path / "plain")
    losses = [[entry["loss"] for entry in run if "loss" in entry] for run in (two, plain)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    manifest = json.loads((tmp_path / "two-nodes" / "manifest.json").read_text())
    assert (manifest["parameters"]["num_nodes"], manifest["parameters"]["num_processes"]) == (2, 1)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "two-nodes")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for (name, p), (_, q) in zip(trained.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)  # the all-reduce's rounding
    assert not list(tmp_path.glob("two-nodes.launch*"))  # the launchers' exchange directories are gone
