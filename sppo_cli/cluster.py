"""Shards on a Ray cluster (`--ray-address`): one actor per replica, each loading the model once and taking the next
shard as soon as it is free.

An actor works in the driver's working directory (relative paths and plug-in modules resolve as they do for the
command) and writes each finished shard into the stage's partial output itself, so both must be on storage every node
sees (checked as each replica starts, before it is given a shard). A replica that dies (its process, or its node)
loses only the shard it was working on: the shard goes back to the queue for the next free replica, and when none is
left a new one is started. Every prompt is still done exactly once, with its own seed, so the output equals a
one-process run's.
"""

import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from sppo_cli.errors import SppoError, first_line
from sppo_cli.logs import logger
from sppo_cli.stage import Shard, ShardWorker, save_shard

MAX_REPLACEMENTS = 8  # replicas that may die in one run before it gives up
START_TIMEOUT = 900  # seconds to wait for a replica when no other is alive: the cluster may have no room for it


class ShardActor:
    """One replica: `open_worker()` entered once, in the driver's working directory, then one shard per call."""

    def __init__(self, open_worker: ShardWorker, directory: str, working_directory: str, probe: str):
        if not Path(probe).exists():
            raise SppoError(f"{directory} is not visible from Ray node {os.uname().nodename}: --output (and the "
                            "working directory) must be on storage every node of the cluster sees")  # fmt: skip
        os.chdir(working_directory)
        sys.path.insert(0, working_directory)  # plug-in rankers, found from the working directory
        self.directory = Path(directory)
        self.context = open_worker()
        self.process = self.context.__enter__()
        print(f"replica ready on {os.uname().nodename}", flush=True)  # in the command's log, as all an actor prints

    def ready(self) -> None:
        """Returns once the actor is built (the model loaded)."""

    def run(self, shard: Shard) -> tuple[int, int]:
        return save_shard(self.directory, shard, self.process(shard))


def run_on_ray(address: str, directory: Path, shards: list[Shard], open_worker: ShardWorker, report: Callable,
               replicas: int, gpus_per_replica: int = 1) -> None:  # fmt: skip
    """Process `shards` on `replicas` actors of the Ray cluster at `address`, saving each in `directory`."""
    ray = _connect(address)
    gpus = ray.cluster_resources().get("GPU", 0) > 0  # the cluster's, not this machine's
    actor_class = ray.remote(max_restarts=0, max_task_retries=0,
                             **({"num_gpus": gpus_per_replica} if gpus else {"num_cpus": 1}))(ShardActor)  # fmt: skip
    probe = directory / f".visible-{uuid.uuid4().hex}"
    probe.touch()
    pool = _Pool(ray, lambda: actor_class.remote(open_worker, str(directory.resolve()), os.getcwd(),
                                                 str(probe.resolve())))  # fmt: skip
    try:
        for _ in range(min(replicas, len(shards))):
            pool.start()
        queue = list(shards)
        while queue or pool.running:
            while queue and pool.idle:
                pool.give(queue.pop(0))
            finished, failed = pool.next_event()
            if finished is not None:
                report(*finished)
            if failed is not None:
                queue.insert(0, failed)
    finally:
        pool.stop()
        probe.unlink(missing_ok=True)
        ray.shutdown()  # while the stage's log is open: nothing the actors print reaches the terminal afterwards


class _Pool:
    """The replicas: starting, idle or running a shard; a dead one is dropped, and replaced when none is left."""

    def __init__(self, ray, new_actor: Callable):
        self.ray, self.new_actor = ray, new_actor
        self.starting: dict = {}  # ready() future -> actor
        self.running: dict = {}  # run() future -> (shard, actor)
        self.idle: list = []
        self.actors: list = []
        self.deaths = 0

    def start(self) -> None:
        actor = self.new_actor()
        self.actors.append(actor)
        self.starting[actor.ready.remote()] = actor

    def give(self, shard: Shard) -> None:
        actor = self.idle.pop()
        self.running[actor.run.remote(shard)] = (shard, actor)

    def next_event(self) -> tuple[tuple[int, int] | None, Shard | None]:
        """Wait for a replica to start or to finish a shard: (counts, None), or (None, a dead replica's shard)."""
        alone = not self.running and not self.idle  # only replicas that may never start
        futures = [*self.running, *self.starting]
        done, _ = self.ray.wait(futures, num_returns=1, timeout=START_TIMEOUT if alone else None)
        if not done:
            raise SppoError(f"no Ray replica started in {START_TIMEOUT} s: the cluster has no room for one "
                            "(see `ray status`)")  # fmt: skip
        future = done[0]
        if future in self.starting:
            actor = self.starting.pop(future)
            try:
                self.ray.get(future)
                self.idle.append(actor)
            except self.ray.exceptions.RayActorError as error:
                self._died(error, "a replica died as it started", init_failed=error.actor_init_failed)
            return None, None
        shard, actor = self.running.pop(future)
        try:
            counts = self.ray.get(future)
        except self.ray.exceptions.RayActorError as error:  # the replica or its node died: its shard is done again
            self._died(error, f"the replica working on prompts {shard.start}-{shard.stop - 1} died")
            return None, shard
        except self.ray.exceptions.RayTaskError as error:  # the work itself failed: bad input or a bug, as at home
            raise error.cause from None
        self.idle.append(actor)
        return counts, None

    def _died(self, error: Exception, what: str, init_failed: bool = False) -> None:
        if init_failed:  # loading the model or the ranker failed, or the output is not shared: so would any replica
            raise SppoError(f"a Ray replica could not start: {str(error).strip().splitlines()[-1]}") from None
        self.deaths += 1
        if self.deaths > MAX_REPLACEMENTS:
            raise SppoError(f"{what}, and {MAX_REPLACEMENTS} replicas have died in this run: {first_line(error)}")
        logger.warning("%s (%s); its shard goes back to the queue", what, first_line(error))
        if not self.running and not self.idle and not self.starting:
            self.start()

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _connect(address: str):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the actors' output, streamed into the stage's log: plain text,
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every line (read by `import ray`), no summary after the log closes
    try:
        import ray
    except ImportError:
        raise SppoError("--ray-address needs Ray: pip install 'sppo-cli[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise SppoError(f"cannot connect to the Ray cluster at {address}: {first_line(error)}") from error
    return ray
