"""Where a stage's output goes: the full story to a log file in its output directory; one progress bar and one
summary line to the terminal.

While a stage log is open, this process's standard output and error (file descriptors 1 and 2, so C libraries and
child processes too: vLLM's engine, data-parallel workers, torchrun's training processes) write to the log file, and
Python's logging and warnings are recorded there with the process's rank. The terminal keeps only what `terminal()`
is given: the progress bar and sppo's own lines. With `verbose`, everything the log gets is shown as well.
"""

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from tqdm.auto import tqdm

LOG_NAME = "sppo.log"
FORMAT = "%(asctime)s [%(tag)s] %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("sppo")
_terminal: TextIO | None = None
_last_log: Path | None = None


def quiet_libraries() -> None:
    """Keep the progress bars of datasets, transformers and huggingface_hub (read from the environment when they
    are imported, by this process and its children) out of the terminal, which has sppo's own."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def terminal() -> TextIO:
    """The user's terminal, also while the process's output goes to a log."""
    return _terminal or sys.stderr


def warn(message: str) -> None:
    """A warning the user should see: on the terminal, and in the log (if a stage's log is open)."""
    if logger.hasHandlers():  # else logging would print it a second time
        logger.warning(message)
    print(f"sppo: warning: {message}", file=terminal(), flush=True)


def last_log() -> Path | None:
    """The log file of the last stage this process ran, if there is one."""
    return _last_log if _last_log is not None and _last_log.exists() else None


def process_tag() -> str:
    if "RANK" in os.environ:
        return f"rank {os.environ['RANK']}"
    return os.environ.get("SPPO_PROCESS_TAG", "main")


def record_to(stream: TextIO, level: int = logging.INFO) -> logging.Handler:
    """Send Python's logging and warnings to `stream`, each record tagged with this process's rank."""
    handler = logging.StreamHandler(stream)
    tag = process_tag()

    def add_tag(record: logging.LogRecord) -> bool:
        record.tag = tag
        return True

    handler.addFilter(add_tag)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or level, level))
    logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


@contextlib.contextmanager
def stage_log(path: Path, verbose: bool = False, inherited: bool = False) -> Iterator[Path]:
    """Send everything this process and its children print to the log file `path` (appended to).

    `inherited`: this process's output already goes to the stage's log (a training process that `sppo train`
    launched), so only Python's logging is set up."""
    global _terminal, _last_log
    sys.stdout.flush()
    sys.stderr.flush()
    root = logging.getLogger()
    saved_logging = root.level, logger.level
    previous_terminal, previous_streams = _terminal, (sys.stdout, sys.stderr)
    _last_log = path
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_restore_logging, saved_logging)
        if inherited:
            handler = record_to(sys.stderr)
        else:
            _terminal = previous_terminal or _own_stream(sys.stderr)
            log = cleanup.enter_context(open(path, "ab", buffering=0))
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== {started} [{process_tag()}] sppo {' '.join(sys.argv[1:])}\n".encode())
            tee = _Tee(log, _terminal) if verbose else None
            cleanup.callback(_restore_terminal, previous_terminal, previous_streams[1])
            if tee:
                cleanup.callback(tee.close)
            _redirect(tee.input if tee else log.fileno(), cleanup)
            stream = cleanup.enter_context(os.fdopen(os.dup(2), "w", buffering=1))
            sys.stdout = sys.stderr = stream
            cleanup.callback(_set_streams, *previous_streams)
            handler = record_to(stream)
        cleanup.callback(root.removeHandler, handler)
        try:
            yield path
        except BaseException:
            logger.exception("the stage failed")
            raise


def _redirect(target: int, cleanup: contextlib.ExitStack) -> None:
    """Point file descriptors 1 and 2 at `target` until `cleanup` runs."""
    for fd in (1, 2):
        saved = os.dup(fd)
        os.dup2(target, fd)
        cleanup.callback(os.close, saved)
        cleanup.callback(os.dup2, saved, fd)


def _restore_logging(levels: tuple[int, int]) -> None:
    logging.getLogger().setLevel(levels[0])
    logger.setLevel(levels[1])
    logging.captureWarnings(False)


def _set_streams(stdout: TextIO, stderr: TextIO) -> None:
    sys.stdout, sys.stderr = stdout, stderr


def _restore_terminal(previous_terminal: TextIO | None, previous_stderr: TextIO) -> None:
    global _terminal
    if _terminal is not previous_terminal and _terminal is not previous_stderr:
        _terminal.close()
    _terminal = previous_terminal


def _own_stream(stream: TextIO) -> TextIO:
    """A stream to the terminal that survives fd 2 being redirected: a duplicate of fd 2 when `stream` writes to it."""
    try:
        if stream.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1)
    except (OSError, ValueError, AttributeError):  # pytest's capture and other in-memory streams have no fd
        pass
    return stream


class _Tee:
    """A pipe whose every byte is copied to the log and to the terminal (--verbose)."""

    def __init__(self, log: BinaryIO, terminal: TextIO):
        read, self.input = os.pipe()
        self._thread = threading.Thread(target=self._copy, args=(read, log, terminal), daemon=True)
        self._thread.start()

    @staticmethod
    def _copy(read: int, log: BinaryIO, terminal: TextIO) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                log.write(chunk)
                terminal.write(chunk.decode(errors="replace"))
                terminal.flush()

    def close(self) -> None:
        os.close(self.input)
        self._thread.join(timeout=10)  # training processes still holding the pipe are gone once the stage returns


class ProgressBar:
    """The stage's one bar on the terminal: rows done, and generated tokens per second when there are tokens."""

    def __init__(self, description: str, total: int | None, unit: str = "prompt"):
        self.bar = tqdm(total=total, desc=description, unit=unit, file=terminal(), dynamic_ncols=True)
        self.description, self.unit, self.tokens = description, unit, 0

    def update(self, rows: int, tokens: int = 0) -> None:
        if not rows:
            return
        self.tokens += tokens
        self.bar.update(rows)
        if self.tokens:
            elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
            self.bar.set_postfix(tokens_per_s=f"{self.tokens / elapsed:.0f}")
        logger.info("%s: %s/%s %ss done", self.description, self.bar.n, self.bar.total, self.unit)

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
