"""kill -9 at any moment of a stage, then the same command again: the output is the uninterrupted run's.

The killed runs are real processes killed with SIGKILL by tests/killpoints/sitecustomize.py at the N-th call of a
chosen function; each one is then resumed by running the same stage again (in this process, for speed)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, finished_output, write_jsonl
from test_train import rankings
from transformers import AutoModelForCausalLM

from sppo_cli.config import GenerateConfig, RankConfig, TrainConfig
from sppo_cli.data import load_stage
from sppo_cli.generate import generate
from sppo_cli.rank import rank
from sppo_cli.train import train

pytestmark = pytest.mark.slow

KILLPOINTS = REPO / "tests" / "killpoints"


def killed(args: list, kill_at: str) -> None:
    """Run `sppo ARGS` and check that it was killed with SIGKILL at `kill_at`."""
    environment = {**os.environ, "SPPO_KILL_AT": kill_at,
                   "PYTHONPATH": os.pathsep.join([str(KILLPOINTS), str(REPO / "tests"),
                                                  os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "sppo_cli.cli", *map(str, args)], env=environment, cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]


def same_output(output: Path, reference: Path) -> None:
    (data, manifest), (expected, expected_manifest) = load_stage(output), load_stage(reference)
    assert data.to_list() == expected.to_list()
    assert manifest["identity"] == expected_manifest["identity"]
    assert {p.name for p in output.iterdir()} == {p.name for p in reference.iterdir()}
    assert not output.with_name(output.name + ".partial").exists()


# os.replace is called for run.json (1), the shard layout (2), each shard (3..6 for four shards), the manifest (7),
# the final rename (8)
DATASET_STAGE_KILLS = [
    "os:replace:1:before",  # before the run's record is in place
    "os:replace:4:before",  # one shard of four finished
    "datasets.arrow_writer:ArrowWriter.write_table:1:before",  # during the final save
    "datasets.arrow_dataset:Dataset.save_to_disk:1:after",  # saved, no manifest yet
    "os:replace:7:after",  # manifest written, not renamed into place
    "os:replace:8:before",  # the scratch files removed, just before the output is renamed into place
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"Question number {i}: name a fruit.", "answer": str(i % 3)} for i in range(7)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


GENERATE = GenerateConfig(num_samples=3, max_new_tokens=6, seed=3, backend="transformers", batch_size=2, shard_size=2)
GENERATE_FLAGS = ["-k", 3, "--max-new-tokens", 6, "--seed", 3, "--backend", "transformers", "--batch-size", 2,
                  "--shard-size", 2]  # fmt: skip


@pytest.fixture(scope="module")
def reference_generations(tmp_path_factory, tiny_model, prompts):
    output = tmp_path_factory.mktemp("reference") / "gens"
    generate(str(tiny_model), str(prompts), output, GENERATE)
    return output


@pytest.mark.parametrize("kill_at", DATASET_STAGE_KILLS)
def test_generate_killed_then_rerun(tmp_path, tiny_model, prompts, reference_generations, kill_at):
    output = tmp_path / "gens"
    killed(["generate", "--model", tiny_model, "--prompts", prompts, "--output", output, *GENERATE_FLAGS], kill_at)
    assert not output.exists()
    manifest, done = generate(str(tiny_model), str(prompts), output, GENERATE)
    assert not done
    same_output(output, reference_generations)


RANK = RankConfig(ranker="python:plugin_rankers:by_length", shard_size=2)


@pytest.mark.parametrize("kill_at", DATASET_STAGE_KILLS)
def test_rank_killed_then_rerun(tmp_path, reference_generations, kill_at):
    reference = tmp_path / "reference"
    rank(str(reference_generations), reference, RANK)
    output = tmp_path / "ranks"
    killed(["rank", "--generations", reference_generations, "--output", output, "--ranker", RANK.ranker,
            "--shard-size", 2], kill_at)  # fmt: skip
    rank(str(reference_generations), output, RANK)
    same_output(output, reference)


TRAIN = TrainConfig(per_device_train_batch_size=1, learning_rate=1e-3, save_steps=1, report_to="none",
                    gradient_checkpointing=False)  # fmt: skip
TRAIN_FLAGS = ["--per-device-train-batch-size", 1, "--learning-rate", 1e-3, "--save-steps", 1, "--report-to", "none",
               "--no-gradient-checkpointing"]  # fmt: skip


@pytest.mark.parametrize(
    "kill_at",
    [
        "transformers.trainer:Trainer._save_checkpoint:3:before",  # two of four steps checkpointed
        "transformers.trainer:Trainer._save_checkpoint:4:after",  # every step checkpointed, the model not saved
        "sppo_cli.stage:StageRun.write_manifest:1:before",  # the model saved, no manifest
        "os:replace:3:before",  # (run.json, the manifest, then) just before the output is renamed into place
    ],
)
def test_train_killed_then_rerun(tmp_path, tiny_model, kill_at):
    data = finished_output(rankings(), tmp_path / "rankings", "rank")
    reference, _ = train(str(tiny_model), str(data), tmp_path / "reference", TRAIN)
    output = tmp_path / "model"
    killed(["train", "--model", tiny_model, "--data", data, "--output", output, *TRAIN_FLAGS], kill_at)
    assert not output.exists()
    manifest, _ = train(str(tiny_model), str(data), output, TRAIN)
    assert manifest["identity"] == reference["identity"] and manifest["steps"] == reference["steps"] == 4
    assert manifest["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    assert json.loads((output / "log_history.json").read_text())[-2]["loss"] == pytest.approx(
        json.loads((tmp_path / "reference" / "log_history.json").read_text())[-2]["loss"], rel=1e-5)  # fmt: skip
    assert not list(output.glob("checkpoint-*")) and not (tmp_path / "model.partial").exists()
    trained, expected = (AutoModelForCausalLM.from_pretrained(p) for p in (output, tmp_path / "reference"))
    for (name, p), (_, q) in zip(trained.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_data_parallel_workers_die_with_a_killed_run(tmp_path, tiny_model, prompts, reference_generations):
    output = tmp_path / "gens"
    # the parent is killed as the first finished shard is reported; its two spawned workers must go with it
    killed(["generate", "--model", tiny_model, "--prompts", prompts, "--output", output, *GENERATE_FLAGS,
            "--data-parallel-size", 2], "sppo_cli.logs:ProgressBar.update:2:before")  # fmt: skip
    shards = tmp_path / "gens.partial" / "shards"
    done = sorted(p.name for p in shards.glob("[0-9]*.json"))
    time.sleep(5)
    assert sorted(p.name for p in shards.glob("[0-9]*.json")) == done  # nobody is writing any more
    generate(str(tiny_model), str(prompts), output, GENERATE)
    same_output(output, reference_generations)


def test_eval_killed_then_rerun(tmp_path, tiny_model, other_tiny_model, prompts):
    from sppo_cli.config import EvalConfig
    from sppo_cli.eval import evaluate

    config = EvalConfig(num_samples=2, ranker="python:plugin_rankers:by_length", max_new_tokens=6,
                        backend="transformers", batch_size=2, shard_size=2, seed=3)  # fmt: skip
    flags = ["-k", 2, "--ranker", config.ranker, "--max-new-tokens", 6, "--backend", "transformers", "--batch-size", 2,
             "--shard-size", 2, "--seed", 3]  # fmt: skip
    reference = tmp_path / "reference"
    evaluate(str(tiny_model), str(other_tiny_model), str(prompts), reference, config)
    # os.replace: run.json (1), then per phase a layout and its shards: the model's (2..6), the baseline's (7..11)
    for kill_at in ["os:replace:9:before", "datasets.arrow_dataset:Dataset.save_to_disk:1:after"]:
        output = tmp_path / kill_at.replace(":", "_")
        killed(["eval", "--model", tiny_model, "--baseline", other_tiny_model, "--prompts", prompts, "--output", output,
                *flags], kill_at)  # fmt: skip
        evaluate(str(tiny_model), str(other_tiny_model), str(prompts), output, config)
        same_output(output, reference)


def test_what_a_killed_command_started_outside_its_control_dies_with_it(tmp_path):
    """vLLM starts its engine processes untied to their parent (measured: ~5.5 GB left for 15 minutes after a kill -9);
    the watcher sppo forks before loading vLLM kills them. Here the parent starts such a process itself."""
    script = ("import subprocess, sys, time\n"
              "from sppo_cli.parallel import reap_descendants_on_death\n"
              "reap_descendants_on_death()\n"
              "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
              "engine = subprocess.Popen(sleeper, start_new_session=True)\n"
              "print(engine.pid, flush=True)\n"
              "time.sleep(600)\n")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    engine = int(parent.stdout.readline())
    time.sleep(2)  # the watcher has looked since (it looks twice a second)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while alive(engine) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(engine)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False
