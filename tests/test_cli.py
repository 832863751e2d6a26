"""Each stage through the `sppo` command: bad input ends with one clear line, a non-zero exit and no output."""

import subprocess
import sys

import pytest
from datasets import Dataset

from sppo_cli.data import load_stage, save_stage

from conftest import REPO, run_cli, write_jsonl

PLUGIN = '''
def by_length(prompts, responses):
    return [[float(len(r)) for r in rs] for rs in responses]

def rock_paper_scissors(prompts, responses):
    return [[[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]] for _ in prompts]

def wrong_shape(prompts, responses):
    return [[1.0] for _ in prompts]

def crashes(prompts, responses):
    raise KeyError("boom")
'''


def assert_clean_failure(code: int, err: str, message: str, *unwritten):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]  # progress bars may come before the error
    assert lines[-1].startswith("sppo: error:") and sum("error" in line for line in lines) == 1, err
    assert message in lines[-1], lines[-1]
    for path in unwritten:
        assert not path.exists() and not path.with_name(path.name + ".partial").exists()


@pytest.fixture
def generations(tmp_path):
    rows = [
        {"prompt": "a?", "prompt_text": "A", "responses": ["x", "xxx", "xx"]},
        {"prompt": "b?", "prompt_text": "B", "responses": ["yy", "y", "yyy"]},
    ]
    save_stage(Dataset.from_list(rows), tmp_path / "gens", "generate", {}, {})
    return tmp_path / "gens"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rankers.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)


def test_plugin_scores_through_the_cli(capsys, tmp_path, generations, plugin):
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "r",
                        "--ranker", "python:my_rankers:by_length")
    assert code == 0, err
    rankings, manifest = load_stage(tmp_path / "r", "rank")
    assert [row[-1]["content"] for row in rankings["chosen"]] == ["xxx", "yyy"]
    assert [row[-1]["content"] for row in rankings["rejected"]] == ["x", "y"]
    assert manifest["pairs"] == 2 and manifest["tied_prompts"] == 0
    assert manifest["parameters"]["ranker"] == "python:my_rankers:by_length"


def test_plugin_matrix_through_the_cli_ties_are_counted(capsys, tmp_path, generations, plugin):
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", tmp_path / "r",
                        "--ranker", "python:my_rankers:rock_paper_scissors")
    # every response of a rock-paper-scissors cycle has win rate 1/2: no pair to learn from
    assert_clean_failure(code, err, "all 2 prompts had tied responses: nothing to train on", tmp_path / "r")


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


def test_generate_bad_inputs(capsys, tmp_path, tiny_model):
    out = tmp_path / "gens"
    write_jsonl(tmp_path / "nocol.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a"}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    cases = [
        (["--prompts", tmp_path / "nocol.jsonl", "--model", tiny_model], "missing column(s) 'prompt'"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tiny_model, "-k", "1"], "--num-samples must be at least 2"),
        (["--prompts", tmp_path / "empty.jsonl", "--model", tiny_model], "empty.jsonl"),
        (["--prompts", tmp_path / "broken.parquet", "--model", tiny_model], "cannot read"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tmp_path / "no-model"], "model not found"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tmp_path], "cannot load the tokenizer"),
        (["--prompts", tmp_path / "ok.jsonl", "--model", tiny_model, "--backend", "tgi"], "unknown backend 'tgi'"),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, "generate", "--output", out, "--max-new-tokens", "2", *args)
        assert_clean_failure(code, err, message, out)


def test_rank_bad_inputs(capsys, tmp_path, generations, plugin):
    out = tmp_path / "r"
    save_stage(Dataset.from_list([{"prompt": "a", "prompt_text": "A", "responses": ["x"]}]), tmp_path / "k1",
               "generate", {}, {})
    Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(tmp_path / "unfinished"))
    cases = [
        (tmp_path / "k1", "python:my_rankers:by_length", "ranking needs K >= 2"),
        (tmp_path / "unfinished", "python:my_rankers:by_length", "not a finished sppo output"),
        (tmp_path / "nope", "python:my_rankers:by_length", "no such file or directory"),
        (generations, str(tmp_path / "no-pairrm"), "no-pairrm"),
    ]
    for source, ranker, message in cases:
        code, err = run_cli(capsys, "rank", "--generations", source, "--output", out, "--ranker", ranker)
        assert_clean_failure(code, err, message, out)


def test_train_bad_inputs(capsys, tmp_path, tiny_model, generations):
    out = tmp_path / "model"
    cases = [
        (["--data", generations, "--model", tiny_model], "is the output of `sppo generate`, expected `sppo rank`"),
        (["--data", tmp_path / "nope", "--model", tiny_model], "no such file or directory"),
        (["--data", generations, "--model", tmp_path / "no-model"], "model not found"),
        (["--data", generations, "--model", tiny_model, "--loss", "dpo"], "--loss must be one of"),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, "train", "--output", out, *args)
        assert_clean_failure(code, err, message, out)


def test_existing_output_is_never_replaced_without_overwrite(capsys, tmp_path, generations, plugin):
    code, err = run_cli(capsys, "rank", "--generations", generations, "--output", generations,
                        "--ranker", "python:my_rankers:by_length")
    assert_clean_failure(code, err, "already exists")
    assert load_stage(generations, "generate")[1]["stage"] == "generate"


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sppo_cli.cli", "generate", "--model", "m", "--prompts", str(tmp_path / "nope"),
         "--output", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"sppo: error: {tmp_path / 'nope'}: no such file or directory"]
