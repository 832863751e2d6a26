"""Experiment tracking, offline: Weights & Biases runs (named by stage, grouped by pipeline run) and tensorboard."""

import struct

import pytest
from conftest import finished_output, write_jsonl
from test_train import rankings

from sppo_cli.config import EvalConfig, TrainConfig
from sppo_cli.eval import evaluate
from sppo_cli.train import train

wandb = pytest.importorskip("wandb")


def wandb_records(directory):
    """The records of the offline runs under `directory`, read from their transaction logs (`run-*.wandb`)."""
    from wandb.proto import wandb_internal_pb2

    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        data, position, pending = path.read_bytes(), 7, b""  # a 7-byte header, then 32 KiB blocks of chunks
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # too little of the block left for a chunk: padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or its last chunk
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                yield path.parent.name, record


def test_train_and_eval_runs_are_named_by_stage_in_the_pipeline_s_group(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_RUN_GROUP", "my-pipeline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = finished_output(rankings(), tmp_path / "rankings", "rank")
    train(str(tiny_model), str(data), tmp_path / "model", TrainConfig(
        per_device_train_batch_size=2, report_to="wandb", run_name="iter1-train", gradient_checkpointing=False))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)}
                                                 for a in range(3)])  # fmt: skip
    manifest, _ = evaluate(str(tmp_path / "model"), str(tiny_model), str(prompts), tmp_path / "eval",
                           EvalConfig(ranker="rule:math", max_new_tokens=4, backend="transformers",
                                      report_to="wandb,tensorboard", run_name="iter1-eval"))  # fmt: skip
    runs, logged = {}, {}
    for run, record in wandb_records(tmp_path):
        if record.WhichOneof("record_type") == "run":
            runs[record.run.display_name] = record.run.run_group
        if record.WhichOneof("record_type") == "history":
            logged.setdefault(run, {}).update({i.key or "/".join(i.nested_key): i.value_json
                                               for i in record.history.item})  # fmt: skip
    assert runs == {"iter1-train": "my-pipeline", "iter1-eval": "my-pipeline"}
    values = [keys for keys in logged.values()]
    assert any("train/loss" in keys for keys in values)
    assert any(float(keys.get("eval/win_rate", "nan")) == manifest["metrics"]["win_rate"] for keys in values)
    assert list((tmp_path / "eval" / "runs" / "iter1-eval").glob("events.out.tfevents.*"))  # and tensorboard
