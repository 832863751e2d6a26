"""Shards on a Ray cluster (`--ray-address`): one actor per replica, each loading the model once and taking the next
shard as soon as it is free.

An actor writes each finished shard into the stage's partial output itself, so the output must be on storage every
node sees (checked before any work). A replica that dies (its process, or its node) loses only the shard it was
working on: the shard goes back to the queue, and a new actor takes the dead one's place when the cluster has room
for it. Every prompt is still done exactly once, with its own seed, so the output equals a one-process run's.
"""

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from sppo_cli.errors import SppoError, first_line
from sppo_cli.logs import logger
from sppo_cli.stage import Shard, ShardWorker, save_shard

MAX_REPLACEMENTS = 8  # replicas that may die in one run before it gives up


class ShardActor:
    """One replica: `open_worker()` entered once, then one shard per call."""

    def __init__(self, open_worker: ShardWorker, directory: str):
        self.directory = Path(directory)
        self.context = open_worker()
        self.process = self.context.__enter__()

    def sees(self, probe: str) -> tuple[bool, str]:
        """Whether this node sees the driver's probe file, and the node's name."""
        return Path(probe).exists(), os.uname().nodename

    def run(self, shard: Shard) -> tuple[int, int]:
        counts = []
        save_shard(self.directory, shard, self.process(shard), lambda *c: counts.extend(c))
        return counts[0], counts[1]


def run_on_ray(address: str, directory: Path, shards: list[Shard], open_worker: ShardWorker, report: Callable,
               replicas: int, gpus_per_replica: int = 1) -> None:  # fmt: skip
    """Process `shards` on `replicas` actors of the Ray cluster at `address`, saving each in `directory`."""
    ray = _connect(address)
    from sppo_cli.models import on_gpu

    resources = {"num_gpus": gpus_per_replica} if on_gpu() else {"num_cpus": 1}
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(ShardActor)
    probe = directory / f".visible-{uuid.uuid4().hex}"
    probe.touch()
    queue, running, starting, actors, replaced = list(shards), {}, {}, [], 0

    def start_actor() -> None:
        actor = actor_class.remote(open_worker, str(directory.resolve()))
        actors.append(actor)
        starting[actor.sees.remote(str(probe.resolve()))] = actor

    try:
        for _ in range(min(replicas, len(shards))):
            start_actor()
        while queue or running:
            done, _ = ray.wait([*running, *starting], num_returns=1)
            future = done[0]
            if future in starting:
                actor = starting.pop(future)
                try:
                    visible, node = ray.get(future)
                except ray.exceptions.RayActorError as error:
                    if error.actor_init_failed:  # loading the model or the ranker failed: so would every replica
                        raise SppoError(f"a Ray replica could not start: {str(error).strip().splitlines()[-1]}") \
                            from None  # fmt: skip
                    replaced = _replace(error, replaced, "a replica died as it started")
                    start_actor()
                    continue
                if not visible:
                    raise SppoError(f"{directory} is not visible from Ray node {node}: --output must be on storage "
                                    "every node of the cluster sees")  # fmt: skip
            else:
                shard, actor = running.pop(future)
                try:
                    report(*ray.get(future))
                except ray.exceptions.RayActorError as error:  # the replica or its node died: its shard is redone
                    queue.insert(0, shard)
                    replaced = _replace(error, replaced, f"the replica working on prompts {shard.start}-"
                                                          f"{shard.stop - 1} died")  # fmt: skip
                    start_actor()
                    continue
                except ray.exceptions.RayTaskError as error:  # the work itself failed: a bug or bad input
                    raise error.as_instanceof_cause() from None
            if queue:
                shard = queue.pop(0)
                running[actor.run.remote(shard)] = (shard, actor)
    finally:
        for actor in actors:
            ray.kill(actor)
        probe.unlink(missing_ok=True)


def _replace(error: Exception, replaced: int, what: str) -> int:
    if replaced >= MAX_REPLACEMENTS:
        raise SppoError(f"{what}, and {MAX_REPLACEMENTS} replicas have died in this run: {first_line(error)}")
    logger.warning("%s (%s); its shard goes back to the queue and a new replica is started", what, first_line(error))
    return replaced + 1


def _connect(address: str):
    try:
        import ray
    except ImportError:
        raise SppoError("--ray-address needs Ray: pip install 'sppo-cli[ray]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise SppoError(f"cannot connect to the Ray cluster at {address}: {first_line(error)}") from error
    return ray
