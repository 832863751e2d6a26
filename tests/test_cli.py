"""Each stage through the `sppo` command: bad input ends with one clear line, a non-zero exit and no output."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, finished_output, run_cli, write_jsonl
from datasets import Dataset

from sppo_cli.data import load_stage

PLUGIN = (REPO / "tests" / "plugin_rankers.py").read_text()


def assert_clean_failure(code: int, err: str, message: str, *unwritten: Path):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in " ".join(err.split("\n")).split("sppo: ") if line.strip()]  # rich may wrap lines
    assert lines[-1].startswith("error:") and err.count("sppo: error") == 1, err
    assert message in " ".join(lines[-1].split()), lines[-1]
    for path in unwritten:
        assert_nothing_finished(path)


def assert_nothing_finished(path: Path):
    """No output, and no partial output that holds finished work (a log of the failure may stay)."""
    assert not path.exists()
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        assert {p.name for p in partial.iterdir()} <= {"run.json", "sppo.log", "shards", ".sppo.lock"}
        assert not list(partial.glob("shards/[0-9]*"))


@pytest.fixture
def generations(tmp_path):
    rows = [
        {"prompt": "a?", "prompt_text": "A", "responses": ["x", "xxx", "xx"]},
        {"prompt": "b?", "prompt_text": "B", "responses": ["yy", "y", "yyy"]},
    ]
    return finished_output(Dataset.from_list(rows), tmp_path / "gens", "generate")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rankers.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_rankers", raising=False)  # another test's module of the same name


def test_plugin_scores_through_the_cli(capsys, tmp_path, generations, plugin):
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "r",
                        "--ranker", "python:my_rankers:by_length")
    assert code == 0, err
    rankings, manifest = load_stage(tmp_path / "r", "rank")
    assert [row[-1]["content"] for row in rankings["chosen"]] == ["xxx", "yyy"]
    assert [row[-1]["content"] for row in rankings["rejected"]] == ["x", "y"]
    assert manifest["pairs"] == 2 and manifest["tied_prompts"] == 0
    assert manifest["parameters"]["ranker"] == "python:my_rankers:by_length"
    # the plug-in's source is part of the ranking's identity: an edited plug-in is a different ranker
    assert manifest["identity"]["inputs"]["ranker"].startswith("sha256:")


def test_plugin_matrix_through_the_cli_ties_are_counted(capsys, tmp_path, generations, plugin):
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "r",
                        "--ranker", "python:my_rankers:rock_paper_scissors")
    # every response of a rock-paper-scissors cycle has win rate 1/2: no pair to learn from
    assert_clean_failure(code, err, "all 2 prompts had tied responses: nothing to train on")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "ranker, message",
    [
        ("python:my_rankers:wrong_shape", "the ranker returned shape (1,) for 3 responses"),
        ("python:my_rankers:crashes", "the plug-in ranker python:my_rankers:crashes failed: KeyError"),
        ("python:my_rankers:missing", "plug-in module my_rankers has no function missing"),
        ("python:no_such_module:f", "cannot import plug-in module no_such_module"),
        ("python:my_rankers", "plug-in rankers are written python:package.module:function"),
    ],
)
def test_bad_plugins(capsys, tmp_path, generations, plugin, ranker, message):
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "r", "--ranker", ranker)
    assert_clean_failure(code, err, message, tmp_path / "r")


def test_generate_bad_inputs(capsys, tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "gens"
    write_jsonl(tmp_path / "nocol.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a"}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b",}\n')
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    (tmp_path / "runs").mkdir()
    finished_output(Dataset.from_list([{"prompt": "a"}]), tmp_path / "gens-old.partial", "generate")
    cases = [
        (["--prompts", tmp_path / "nocol.jsonl", "--model", tiny_model], "missing column(s) 'prompt'"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tiny_model, "-k", "0"],
         "--num-samples must be at least 1, got 0"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tiny_model, "--top-p", "0"],
         "--top-p must be greater than 0, got 0.0"),
        (["--prompts", tmp_path / "empty.jsonl", "--model", tiny_model], "cannot read " + str(tmp_path / "empty.jsonl")
         + ": the file is empty"),
        (["--prompts", tmp_path / "bad.jsonl", "--model", tiny_model],
         "bad.jsonl: line 2 is not valid JSON (Expecting"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tiny_model, "--split", "test"],
         "ok.jsonl has no splits: --split test needs a dataset with several"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tiny_model, "--seed", "-1"], "--seed must be at least 0"),
        (["--prompts", tmp_path / "gens-old.partial", "--model", tiny_model],
         "gens-old.partial is the unfinished output of an interrupted run, not an input"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", "runs/model"], "model not found: runs/model"),
        (["--prompts", tmp_path / "[/x].jsonl", "--model", tiny_model], "[/x].jsonl: no such file or directory"),
        (["--prompts", tmp_path / "broken.parquet", "--model", tiny_model], "cannot read"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tmp_path / "no-model"], "model not found"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tmp_path], "cannot load the tokenizer"),
    ]
    monkeypatch.chdir(tmp_path)  # where runs/ is a local directory: runs/model is a path, never a hub id
    for args, message in cases:
        code, err = run_cli(capsys, "generate", "--output", out, "--max-new-tokens", "2", *args)
        assert_clean_failure(code, err, message, out)
        assert not out.with_name("gens.partial").exists()  # bad input is found before anything is written


def test_rank_bad_inputs(capsys, tmp_path, generations, plugin):
    out = tmp_path / "r"
    finished_output(Dataset.from_list([{"prompt": "a", "prompt_text": "A", "responses": ["x"]}]), tmp_path / "k1",
                    "generate")  # fmt: skip
    Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(tmp_path / "unfinished"))
    cases = [
        (tmp_path / "k1", "python:my_rankers:by_length", "ranking needs K >= 2"),
        (tmp_path / "unfinished", "python:my_rankers:by_length", "not a finished sppo output"),
        (tmp_path / "nope", "python:my_rankers:by_length", "no such file or directory"),
        (generations, str(tmp_path / "no-pairrm"), "PairRM checkpoint not found: there is no directory"),
        (generations, "reward-model:./no-rm", "reward model not found: there is no directory ./no-rm"),
        (generations, "rule:code", "unknown rule 'rule:code'"),
        (finished_output(Dataset.from_list([{"prompt": "a", "prompt_text": "A", "responses": ["x", "y"]}]),
                         tmp_path / "g.partial", "generate"), "python:my_rankers:by_length",
         "g.partial is the unfinished output of an interrupted run, not an input"),
        (finished_output(Dataset.from_list([{"prompt": "a", "prompt_text": "A", "responses": ["x", "y"],
                                             "answer": None}]), tmp_path / "g2", "generate"), "rule:math",
         "rule:math: the prompt 'a' has no reference answer in column 'answer'"),
    ]
    for source, ranker, message in cases:
        code, err = run_cli(capsys, "rank", "--generations", source, "--output", out, "--ranker", ranker)
        assert_clean_failure(code, err, message, out)
        assert not out.with_name("r.partial").exists()


def test_train_bad_inputs(capsys, tmp_path, tiny_model, generations):
    out = tmp_path / "model"
    untemplated = tmp_path / "untemplated"
    shutil.copytree(tiny_model, untemplated)
    config = json.loads((untemplated / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (untemplated / "tokenizer_config.json").write_text(json.dumps(config))
    (untemplated / "chat_template.jinja").unlink(missing_ok=True)
    cases = [
        (["--data", generations, "--model", tiny_model], "is the output of `sppo generate`, expected `sppo rank`"),
        (["--data", tmp_path / "nope", "--model", tiny_model], "no such file or directory"),
        (["--data", generations, "--model", tmp_path / "no-model"], "model not found"),
        (["--data", generations, "--model", tiny_model, "--beta", "0"], "--beta must be greater than 0, got 0.0"),
        (["--data", generations, "--model", tiny_model, "--load-in-4bit"], "--load-in-4bit trains a LoRA adapter"),
    ]
    ranked = finished_output(Dataset.from_list([{
        "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}],
        "chosen_probs": 0.7, "chosen_probs_win": 0.6, "chosen_probs_lose": 0.4}]), tmp_path / "ranked", "rank")
    cases += [
        (["--data", ranked, "--model", tiny_model, "--optim", "adamw_tourch"], "invalid training settings: "),
        (["--data", ranked, "--model", tiny_model, "--lr-scheduler-kwargs", "min_lr=1"],
         "--lr-scheduler-kwargs must be a JSON object, got 'min_lr=1'"),
        (["--data", ranked, "--model", tiny_model, "--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--data", ranked, "--model", tiny_model, "--max-steps", "0"], "--max-steps must be -1 (the epochs decide)"),
        (["--data", ranked, "--model", tiny_model, "--max-length", "2"],
         "every prompt fills --max-length (2 tokens) on its own, leaving no response token to learn from"),
        (["--data", ranked, "--model", untemplated], "has no chat template: give one with --chat-template FILE"),
        (["--data", str(ranked) + ".partial", "--model", tiny_model], "is the unfinished output of an interrupted run"),
    ]  # fmt: skip
    shutil.copytree(ranked, str(ranked) + ".partial")
    for args, message in cases:
        code, err = run_cli(capsys, "train", "--output", out, *args)
        assert_clean_failure(code, err, message, out)
    code, err = run_cli(capsys, "train", "--output", out, "--data", generations, "--model", tiny_model,
                        "--loss", "dpo-ish")  # fmt: skip
    assert code == 2 and "Invalid value for '--loss'" in err  # choices are checked by the command line itself


def test_an_existing_output_of_another_kind_is_never_replaced_without_overwrite(capsys, tmp_path, generations,
                                                                                 plugin):  # fmt: skip
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", generations,
                        "--ranker", "python:my_rankers:by_length")  # fmt: skip
    assert_clean_failure(code, err, "was made by another version of sppo, which kept no record of its settings")
    assert load_stage(generations, "generate")[1]["stage"] == "generate"
    (tmp_path / "notes").mkdir()
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "notes",
                        "--ranker", "python:my_rankers:by_length")  # fmt: skip
    assert_clean_failure(code, err, "already exists and is not an sppo output")


def test_a_rerun_is_done_at_once_and_other_settings_are_refused_with_what_differs(capsys, tmp_path, generations,
                                                                                 plugin):  # fmt: skip
    args = ["rank", "--generations", generations, "--output", tmp_path / "r", "--ranker", "python:my_rankers:by_length"]
    assert run_cli(capsys, *args)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}
    # how it runs, not what it computes; and options a plug-in never reads
    code, err = run_cli(capsys, *args, "--ranker-batch-size", "7", "--shard-size", "1",
                        "--probability-mode", "pairwise")  # fmt: skip
    assert code == 0 and "already done" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")} == before  # not touched
    code, err = run_cli(capsys, *args[:-1], "python:my_rankers:rock_paper_scissors")
    assert_clean_failure(code, err, "made with other settings or inputs: ranker ('python:my_rankers:by_length' -> "
                         "'python:my_rankers:rock_paper_scissors'); pass --overwrite to replace it")
    (tmp_path / "my_rankers.py").write_text(PLUGIN + "\n# edited\n")
    code, err = run_cli(capsys, *args)
    assert_clean_failure(code, err, "ranker (other content)")
    code, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and "pairs" in err


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sppo_cli.cli", "generate", "--model", "m", "--prompts", str(tmp_path / "nope"),
         "--output", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"sppo: error: {tmp_path / 'nope'}: no such file or directory"]


def test_a_bug_is_shown_as_a_bug_with_its_traceback_in_the_log(capsys, tmp_path, generations, plugin, monkeypatch):
    from sppo_cli import rank

    def bug(*args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(rank, "ranking_row", bug)
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "r",
                        "--ranker", "python:my_rankers:by_length")  # fmt: skip
    log = tmp_path / "r.partial" / "sppo.log"
    assert code == 1 and "sppo: error" not in err
    assert f"sppo: internal error: ZeroDivisionError: division by zero (a bug in sppo or a library it uses; its " \
           f"traceback is in {log})" in " ".join(err.split())
    assert "Traceback" in log.read_text() and "in bug" in log.read_text()


def test_recipes_set_defaults_with_the_flags_names_and_flags_override(capsys, tmp_path, generations, plugin):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rank:\n  ranker: python:my_rankers:by_length\n  probability_mode: pairwise\n  shard_size: 1\n")
    code, err = run_cli(capsys, "rank", "--config", recipe, "--generations", generations, "--output", tmp_path / "r",
                        "--shard-size", "5")  # fmt: skip
    assert code == 0, err
    parameters = json.loads((tmp_path / "r" / "manifest.json").read_text())["parameters"]
    assert parameters["probability_mode"] == "pairwise" and parameters["shard_size"] == 5
    recipe.write_text("rank:\n  rankr: x\n")
    code, err = run_cli(capsys, "rank", "--config", recipe, "--generations", generations, "--output", tmp_path / "r2")
    assert code == 1 and "unknown option(s) for `sppo rank`: rankr" in err
    recipe.write_text("rank:\n  shard_size: many\n")
    code, err = run_cli(capsys, "rank", "--config", recipe, "--generations", generations, "--output", tmp_path / "r2")
    assert code == 1 and f"{recipe}: `rank: shard_size:` must be an integer, got 'many'" in err  # names the recipe


def sppo(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sppo_cli.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)  # fmt: skip


def test_the_terminal_shows_a_progress_bar_and_a_summary_and_the_log_keeps_everything(tmp_path, generations, plugin):
    noisy = "python:my_rankers:noisy"
    result = sppo("rank", "--generations", generations, "--output", tmp_path / "r", "--ranker", noisy, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "noise" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith("rank:") for line in lines[:-1]) and lines[-1].startswith("✓ ")
    log = (tmp_path / "r" / "sppo.log").read_text()
    assert "noise on stdout" in log and "noise on file descriptor 2" in log
    assert "[main] WARNING py.warnings" in log and "noise as a warning" in log

    result = sppo("rank", "--generations", generations, "--output", tmp_path / "v", "--ranker", noisy, "--verbose",
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0
    assert all(noise in result.stderr for noise in ("noise on stdout", "noise as a warning", "file descriptor 2"))
    assert "noise on file descriptor 2" in (tmp_path / "v" / "sppo.log").read_text()


@pytest.mark.slow
def test_a_worker_process_s_failure_is_one_line_and_its_traceback_is_in_the_log(tmp_path, generations, plugin):
    result = sppo("rank", "--generations", generations, "--output", tmp_path / "r", "--ranker",
                  "python:my_rankers:crashes", "--data-parallel-size", 2, "--shard-size", 1, cwd=tmp_path)  # fmt: skip
    log = tmp_path / "r.partial" / "sppo.log"
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"sppo: error: a data-parallel worker failed: the plug-in ranker python:my_rankers:crashes failed: "
        f"KeyError: 'boom' (log: {log})")  # fmt: skip
    text = log.read_text()
    assert "[worker " in text and "failed:\nTraceback" in text and "raise KeyError(\"boom\")" in text


def test_a_chat_template_file_replaces_the_model_s_and_a_model_without_one_is_told_how(capsys, tmp_path, tiny_model):
    import shutil

    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    tokenizer = AutoTokenizer.from_pretrained(bare)
    tokenizer.chat_template = None
    (bare / "chat_template.jinja").unlink()
    tokenizer.save_pretrained(bare)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name a fruit."}])
    args = ["generate", "--model", bare, "--prompts", prompts, "-k", "2", "--max-new-tokens", "2",
            "--backend", "transformers"]  # fmt: skip
    code, err = run_cli(capsys, *args, "--output", tmp_path / "g")
    assert_clean_failure(code, err, "has no chat template: give one with --chat-template FILE", tmp_path / "g")
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    code, err = run_cli(capsys, *args, "--output", tmp_path / "g", "--chat-template", template)
    assert code == 0, err
    generations, manifest = load_stage(tmp_path / "g")
    assert generations["prompt_text"] == ["[user] Name a fruit.\n[assistant] "]
    assert manifest["identity"]["inputs"]["chat_template"].startswith("sha256:")  # its content, not its name
    code, err = run_cli(capsys, *args, "--output", tmp_path / "g2", "--chat-template", tmp_path / "missing.jinja")
    assert_clean_failure(code, err, "cannot read the chat template")


def test_user_text_is_printed_as_it_is_never_as_markup(capsys, tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "[INST] hi [/INST]"}, {"prompt": "[bold]b[/bold]"}])
    out = tmp_path / "[/run]"
    code, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompts", prompts, "--output", out, "-k", "2",
                        "--max-new-tokens", "2", "--backend", "transformers")  # fmt: skip
    assert code == 0 and f"✓ {out}: 2 prompts" in err
    assert load_stage(out)[0]["prompt"] == ["[INST] hi [/INST]", "[bold]b[/bold]"]


def test_a_recipe_s_values_are_checked_against_the_settings_types_naming_the_recipe(capsys, tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    common = ["--model", tiny_model, "--prompts", prompts, "--output", tmp_path / "g", "--config"]
    for text, message in [
        ("generate:\n  num_samples: lots\n", "`generate: num_samples:` must be an integer, got 'lots'"),
        ("generate:\n  stop: 5\n", "`generate: stop:` must be a list of strings, got 5"),
        ("generate:\n  backend: tpu\n", "`generate: backend:` must be one of auto, vllm, transformers, got 'tpu'"),
    ]:
        (tmp_path / "r.yaml").write_text(text)
        code, err = run_cli(capsys, "generate", *common, tmp_path / "r.yaml")
        assert_clean_failure(code, err, f"{tmp_path / 'r.yaml'}: {message}", tmp_path / "g")
    (tmp_path / "r.yaml").write_text("generate:\n  temperature: 7e-1\n")  # YAML's string "7e-1" is a number
    code, err = run_cli(capsys, "generate", *common, tmp_path / "r.yaml", "-k", "2", "--max-new-tokens", "2",
                        "--backend", "transformers")  # fmt: skip
    assert code == 0, err
    (tmp_path / "r.yaml").write_text("generate:\n")  # an empty section sets nothing
    common[5] = tmp_path / "g2"
    code, err = run_cli(capsys, "generate", *common, tmp_path / "r.yaml", "-k", "2", "--max-new-tokens", "2",
                        "--backend", "transformers")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_with_one_line_and_the_run_resumes(tmp_path, tiny_model, signum):
    import time

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(400)])
    command = [str(Path(sys.executable).with_name("sppo")), "generate", "--model", str(tiny_model), "--prompts",
               str(prompts), "--output", str(tmp_path / "g"), "-k", "2", "--max-new-tokens", "16", "--backend",
               "transformers", "--batch-size", "1", "--shard-size", "2"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "g.partial").glob("shards/0*.json")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signum and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"sppo: stopped by {signal.Signals(signum).name}; run the same "
                                                 "command again to resume")  # fmt: skip
    assert list((tmp_path / "g.partial").glob("shards/0*.json"))  # the finished shards are kept


def test_a_full_disk_is_named_as_such_whatever_the_library_calls_it(tmp_path, monkeypatch):
    import errno
    import shutil as shutil_module

    from sppo_cli.cli import _full_disk

    assert _full_disk(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "sppo.log") == str(tmp_path)
    assert _full_disk(RuntimeError("unexpected pos"), tmp_path / "sppo.log") is None  # there is room: a bug
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 1000))
    assert _full_disk(RuntimeError(". unexpected pos"), tmp_path / "sppo.log") == str(tmp_path)  # torch's words
