"""Data parallelism for the inference stages: one spawned worker process per group of GPUs.

A worker runs `work(assignment, report)`: `report(*counts)` streams progress to the parent, and results come
back as files the work writes. A worker that fails ends the run with one line (its traceback goes to the stage's
log, which the workers write to), and no worker outlives it.
"""

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sppo_cli.errors import SppoError, first_line
from sppo_cli.models import gpu_count

PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A worker process failed unexpectedly (a bug, not bad input): its traceback is in the stage's log."""


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel kill this process when its parent (pid `parent`, the current one by default) dies (Linux), so
    that a worker never outlives a killed run and writes on beside the run that resumes it."""
    parent = parent or os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: nothing to ask for
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent or parent == 1:  # the parent died before the request
        os._exit(1)


def reap_descendants_on_death() -> None:
    """Fork a watcher that, once this process is gone (even by kill -9), kills the processes it had started, with their
    own children: vLLM's engine processes (gigabytes, GPU memory on a GPU) are not tied to their parent and would
    otherwise live on. The watcher keeps a list of the living descendants, checked twice a second."""
    parent = os.getpid()
    if os.fork():
        return
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):  # not the command's handlers, which would unwind into its code
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()  # a Ctrl-C to the terminal's process group does not stop the watcher before it has done its work
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # hold no pipe or lock of the parent's open
            os.dup2(null, fd)
        os.closerange(3, max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1)
        known: set[tuple[int, str]] = set()
        while True:
            seen = _descendants(parent) - _descendants(os.getpid()) - {(os.getpid(), _started(os.getpid()))}
            if os.getppid() != parent:  # it died during the look, which may have missed its children (handed on)
                break
            known = seen
            time.sleep(0.5)
        for pid, started in known:
            if _started(pid) == started:  # the same process, not a new one that reuses its number
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    except BaseException:  # noqa: BLE001 - the watcher must never print or return into the caller's code
        pass
    os._exit(0)


def _started(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _descendants(root: int) -> set[tuple[int, str]]:
    """The processes below `root`, each with its start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.add((pid, _started(pid)))
        stack += children.get(pid, [])
    return found


def device_groups(ranks: int, gpus_per_rank: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each rank: consecutive groups of `gpus_per_rank` GPUs; none on a CPU."""
    if not gpu_count():
        return [None] * ranks
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(gpu_count())]
    if ranks * gpus_per_rank > len(devices):
        needed = f"{ranks} data-parallel workers x {gpus_per_rank} GPU(s)"
        raise SppoError(f"{needed} need more than the {len(devices)} GPUs visible")
    return [",".join(devices[rank * gpus_per_rank : (rank + 1) * gpus_per_rank]) for rank in range(ranks)]


def _worker(work: Callable, assignment, rank: int, devices: str | None, parent: int,
            messages: multiprocessing.Queue) -> None:  # fmt: skip
    from sppo_cli.logs import record_to

    die_with_parent(parent)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before the work initializes CUDA
    os.environ["SPPO_PROCESS_TAG"] = f"worker {rank}"
    record_to(sys.stderr)  # the parent's stderr, which is the stage's log
    try:
        work(assignment, lambda *counts: messages.put(("progress", *counts)))
    except Exception as error:  # reported to the parent, which prints one line instead of a worker's traceback
        logging.getLogger("sppo").error("worker %d failed:\n%s", rank, traceback.format_exc())
        line = first_line(error)
        messages.put(("error", line if isinstance(error, SppoError) else f"{type(error).__name__}: {line}",
                      isinstance(error, SppoError)))  # fmt: skip
    else:
        messages.put(("done",))


def run_workers(work: Callable, assignments: list, progress: Callable, gpus_per_rank: int = 1) -> None:
    """Run `work(assignment, report)` for each assignment in its own process; `work` must be picklable."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, so each sees only its own GPUs
    messages = context.Queue()
    groups = device_groups(len(assignments), gpus_per_rank)
    workers = [
        context.Process(target=_worker, args=(work, assignment, rank, devices, os.getpid(), messages))
        for rank, (assignment, devices) in enumerate(zip(assignments, groups))
    ]
    try:
        for worker in workers:
            worker.start()
        running = len(workers)
        while running:
            try:
                kind, *payload = messages.get(timeout=5)
            except queue.Empty:
                crashed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if crashed:
                    how = f"was killed by signal {-crashed[0]}" if crashed[0] < 0 else f"exited with code {crashed[0]}"
                    raise SppoError(f"a data-parallel worker {how} (out of memory?)") from None
                continue
            if kind == "error":
                message, user_error = payload
                raise (SppoError if user_error else WorkerError)(f"a data-parallel worker failed: {message}")
            if kind == "progress":
                progress(*payload)
            else:
                running -= 1
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
