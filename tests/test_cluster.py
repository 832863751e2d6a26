"""Beyond one process: slices run as separate processes then merged, and a real two-node Ray cluster on this machine
(a head and a worker started as separate processes, CPU only), including a worker node that dies mid-run. Each must
give exactly the one-process output."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_jsonl

from sppo_cli.data import load_stage

pytestmark = pytest.mark.slow

SPPO = str(Path(sys.executable).with_name("sppo"))
RAY = str(Path(sys.executable).with_name("ray"))
FLAGS = ["-k", "2", "--max-new-tokens", "6", "--backend", "transformers", "--shard-size", "3"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    return write_jsonl(path, [{"prompt": f"Question {i}: name a fruit.", "answer": str(i)} for i in range(24)])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model, prompts) -> Path:
    output = tmp_path_factory.mktemp("reference") / "gens"
    sppo("generate", "--model", tiny_model, "--prompts", prompts, "--output", output, *FLAGS)
    return output


def sppo(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([SPPO, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def same_rows(output: Path, reference: Path) -> None:
    assert load_stage(output)[0].to_list() == load_stage(reference)[0].to_list()


def test_slices_run_side_by_side_then_merge_into_the_one_process_output(tmp_path, tiny_model, prompts, one_process):
    output = tmp_path / "gens"
    command = [SPPO, "generate", "--model", str(tiny_model), "--prompts", str(prompts), "--output", str(output), *FLAGS]
    logs = [tmp_path / f"slice{i}.err" for i in range(2)]
    with open(logs[0], "w") as log0, open(logs[1], "w") as log1:  # slice 1 waits for the merge, as nodes > 0 do
        slices = [subprocess.Popen([*command, "--num-shards", "2", "--shard-index", "0"], stderr=log0),
                  subprocess.Popen([*command, "--num-shards", "2", "--shard-index", "1", "--wait-for-merge"],
                                   stderr=log1)]  # fmt: skip
    try:
        assert slices[0].wait(timeout=600) == 0, logs[0].read_text()
        deadline = time.time() + 600
        while "waiting for the slices of" not in logs[1].read_text() and time.time() < deadline:
            assert slices[1].poll() is None, logs[1].read_text()[-3000:]
            time.sleep(0.2)
        errors = [log.read_text() for log in logs]
        assert "slice 0 of 2 done (4 shards); run the same command without --num-shards" in errors[0]
        assert all("| 12/12 [" in error for error in errors)  # each slice's bar counts its own 4 shards of 3 prompts
        assert not output.exists() and len(list((tmp_path / "gens.partial" / "shards").glob("0*.json"))) == 8
        merged = sppo("generate", "--model", tiny_model, "--prompts", prompts, "--output", output, *FLAGS)
        assert f"✓ {output}: 24 prompts" in merged.stderr
        assert slices[1].wait(timeout=60) == 0
        assert f"slice 1 of 2 done (4 shards), and merged into {output}" in " ".join(logs[1].read_text().split())
    finally:
        for process in slices:
            process.kill()
    same_rows(output, one_process)


def test_merging_waits_for_a_running_slice_and_does_the_shards_of_slices_that_never_ran(tmp_path, tiny_model, prompts,
                                                                                        one_process):  # fmt: skip
    from sppo_cli.stage import _lock_file

    (tmp_path / "gens.partial").mkdir()
    identity = json.loads((one_process / "manifest.json").read_text())["identity"]  # a slice's is the same
    (tmp_path / "gens.partial" / "run.json").write_text(json.dumps(identity))
    command = [SPPO, "generate", "--model", str(tiny_model), "--prompts", str(prompts), "--output",
               str(tmp_path / "gens"), *FLAGS]  # fmt: skip
    held = _lock_file(tmp_path / "gens.partial" / "slice-1.lock")  # slice 1 is at work
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        merging = subprocess.Popen(command, stderr=stderr, text=True)
        deadline = time.time() + 120
        while "waiting for slice 1 of" not in err.read_text() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        assert merging.poll() is None and not (tmp_path / "gens").exists()  # it waits
        os.close(held)
        merging.wait(timeout=600)
    assert merging.returncode == 0 and "waiting for slice 1 of" in err.read_text()
    same_rows(tmp_path / "gens", one_process)


# ---- Ray ------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raylets() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and (p / "comm").exists() and (p / "comm").read_text().strip() == "raylet"}  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node and a worker node, one CPU each, as `ray start` makes them (with the tests' plug-in rankers
    importable); yields the address and the worker's raylet process, whose death is the worker node's."""
    pytest.importorskip("ray")
    tests = str(Path(__file__).parent)
    # a HOME of its own: Ray keeps an auth token in ~/.ray, which an earlier local `ray.init` may have left there and
    # which then keeps a worker node from joining
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path_factory.mktemp("ray-home")),
                   "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    port = free_port()
    before = raylets()
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                   env=environment, check=True, capture_output=True, timeout=120)  # fmt: skip
    head = raylets() - before
    subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1"], env=environment, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    worker = raylets() - before - head
    try:
        yield f"127.0.0.1:{port}", worker.pop(), environment
    finally:
        subprocess.run([RAY, "stop", "--force"], env=environment, capture_output=True, timeout=120)


def test_generation_on_a_two_node_ray_cluster_gives_the_one_process_output(tmp_path, tiny_model, prompts,
                                                                            one_process, ray_cluster):  # fmt: skip
    address, _, environment = ray_cluster
    output = tmp_path / "gens"
    sppo("generate", "--model", tiny_model, "--prompts", prompts, "--output", output, *FLAGS, "--ray-address", address,
         "--data-parallel-size", "2", env=environment)  # fmt: skip
    same_rows(output, one_process)
    assert json.loads((output / "manifest.json").read_text())["parameters"]["ray_address"] == address


def test_a_ray_run_whose_worker_node_dies_still_gives_the_one_process_output(tmp_path, one_process, ray_cluster):
    """Ranking a second per shard on both nodes; the worker node dies while its replica judges a shard."""
    address, worker_raylet, environment = ray_cluster
    rank = ["rank", "--generations", one_process, "--ranker", "python:plugin_rankers:slow_by_length",
            "--shard-size", "3"]  # fmt: skip
    sppo(*rank, "--output", tmp_path / "reference", cwd=Path(__file__).parent)
    process = subprocess.Popen([SPPO, *map(str, rank), "--output", str(tmp_path / "ranks"), "--ray-address", address,
                                "--data-parallel-size", "2"], stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parent, env=environment)  # fmt: skip
    deadline = time.time() + 300
    while not judging_on(worker_raylet) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(worker_raylet, 9)  # the worker node dies with the shard its replica is judging
    err = process.communicate(timeout=600)[1]
    assert process.returncode == 0, err[-3000:]
    same_rows(tmp_path / "ranks", tmp_path / "reference")
    log = (tmp_path / "ranks" / "sppo.log").read_text()
    assert "died" in log  # ... and its shard was done again
    assert "(ShardActor pid=" in log and "replica ready on" in log  # what the replicas print is in the log
    assert "\x1b[" not in log  # without the terminal's colours


def judging_on(raylet: int) -> bool:
    """Whether a replica under this raylet is running a shard (Ray titles the process with the method it runs)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet \
                    and b"ShardActor.run" in (entry / "cmdline").read_bytes():  # fmt: skip
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False
