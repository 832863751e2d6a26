"""The stage machinery: content identity, finished and interrupted runs, atomic output, shards."""

import json
import os
from pathlib import Path

import pytest
from datasets import Dataset

from sppo_cli import identity, stage
from sppo_cli.config import TinyConfig
from sppo_cli.data import load_stage
from sppo_cli.errors import SppoError
from sppo_cli.identity import content_digest, differences, fingerprint
from sppo_cli.stage import StageRun, run_stage, save_dataset


def test_a_directory_is_identified_by_its_content_not_its_name_or_times(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "config.json").write_text("{}")
    (tmp_path / "a" / "sub" / "weights").write_bytes(b"\x00" * 1000)
    digest = content_digest(tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "b")
    os.utime(tmp_path / "b" / "config.json", (0, 0))
    assert content_digest(tmp_path / "b") == digest
    (tmp_path / "b" / "sub" / "weights").write_bytes(b"\x00" * 999 + b"\x01")
    assert content_digest(tmp_path / "b") != digest
    (tmp_path / "b" / "sub" / "weights").write_bytes(b"\x00" * 1000)
    (tmp_path / "b" / "extra").write_text("")
    assert content_digest(tmp_path / "b") != digest


def test_large_files_are_identified_by_size_and_three_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "WHOLE_FILE_LIMIT", 100)
    monkeypatch.setattr(identity, "WINDOW", 10)
    path = tmp_path / "weights"
    path.write_bytes(bytes(range(200)))
    digest = identity.file_digest(path)
    changed = bytearray(range(200))
    changed[95] = 0  # inside the middle window (95..104)
    path.write_bytes(bytes(changed))
    assert identity.file_digest(path) != digest
    changed = bytearray(range(200))
    changed[50] = 0  # between the windows: the documented blind spot of sampling
    path.write_bytes(bytes(changed))
    assert identity.file_digest(path) == digest


def test_a_hub_id_is_identified_by_the_commit_it_resolves_to_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("abc123\n")
    assert fingerprint("org/model") == "hub:org/model@abc123"
    with pytest.raises(SppoError, match="cannot tell which revision of org/other to use: the hub is unreachable"):
        fingerprint("org/other")


def test_differences_name_the_settings_and_inputs_that_changed():
    old = {"settings": {"seed": 1, "k": 5}, "inputs": {"model": "sha256:a", "prompts": "sha256:b"}}
    new = {"settings": {"seed": 2, "k": 5}, "inputs": {"model": "sha256:c", "prompts": "sha256:b", "ranker": "x"}}
    assert differences(old, new) == ["seed (1 -> 2)", "model (other content)", "ranker (added)"]


def build(partial: Path, rows: list[dict]) -> dict:
    save_dataset(Dataset.from_list(rows), partial)
    return {"rows": len(rows)}


def test_a_finished_run_is_done_and_untouched_another_is_refused_or_replaced(tmp_path):
    out = tmp_path / "out"
    manifest, done = run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: build(p, [{"a": 1}]))
    assert not done and manifest["rows"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                     "manifest.json", "sppo.log", "state.json"]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again, done = run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: pytest.fail("re-ran"))
    assert done and again == manifest and {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(SppoError, match=r"was made with other settings or inputs: seed \(1 -> 2\); pass --overwrite"):
        run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}), lambda p: pytest.fail("ran"))
    with pytest.raises(SppoError, match="was made by `sppo tiny-model`, not `sppo tiny-pairrm`; pass --overwrite"):
        run_stage(StageRun("tiny-pairrm", out, TinyConfig(seed=1), {}), lambda p: pytest.fail("ran"))
    replaced, _ = run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True),
                            lambda p: build(p, [{"a": 2}, {"a": 3}]))  # fmt: skip
    assert replaced["rows"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    redone, done = run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True),
                             lambda p: build(p, [{"a": 4}]))  # fmt: skip
    assert not done and redone["rows"] == 1  # --overwrite redoes even a run with the same settings


def test_a_failed_replacement_leaves_the_finished_output_and_logs_the_failure(tmp_path):
    out = tmp_path / "out"
    run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: build(p, [{"a": 1}]))

    def fail(partial):
        (partial / "half-written").write_text("x")
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True), fail)
    assert json.loads((out / "manifest.json").read_text())["parameters"] == {"seed": 1}  # untouched
    log = (tmp_path / "out.partial" / "sppo.log").read_text()
    assert "ZeroDivisionError" in log and "Traceback" in log


def test_a_partial_output_with_work_of_other_settings_is_never_discarded_silently(tmp_path):
    out = tmp_path / "out"
    StageRun("tiny-model", out, TinyConfig(seed=1), {}).open(lock=False)
    (tmp_path / "out.partial" / "shards").mkdir()
    (tmp_path / "out.partial" / "shards" / "000000.json").write_text("{}")
    with pytest.raises(SppoError, match=r"holds the finished part of an interrupted run made with other settings or "
                       r"inputs: seed \(1 -> 2\)"):  # fmt: skip
        StageRun("tiny-model", out, TinyConfig(seed=2), {}).open()
    assert (tmp_path / "out.partial" / "shards" / "000000.json").exists()
    StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True).open(lock=False)
    assert not (tmp_path / "out.partial" / "shards").exists()


def test_a_second_process_may_not_write_the_same_partial_output(tmp_path):
    first = StageRun("tiny-model", tmp_path / "out", TinyConfig(seed=1), {})
    first.open()
    with pytest.raises(SppoError, match="out.partial is being written by another sppo process"):
        StageRun("tiny-model", tmp_path / "out", TinyConfig(seed=1), {}).open()
    first.close()
    StageRun("tiny-model", tmp_path / "out", TinyConfig(seed=1), {}).open()


def test_an_interrupted_replacement_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: build(p, [{"a": 1}]))
    (tmp_path / "out.replaced").mkdir()  # killed after the new output was renamed into place, before the cleanup
    (tmp_path / "out.replaced" / "old").write_text("x")
    run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True), lambda p: build(p, [{"a": 2}]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class Killed(BaseException):
    pass


@pytest.mark.parametrize("killed_at", ["exchange", "rename", "removal"])
def test_a_replacement_killed_at_any_point_leaves_the_old_or_the_new_output(tmp_path, monkeypatch, killed_at):
    """The output is exchanged with the new one in one step, then the old one is renamed away and removed: a kill at
    any point leaves one of them in place, and the same command run again finishes the replacement."""
    out = tmp_path / "out"
    run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: build(p, [{"a": 1}]))
    real_exchange, real_replace, real_rmtree, exchanged = stage.exchange, os.replace, stage.shutil.rmtree, []

    def exchange(a, b):
        if killed_at == "exchange":
            raise Killed
        exchanged.append(real_exchange(a, b))
        return exchanged[-1]

    def replace(a, b):
        if exchanged and killed_at == "rename":
            raise Killed
        real_replace(a, b)

    def rmtree(path, ignore_errors=False):
        if exchanged and killed_at == "removal" and Path(path).exists():
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(stage, "exchange", exchange)
    monkeypatch.setattr(stage.os, "replace", replace)
    monkeypatch.setattr(stage.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True), lambda p: build(p, [{"a": 2}]))
    monkeypatch.undo()
    assert load_stage(out)[0]["a"] == ([1] if killed_at == "exchange" else [2])  # the old or the new one
    manifest, _ = run_stage(StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=killed_at == "exchange"),
                            lambda p: pytest.fail("re-ran"))  # fmt: skip
    assert manifest["parameters"] == {"seed": 2} and load_stage(out)[0]["a"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_finished_by_another_process_while_this_one_started_is_not_done_again(tmp_path):
    out = tmp_path / "out"
    second = StageRun("tiny-model", out, TinyConfig(seed=1), {})
    assert second.finished() is None  # ... then the first run finishes
    run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: build(p, [{"a": 1}]))
    before = (out / "manifest.json").read_text()
    assert second.open() is None and (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_partial_renamed_into_place_while_this_run_locks_it_is_not_the_one_locked(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = StageRun("tiny-model", out, TinyConfig(seed=1), {})
    first.open(lock=False)
    real_open, opened = os.open, []

    def open_after_the_rename(path, flags, *args):  # the first run renames its partial into place just then
        if not opened and Path(path) == tmp_path / "out.partial" / ".sppo.lock":
            opened.append(path)
            os.replace(tmp_path / "out.partial", out)
        return real_open(path, flags, *args)

    monkeypatch.setattr(stage.os, "open", open_after_the_rename)
    second = StageRun("tiny-model", out, TinyConfig(seed=2), {}, overwrite=True)
    assert second.open() == tmp_path / "out.partial" and opened  # it locked the partial, not the output
    assert os.path.samestat(os.fstat(second._lock), os.stat(tmp_path / "out.partial" / ".sppo.lock"))
    second.close()


def test_a_run_killed_after_its_manifest_is_finished_by_the_next(tmp_path):
    out = tmp_path / "out"
    run = StageRun("tiny-model", out, TinyConfig(seed=1), {})
    build(run.open(), [{"a": 1}])
    written = run.write_manifest(rows=1)  # ... and killed before the rename
    run.close()
    manifest, done = run_stage(StageRun("tiny-model", out, TinyConfig(seed=1), {}), lambda p: pytest.fail("re-ran"))
    assert manifest == written and not done and (out / "manifest.json").exists()
    assert not (tmp_path / "out.partial").exists() and not (out / "run.json").exists()


def test_a_ranker_is_identified_by_its_kind_and_content_not_by_how_its_path_is_written(tmp_path):
    import shutil

    from sppo_cli.config import RankConfig

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    shutil.copytree(tmp_path / "rm", tmp_path / "copy")
    first, second = RankConfig(ranker=f"reward-model:{tmp_path / 'rm'}"), RankConfig(ranker="reward-model:./copy")
    assert first.identity() == second.identity() and first.identity()["ranker"] == "reward-model"
    assert fingerprint(str(tmp_path / "rm")) == fingerprint(str(tmp_path / "copy"))
    assert "probability_mode" not in first.identity() and "answer_column" not in first.identity()
    assert RankConfig(ranker="rule:math").identity()["answer_column"] == "answer"


def test_a_slice_waits_for_the_merge_of_its_own_run_never_for_an_earlier_or_another_output(tmp_path, monkeypatch):
    import threading

    from sppo_cli.config import GenerateConfig

    monkeypatch.setattr(stage, "MERGE_POLL_SECONDS", 0.05)
    sliced = GenerateConfig(num_shards=2, shard_index=1, wait_for_merge=True)

    def slice_set_up(out: Path, **kwargs) -> StageRun:  # as the slice leaves it, its shards done
        run = StageRun("generate", out, sliced, {}, **kwargs)
        run.open()
        run.close()
        return run

    def merge(out: Path, config: GenerateConfig, **kwargs) -> None:
        run_stage(StageRun("generate", out, config, {}, **kwargs), lambda p: build(p, [{"a": 1}]))

    # an earlier output with other settings, which the merge replaces: waited through
    merge(tmp_path / "a", GenerateConfig(seed=2))
    waiting = slice_set_up(tmp_path / "a", overwrite=True)
    waiter = threading.Thread(target=waiting.wait_for_merge)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()
    merge(tmp_path / "a", GenerateConfig(), overwrite=True)
    waiter.join(10)
    assert not waiter.is_alive()

    # the merge made something else (another commit of a hub model, other settings): said, not waited for forever
    other = slice_set_up(tmp_path / "b")
    merge(tmp_path / "b", GenerateConfig(seed=2), overwrite=True)
    with pytest.raises(SppoError, match=r"b was merged with other settings or inputs: seed \(2 -> 42\), not from this"):
        other.wait_for_merge()

    # an output with the very same identity that --overwrite replaces cannot be told from the merge: refused
    merge(tmp_path / "c", GenerateConfig())
    with pytest.raises(SppoError, match="c is already finished with these settings and inputs, and a slice with "
                                        "--wait-for-merge could not tell it from the merge it waits for"):  # fmt: skip
        run_stage(StageRun("generate", tmp_path / "c", sliced, {}, overwrite=True), lambda p: pytest.fail("ran"))
