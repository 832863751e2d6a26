"""pipeline.sh end to end: 2 SPPO iterations on the tiny model, each evaluated, then a resume, then other settings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO


def run_pipeline(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPPO": str(Path(sys.executable).parent / "sppo"), **(env or {})}
    return subprocess.run(
        [str(REPO / "pipeline.sh"), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO
    )


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.slow
def test_two_evaluated_iterations_a_resume_and_other_settings(tmp_path, tiny_model, prompts_file):
    # a disjoint prompt set per iteration, as in the paper: {iter} is replaced by the iteration number
    (tmp_path / "prompts1.jsonl").write_text(prompts_file.read_text())
    (tmp_path / "prompts2.jsonl").write_text(prompts_file.read_text().replace("?", "??"))
    rows = [{"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(4)]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("generate:\n  backend: transformers\n  max_new_tokens: 6\n"
                      "train:\n  per_device_train_batch_size: 4\n  learning_rate: 1.0e-3\n  report_to: none\n"
                      "  gradient_checkpointing: false\n"
                      "eval:\n  ranker: rule:math\n  backend: transformers\n  num_samples: 2\n  max_new_tokens: 6\n")
    args = ["--model", tiny_model, "--prompts", tmp_path / "prompts{iter}.jsonl", "--iter", 2,
            "--output-dir", tmp_path / "run", "--recipe", recipe, "--num-samples", 3,
            "--rank-args", "--ranker python:plugin_rankers:by_length", "--eval-prompts", tmp_path / "heldout.jsonl",
            "--eval-command", "echo model={model} iteration={iter} > {output}/result.txt"]  # fmt: skip
    plugins = {"PYTHONPATH": str(REPO / "tests")}
    result = run_pipeline(*args, env=plugins)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for t in (1, 2):
        for stage in ("generations", "rankings", "model", "eval"):
            assert manifest(run / f"iter{t}" / stage)["complete"]
    # iteration 2 samples from and is referenced to iteration 1's model, on its own prompts
    assert manifest(run / "iter1/generations")["inputs"]["model"] == str(tiny_model)
    assert manifest(run / "iter2/generations")["inputs"]["model"] == str(run / "iter1/model")
    assert manifest(run / "iter2/model")["inputs"]["model"] == str(run / "iter1/model")
    assert manifest(run / "iter2/generations")["parameters"]["num_samples"] == 3  # the flag over the recipe
    assert manifest(run / "iter2/generations")["inputs"]["prompts"] == str(tmp_path / "prompts2.jsonl")
    assert manifest(run / "iter1/model")["steps"] == 1
    # each iteration evaluated against the base model, sampled once, and against the one before
    assert manifest(run / "iter0/eval")["metrics"]["win_rate"] == 0.5  # the base model against itself
    assert manifest(run / "iter1/eval")["inputs"]["baseline"] == str(run / "iter0/eval")
    assert manifest(run / "iter2/eval-previous")["inputs"] == {"model": str(run / "iter2/eval"),
                                                               "baseline": str(run / "iter1/eval")}  # fmt: skip
    assert not (run / "iter1/eval-previous").exists()  # iteration 1's previous model is the base model
    assert (run / "iter2/eval-command/result.txt").read_text().strip() == f"model={run / 'iter2/model'} iteration=2"
    assert "| 2 |" in (run / "report.md").read_text() and (run / "report.png").exists()

    # a crash during iteration 2's training: re-running does only what is left
    for stage in ("model", "eval", "eval-previous", "eval-command"):
        shutil.rmtree(run / "iter2" / stage)
    result = run_pipeline(*args, env=plugins)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("already done with these settings and inputs") == 7
    assert "== train -> " + str(run / "iter2/model") in result.stdout
    assert manifest(run / "iter2/model")["complete"] and (run / "iter2/eval-command/result.txt").exists()

    # other arguments are never mistaken for the finished stages
    result = run_pipeline(*args, "--generate-args", "--temperature 0.5", env=plugins)
    assert result.returncode == 1
    assert "made with other settings or inputs: temperature (0.7 -> 0.5)" in " ".join(result.stderr.split())


def test_bad_arguments():
    result = run_pipeline("--model", "m", "--iter", "two")
    assert result.returncode == 2
    assert result.stderr.strip() == ("pipeline.sh: error: --model, --prompts, --iter and --output-dir are required "
                                     "(see --help)")  # fmt: skip
    result = run_pipeline("--model", "m", "--prompts", "p", "--output-dir", "d", "--iter", "0")
    assert result.stderr.strip() == "pipeline.sh: error: --iter must be a positive integer, got '0'"
    result = run_pipeline("--model", "m", "--prompts", "p", "--output-dir", "d", "--iter", "1", "--eval-command", "x")
    assert result.stderr.strip() == "pipeline.sh: error: --eval-command goes with --eval-prompts"


STUB = """#!/usr/bin/env bash
# stands in for sppo: records its arguments, and writes a manifest where it is asked to write
echo "$*" >> "$SPPO_CALLS"
while [[ $# -gt 0 ]]; do [[ $1 == --output ]] && { mkdir -p "$2"; echo '{}' > "$2/manifest.json"; }; shift; done
"""


def test_the_ranker_judges_the_evaluations_too_and_eval_commands_get_any_path(tmp_path):
    stub = tmp_path / "sppo"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "R&D runs"  # an ampersand and a space: bash's ${//} and word splitting would mangle them
    calls = tmp_path / "calls"
    result = run_pipeline("--model", "m", "--prompts", "p", "--iter", 1, "--output-dir", out, "--ranker", "rule:math",
                          "--eval-prompts", "e", "--eval-command", "echo {model} > {output}/model.txt",
                          env={"SPPO": str(stub), "SPPO_CALLS": str(calls)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["eval", "generate", "rank", "train", "eval", "report"]
    assert all(line.endswith("--ranker rule:math") for line in lines if line.split()[0] in ("rank", "eval"))
    assert (out / "iter1/eval-command/model.txt").read_text().strip() == str(out / "iter1/model")


@pytest.mark.parametrize("per_revision", [False, True])
def test_each_iteration_is_published_as_the_community_names_them(tmp_path, per_revision):
    stub = tmp_path / "sppo"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, calls = tmp_path / "run", tmp_path / "calls"
    flags = ["--hub-revision-per-iteration"] if per_revision else []
    result = run_pipeline("--model", "org/base", "--prompts", "p", "--iter", 2, "--output-dir", out,
                          "--eval-prompts", "e", "--push-to-hub", "me/tiny", *flags,
                          env={"SPPO": str(stub), "SPPO_CALLS": str(calls)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    pushes = [line.split(" ", 1)[1] for line in calls.read_text().splitlines() if line.startswith("push ")]
    model = (lambda t: f"me/tiny-SPPO --revision iter{t}") if per_revision else (lambda t: f"me/tiny-SPPO-Iter{t}")
    assert pushes == [
        f"{out}/iter1/generations --repo-id me/tiny-generations-iter1",
        f"{out}/iter1/rankings --repo-id me/tiny-rankings-iter1",
        f"{out}/iter1/model --repo-id {model(1)} --dataset me/tiny-rankings-iter1 --base-model org/base "
        f"--eval {out}/iter1/eval",
        f"{out}/iter2/generations --repo-id me/tiny-generations-iter2",
        f"{out}/iter2/rankings --repo-id me/tiny-rankings-iter2",
        f"{out}/iter2/model --repo-id {model(2)} --dataset me/tiny-rankings-iter2 --base-model "
        f"{'org/base' if per_revision else model(1)} --eval {out}/iter2/eval",
    ]  # private: no --public
    runs = [line for line in calls.read_text().splitlines() if "--run-name" in line]
    assert [line.split("--run-name ")[1].split()[0] for line in runs] == [
        "iter0-eval", "iter1-train", "iter1-eval", "iter2-train", "iter2-eval", "iter2-eval-previous"]


@pytest.mark.slow
def test_two_nodes_run_the_loop_with_slices_merged_by_node_0_and_training_together(tmp_path, tiny_model, prompts_file):
    """pipeline.sh on two "nodes" (two processes, node ranks 0 and 1): each generates and ranks a slice, node 0
    merges, both train together (the two-node training itself is compared with one node in test_train_scale), beside
    an earlier run's output that node 0's merge replaces and node 1 waits through (test_stage checks that wait)."""
    import socket

    from sppo_cli.data import load_stage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("generate:\n  backend: transformers\n  max_new_tokens: 6\n  shard_size: 2\n  num_samples: 3\n"
                      "rank:\n  ranker: python:plugin_rankers:by_length\n  shard_size: 2\n"
                      "train:\n  per_device_train_batch_size: 1\n  learning_rate: 1.0e-3\n  report_to: none\n"
                      "  gradient_checkpointing: false\n  warmup_steps: 0\n")  # fmt: skip
    env = {**os.environ, "SPPO": str(Path(sys.executable).parent / "sppo"), "PYTHONPATH": str(REPO / "tests")}
    earlier = tmp_path / "nodes/iter1/generations"  # an earlier run's output, which node 1 must not take for the merge
    earlier.mkdir(parents=True)
    (earlier / "manifest.json").write_text(json.dumps({"stage": "generate", "complete": True}))

    def node(rank: int) -> subprocess.Popen:
        command = [str(REPO / "pipeline.sh"), "--model", str(tiny_model), "--prompts", str(prompts_file), "--iter", "1",
                   "--recipe", str(recipe), "--output-dir", str(tmp_path / "nodes"), "--generate-args", "--overwrite",
                   "--num-nodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port",
                   str(port)]  # fmt: skip
        with open(tmp_path / f"node{rank}.out", "w") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                    start_new_session=True)

    nodes = [node(0), node(1)]
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            codes = [process.poll() for process in nodes]
            if None not in codes or any(codes):  # both done, or one failed (the other would wait for it at training)
                break
            time.sleep(1)
    finally:
        for process in nodes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the node's pipeline.sh and every stage it started
                process.wait()
    outputs = [(tmp_path / f"node{rank}.out").read_text() for rank in (0, 1)]
    assert [process.returncode for process in nodes] == [0, 0], [output[-3000:] for output in outputs]
    assert "slice 1 of 2 done" in outputs[1] and "merged into" in outputs[1]
    sppo = str(Path(sys.executable).parent / "sppo")
    subprocess.run([sppo, "generate", "--model", str(tiny_model), "--prompts", str(prompts_file), "--config",
                    str(recipe), "--output", str(tmp_path / "one")], check=True, capture_output=True)  # fmt: skip
    assert load_stage(tmp_path / "nodes/iter1/generations")[0].to_list() == load_stage(tmp_path / "one")[0].to_list()
    model = manifest(tmp_path / "nodes/iter1/model")
    assert (model["parameters"]["num_nodes"], model["parameters"]["num_processes"], model["steps"]) == (2, 1, 2)
