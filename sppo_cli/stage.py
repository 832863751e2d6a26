"""The machinery every stage shares: identity, resume, atomic output, shards.

A stage writes into `<output>.partial` and renames it to `<output>` once its `manifest.json` is written, so a
directory with a finished manifest is a finished output and nothing else is. The run's identity (its stage, the
settings that change its result and the content of its inputs, see identity.py) is kept in `<output>.partial/run.json`
and in the manifest:

- re-running a finished stage with the same identity does nothing and says so (`overwrite` redoes it);
- re-running it with another identity is refused, naming what differs, unless `overwrite`;
- re-running an interrupted stage with the same identity resumes it from its finished shards or checkpoints;
  with another identity it is refused unless `overwrite`: finished work is never deleted silently.

One process at a time writes a partial output: a second is refused while the first holds its lock.
Work is cut into shards of consecutive rows; each finished shard is saved as a file of its own, so an interruption
(even kill -9) loses at most the shards in progress.
"""

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset

from sppo_cli import __version__
from sppo_cli.config import Settings, WorkOptions
from sppo_cli.data import MANIFEST, PARTIAL_SUFFIX, read_manifest
from sppo_cli.errors import SliceDone, SppoError
from sppo_cli.identity import differences, fingerprint
from sppo_cli.logs import LOG_NAME, ProgressBar, logger, stage_log, warn
from sppo_cli.parallel import WorkerError, run_workers

RUN_FILE = "run.json"
LOCK_FILE = ".sppo.lock"  # a file, not the directory: a directory cannot be opened for writing, which NFS locks need
SLICE_LOCK, SLICE_LOCKS = "slice-{index}.lock", "slice-*.lock"
REPLACED_SUFFIX = ".replaced"
REPLACED_MARK = ".replaced-by-sppo"  # in an output that a new one is replacing
SHARDS = "shards"
LAYOUT = "layout.json"
MERGE_POLL_SECONDS = 2


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Have `write` write a temporary file (of the same suffix), then rename it to `path`: the file is either absent
    or complete, whenever the process is killed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    write(temporary)
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(value, indent=1) + "\n"))


class StageRun:
    """One run of a stage into `output`: recognises finished and interrupted runs, and finishes atomically."""

    def __init__(self, stage: str, output: str | Path, settings: Settings, inputs: dict[str, str | None],
                 overwrite: bool = False, input_types: dict[str, str] | None = None):  # fmt: skip
        self.stage, self.output, self.settings, self.overwrite = stage, Path(output), settings, overwrite
        self.partial = partial_dir(self.output)
        inputs = {**inputs, **settings.files()}
        self.inputs = {name: _absolute_if_local(source) for name, source in inputs.items() if source is not None}
        types = input_types or {}
        self.identity = {
            "stage": stage,
            "settings": settings.identity(),
            "inputs": {name: fingerprint(source, types.get(name, "model")) for name, source in self.inputs.items()},
        }
        self.scratch = [SHARDS, RUN_FILE, SLICE_LOCKS]  # what only resuming needs: removed when the run finishes
        self.work = [f"{SHARDS}/**/[0-9]*.json"]  # what an interrupted run has finished: never deleted silently
        # wall-clock start; training processes launched by `sppo train` count from their launcher's start
        self.started = float(os.environ.get("SPPO_STAGE_STARTED", time.time()))
        self._lock: int | None = None
        self._slice_lock: int | None = None

    # ---- before any work -------------------------------------------------------------------------------------------

    def finished(self) -> dict | None:
        """The manifest when `output` is already this very run's result (and not to be redone); raises when it holds
        something else that may not be replaced."""
        self._recover_replacement()
        if not self.output.exists():
            return None
        if not (self.output / MANIFEST).exists():
            if self.overwrite:
                return None
            raise SppoError(f"{self.output} already exists and is not an sppo output; choose another --output, "
                            "or pass --overwrite to replace it")  # fmt: skip
        manifest = read_manifest(self.output)
        if self.overwrite:
            return None
        if manifest.get("identity") == self.identity:
            return manifest
        raise SppoError(f"{self.output} was made {self._how_made(manifest.get('identity'))}; pass --overwrite to "
                        "replace it")  # fmt: skip

    def _recover_replacement(self) -> None:
        """Finish a replacement a kill interrupted: remove the old output, left as `<output>.replaced` or, after the
        exchange, as `<output>.partial`; put a finished partial in place if the output is missing."""
        partial_is_old = (self.partial / REPLACED_MARK).exists()
        if partial_is_old or self.replaced.exists():
            with contextlib.suppress(FileNotFoundError):  # another process may be doing the same
                if partial_is_old:
                    os.replace(self.partial, self.replaced)
                if not self.output.exists() and self.completed_any():
                    os.replace(self.partial, self.output)
            shutil.rmtree(self.replaced, ignore_errors=True)

    def completed_any(self) -> bool:
        """Whether `<output>.partial` holds a run that finished (its manifest written), whatever its identity."""
        return _finished_manifest(self.partial) is not None

    def _how_made(self, other: dict | None) -> str:
        if not other:
            return "by another version of sppo, which kept no record of its settings"
        if other.get("stage") != self.stage:
            return f"by `sppo {other.get('stage')}`, not `sppo {self.stage}`"
        return f"with other settings or inputs: {', '.join(differences(other, self.identity))}"

    def open(self, lock: bool = True) -> Path | None:
        """Create `<output>.partial`, or resume it if an interrupted run with the same identity left it; None when
        another process finished this very run meanwhile (nothing is left to do).

        With `lock`, hold the partial output's lock until `close()`: another process writing it is refused. The slices
        of a run (--num-shards) set it up one at a time, then each holds the lock of its own slice only, and a run
        that is not a slice (the merge) waits for running slices before it touches the partial."""
        slice_index = self.settings.shard_index if getattr(self.settings, "num_shards", None) is not None else None
        if lock:
            self._acquire_lock(wait=slice_index is not None)
        else:
            self.partial.mkdir(parents=True, exist_ok=True)
        try:
            if lock and self.finished() is not None:  # finished by another process before this one held the lock
                self._drop_empty_partial()
                self.close()
                return None
            if lock and slice_index is None:
                self._wait_for_running_slices()
            partial = self._resume_or_start()
            if slice_index is not None:
                self._slice_lock = _lock_file(partial / SLICE_LOCK.format(index=slice_index))
                if self._slice_lock is None:
                    raise SppoError(f"slice {slice_index} of {self.output} is already running")
                os.close(self._lock)
                self._lock = None
        except BaseException:
            self.close()
            raise
        return partial

    def _resume_or_start(self) -> Path:
        run_file = self.partial / RUN_FILE
        previous = json.loads(run_file.read_text()) if run_file.exists() else self._manifest_identity()
        if previous == self.identity:
            logger.info("resuming the interrupted run in %s", self.partial)
            return self.partial
        if self._holds_work() and not self.overwrite:
            raise SppoError(f"{self.partial} holds the finished part of an interrupted run made "
                            f"{self._how_made(previous)}; re-run with those to resume it, or pass --overwrite to "
                            "discard it")  # fmt: skip
        for entry in self.partial.iterdir():  # nothing worth keeping, but the log of the earlier attempt (and locks)
            if entry.name != LOG_NAME and not _is_lock(entry):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        write_json(run_file, self.identity)
        return self.partial

    def _acquire_lock(self, wait: bool = False) -> None:
        """Lock `<output>.partial`, created if need be (`wait`: for as long as another process holds it; also when
        that is a slice setting up); a partial that another process renamed into place meanwhile is not the one to
        lock: look again."""
        while True:
            self.partial.mkdir(parents=True, exist_ok=True)
            try:
                self._lock = _lock_file(self.partial / LOCK_FILE, wait or any(self.partial.glob(SLICE_LOCKS)))
            except FileNotFoundError:
                continue
            if self._lock is None:
                raise SppoError(f"{self.partial} is being written by another sppo process; wait for it to finish, or "
                                "stop it, before running this again")  # fmt: skip
            try:
                if os.path.samestat(os.fstat(self._lock), os.stat(self.partial / LOCK_FILE)):
                    return
            except FileNotFoundError:
                pass
            self.close()

    def _wait_for_running_slices(self) -> None:
        """The merging run starts once no slice is writing the partial; it does the shards of slices that never ran."""
        for path in sorted(self.partial.glob(SLICE_LOCKS)):
            held = _lock_file(path)
            if held is None:
                warn(f"waiting for {path.stem.replace('-', ' ')} of {self.output} to finish")
                held = _lock_file(path, wait=True)
            os.close(held)

    def refuse_an_indistinguishable_merge(self) -> None:
        """A slice that waits for the merge cannot tell it from an output with the same identity that --overwrite
        replaces (or that the merge already made, were this slice late): it would go on with that one."""
        if self.overwrite and self._output_identity() == self.identity:
            raise SppoError(f"{self.output} is already finished with these settings and inputs, and a slice with "
                            "--wait-for-merge could not tell it from the merge it waits for; remove it to redo it")

    def wait_for_merge(self) -> None:
        """Wait until the run without --num-shards (on node 0) has merged the slices: `output` finished with this run's
        identity, not an earlier output that it replaces. An error when `output` was made by another run and the
        partial output no longer holds this one: the merge made something else."""
        warn(f"waiting for the slices of {self.output} to be merged")
        while True:
            made = self._output_identity()
            if made == self.identity:
                return
            if made is not None and self._partial_identity() != self.identity:
                raise SppoError(f"{self.output} was merged {self._how_made(made)}, not from this slice; run this "
                                "slice again with the merge's settings and inputs")  # fmt: skip
            time.sleep(MERGE_POLL_SECONDS)

    def _output_identity(self) -> dict | None:
        manifest = _finished_manifest(self.output)
        return manifest.get("identity") if manifest else None

    def _partial_identity(self) -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.partial / RUN_FILE).read_text())
        return None

    def _drop_empty_partial(self) -> None:
        """Remove the `<output>.partial` this process created to lock, if it holds nothing (but a log)."""
        with contextlib.suppress(FileNotFoundError):
            if all(entry.name == LOG_NAME or _is_lock(entry) for entry in self.partial.iterdir()):
                shutil.rmtree(self.partial, ignore_errors=True)

    def close(self) -> None:
        """Release the partial output's lock, or its slice's."""
        for held in (self._lock, self._slice_lock):
            if held is not None:
                os.close(held)
        self._lock = self._slice_lock = None

    def _manifest_identity(self) -> dict | None:
        path = self.partial / MANIFEST
        return json.loads(path.read_text()).get("identity") if path.exists() else None

    def _holds_work(self) -> bool:
        return any(any(self.partial.glob(pattern)) for pattern in self.work) or (self.partial / MANIFEST).exists()

    # ---- after the work --------------------------------------------------------------------------------------------

    def completed(self) -> dict | None:
        """The manifest of a run that was killed after writing it, before its output was renamed into place."""
        path = self.partial / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("identity") == self.identity and manifest.get("complete"):
                return manifest
        return None

    def write_manifest(self, **stats: Any) -> dict:
        manifest = self.manifest(**stats)
        write_json(self.partial / MANIFEST, manifest)
        return manifest

    def manifest(self, **stats: Any) -> dict:
        """The record of this run with `stats`, as `write_manifest` writes it."""
        return {
            "stage": self.stage,
            "sppo_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            "parameters": self.settings.record(),
            "identity": self.identity,
            **stats,
            "seconds": round(time.time() - self.started, 3),
            "complete": True,
        }

    def finish(self) -> None:
        """Drop what only resuming needed and rename `<output>.partial` into place. An output it replaces (allowed
        by `overwrite`, or a finished run's own partial) is exchanged with it in one step, so that `output` is the old
        or the new one whenever the process is killed, and then removed."""
        for pattern in self.scratch:
            for scratch in self.partial.glob(pattern):
                shutil.rmtree(scratch) if scratch.is_dir() else scratch.unlink()
        shutil.rmtree(self.replaced, ignore_errors=True)  # what an interrupted replacement was replacing
        if self.output.is_file():  # not an sppo output (--overwrite allowed it): nothing to keep until the end
            self.output.unlink()
        if not self.output.exists():
            os.replace(self.partial, self.output)
        else:
            (self.output / REPLACED_MARK).touch()  # the old output, wherever a kill leaves it, is known for what it is
            if exchange(self.partial, self.output):
                with contextlib.suppress(FileNotFoundError):  # another run's recovery may have moved it already
                    os.replace(self.partial, self.replaced)
            else:  # a file system without atomic exchange: two renames, the second finished by the next run
                os.replace(self.output, self.replaced)
                os.replace(self.partial, self.output)
            shutil.rmtree(self.replaced, ignore_errors=True)
        (self.output / LOCK_FILE).unlink(missing_ok=True)  # held still: a waiting process looks again, finds it done
        self.close()

    @property
    def replaced(self) -> Path:
        """Where an output being replaced goes before it is removed."""
        return self.output.with_name(self.output.name + REPLACED_SUFFIX)

    def log_start(self) -> None:
        logger.info("sppo %s -> %s; inputs %s; settings %s", self.stage, self.output, self.inputs,
                    self.settings.record())  # fmt: skip

    @staticmethod
    def log_finish(manifest: dict) -> None:
        logger.info("finished: %s", {k: v for k, v in manifest.items() if k not in ("parameters", "identity")})


def _finished_manifest(directory: Path) -> dict | None:
    """`directory`'s manifest if it says its run finished; None when it is missing or unreadable (another process may
    be writing or replacing it)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("complete") else None


def _lock_file(path: Path, wait: bool = False) -> int | None:
    """An exclusive lock on `path` (created if need be), as an open descriptor; None if another process holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _is_lock(path: Path) -> bool:
    return path.name == LOCK_FILE or path.match(SLICE_LOCKS)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the file system or the C
    library cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(a))


def save_dataset(data: Dataset, directory: Path) -> None:
    """save_to_disk into a stage's partial directory, over the files of a save that was interrupted."""
    for leftover in [*directory.glob("data-*.arrow"), directory / "dataset_info.json", directory / "state.json"]:
        leftover.unlink(missing_ok=True)
    data.save_to_disk(str(directory))


def _absolute_if_local(source: str) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else source


def run_stage(run: StageRun, work: Callable[[Path], dict], verbose: bool = False) -> tuple[dict, bool]:
    """Run `work(partial_directory) -> manifest stats` unless this very run is finished already.

    Returns the manifest and whether the output was already there; raises SliceDone when the run was one slice."""
    manifest = run.finished()
    if manifest is not None:
        return manifest, True
    waits_for_merge = getattr(run.settings, "wait_for_merge", False)  # a slice's setting (WorkOptions)
    if waits_for_merge:
        run.refuse_an_indistinguishable_merge()
    try:
        partial = run.open()
        if partial is None:  # another process finished it meanwhile
            return run.finished(), True
        with stage_log(partial / LOG_NAME, verbose):
            run.log_start()
            try:
                manifest = run.completed() or run.write_manifest(**work(partial))
            except SliceDone as done:
                logger.info("%s", done)
                slice_done = done
            else:
                slice_done = None
                run.finish()
                run.log_finish(manifest)
    finally:
        run.close()
    if slice_done and waits_for_merge:
        run.wait_for_merge()
        raise SliceDone(f"{slice_done}, and merged into {run.output}")
    if slice_done:
        raise slice_done
    return manifest, False


# ---- shards ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row
    stop: int  # one past the last row

    @property
    def size(self) -> int:
        return self.stop - self.start


ShardWorker = Callable[[], AbstractContextManager[Callable[[Shard], dict]]]


def run_shards(directory: Path, rows: int, open_worker: ShardWorker, progress: ProgressBar, work: WorkOptions,
               gpus_per_worker: int = 1) -> list[dict]:  # fmt: skip
    """Process every row, `work.shard_size` at a time, and return the shards' results in row order.

    `open_worker()` loads what the work needs (a model) and yields a function that processes one shard into a
    JSON-serialisable dict whose `PER_ROW` entry holds lists of one value per row. Shards already saved in `directory`
    are not processed again, unless damaged (unreadable, or not one value per row: redone, with a warning). The others
    are processed here, on `work.data_parallel_size` worker processes (each taking every data_parallel_size-th pending
    shard), or on as many Ray actors (`work.ray_address`, taking shards as they free up). With `work.num_shards`, this
    process does only its slice, every num_shards-th shard, and raises SliceDone. A resumed run keeps the shard size of
    the run it resumes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    layout = directory / LAYOUT
    shard_size = work.shard_size
    if layout.exists():
        shard_size = json.loads(layout.read_text())["shard_size"]
    else:
        write_json(layout, {"shard_size": shard_size, "rows": rows})
    shards = [Shard(i, start, min(start + shard_size, rows)) for i, start in enumerate(range(0, rows, shard_size))]
    if work.num_shards is not None:  # this slice's shards (StageRun.open holds the slice's lock)
        shards = [shard for shard in shards if shard.index % work.num_shards == work.shard_index]
        progress.set_total(sum(shard.size for shard in shards))
    saved = {shard: _saved_shard(directory, shard) for shard in shards}
    pending = [shard for shard in shards if saved[shard] is None]
    logger.info("%d shards of up to %d rows, %d to do here", len(shards), shard_size, len(pending))
    progress.update(sum(shard.size for shard in shards) - sum(shard.size for shard in pending))
    _process(directory, pending, open_worker, progress, work, gpus_per_worker)
    if work.num_shards is not None:
        merge = "" if work.wait_for_merge else ("; run the same command without --num-shards and --shard-index once "
                                                "every slice is done, to merge them")  # fmt: skip
        raise SliceDone(f"slice {work.shard_index} of {work.num_shards} done ({len(pending)} shards){merge}")
    for shard in pending:
        saved[shard] = _saved_shard(directory, shard)
        if saved[shard] is None:
            raise WorkerError(f"the work on prompts {shard.start}-{shard.stop - 1} did not give one result per row")
    return [saved[shard] for shard in shards]


def _process(directory: Path, pending: list[Shard], open_worker: ShardWorker, progress: ProgressBar,
             work: WorkOptions, gpus_per_worker: int) -> None:  # fmt: skip
    if not pending:
        return
    if work.ray_address:
        from sppo_cli.cluster import run_on_ray

        run_on_ray(work.ray_address, directory, pending, open_worker, progress.update, work.data_parallel_size,
                   gpus_per_worker)  # fmt: skip
        return
    workers = min(work.data_parallel_size, len(pending))
    process = functools.partial(process_shards, open_worker, directory)
    if workers == 1:
        process(pending, progress.update)
    else:
        run_workers(process, [pending[rank::workers] for rank in range(workers)], progress.update, gpus_per_worker)


PER_ROW = "per_row"  # a shard result's lists of one value per row, by name


def _shard_path(directory: Path, shard: Shard) -> Path:
    return directory / f"{shard.index:06d}.json"


def _saved_shard(directory: Path, shard: Shard) -> dict | None:
    """The saved result of `shard`; None when there is none, or when it is damaged (then removed, to be redone)."""
    path = _shard_path(directory, shard)
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        intact = result["start"] == shard.start and all(len(values) == shard.size for values in
                                                        result[PER_ROW].values())  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if intact:
        return result
    warn(f"{path} is damaged or from an older sppo (unreadable, or not one result per row of prompts "
         f"{shard.start}-{shard.stop - 1}); doing that shard again")  # fmt: skip
    path.unlink()
    return None


def process_shards(open_worker: ShardWorker, directory: Path, shards: list[Shard], report: Callable) -> None:
    with open_worker() as process:
        for shard in shards:
            report(*save_shard(directory, shard, process(shard)))


def save_shard(directory: Path, shard: Shard, result: dict) -> tuple[int, int]:
    """Save a finished shard's result; its rows and tokens, for the progress bar."""
    write_json(_shard_path(directory, shard), {"start": shard.start, **result})
    return shard.size, result.get("num_tokens", 0)
