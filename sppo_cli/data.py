"""The datasets the stages exchange: column names, validation, and reading inputs and finished stage outputs.

Data flows one way: prompts → generations (`sppo generate`) → rankings (`sppo rank`) → model (`sppo train`).
A stage output is a directory with a finished `manifest.json` (stage.py writes them atomically); a directory without
one, or a `<name>.partial`, is never read as a finished output.
"""

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from sppo_cli.errors import SppoError, first_line

# Prompts
PROMPT = "prompt"
# Generations: the prompt as chat messages (system turn included), the exact chat-formatted text that was sampled
# from and its token ids, the K responses, their lengths, their sampled token ids and why each ended ("stop": the
# model ended it; "length": --max-new-tokens cut it)
CONVERSATION = "conversation"
PROMPT_TEXT = "prompt_text"
PROMPT_TOKEN_IDS = "prompt_token_ids"
RESPONSES = "responses"
RESPONSE_TOKENS = "response_tokens"
RESPONSE_TOKEN_IDS = "response_token_ids"
FINISH_REASONS = "finish_reasons"
STOPPED, TRUNCATED = "stop", "length"  # the finish reasons
PER_RESPONSE = (RESPONSES, RESPONSE_TOKENS, RESPONSE_TOKEN_IDS, FINISH_REASONS)  # a list of K per row
GENERATED = (CONVERSATION, PROMPT_TEXT, PROMPT_TOKEN_IDS, *PER_RESPONSE)  # what `sppo generate` adds to the prompts
# Rankings: the published SPPO training format ...
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_PROBS = "chosen_probs"
CHOSEN_PROBS_WIN = "chosen_probs_win"
CHOSEN_PROBS_LOSE = "chosen_probs_lose"
WIN_RATE_COLUMNS = (CHOSEN_PROBS, CHOSEN_PROBS_WIN, CHOSEN_PROBS_LOSE)
# ... plus which of the K responses the two are, and their sampled token ids (when the generations have them),
# which training scores
CHOSEN_INDEX = "chosen_index"
REJECTED_INDEX = "rejected_index"
CHOSEN_TOKEN_IDS = "chosen_token_ids"
REJECTED_TOKEN_IDS = "rejected_token_ids"
# ... plus what the ranking was made from
SCORES = "scores"
PROBABILITY = "probability"

MANIFEST = "manifest.json"
SAMPLED_CHAT_TEMPLATE = "sampled_chat_template"  # a rank manifest's: the --chat-template its responses were sampled
# with (the content's fingerprint; None: the model's own), which training must use too
SAMPLED_VOCABULARY = "sampled_vocabulary"  # a generate and rank manifest's: the vocabulary of the token ids
PARTIAL_SUFFIX = ".partial"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def may_be_hub_id(name: str, owner_required: bool = True) -> bool:
    """Whether a name that is not here may be looked up on the hub: never a path-like one (`./x`, `/x`, a `.partial`,
    or `runs/model` when there is a local `runs/`), so a mistyped local path fails at once, not after hub retries."""
    if Path(name).exists() or not _HUB_ID.match(name) or name.startswith(".") or name.endswith(PARTIAL_SUFFIX):
        return False
    owner = name.split("/")[0] if "/" in name else None
    return (owner is not None or not owner_required) and not (owner and Path(owner).is_dir())


def refuse_partial(path: str | Path) -> None:
    """A `<name>.partial` is the unfinished output of an interrupted run, whatever it holds: never an input."""
    if Path(path).resolve().name.endswith(PARTIAL_SUFFIX):
        raise SppoError(f"{path} is the unfinished output of an interrupted run, not an input; re-run the command "
                        "that makes it to finish it")  # fmt: skip


def read_dataset(source: str, split: str = "train") -> Dataset:
    """Read a save_to_disk directory, a json/jsonl/parquet file, or a hub dataset id."""
    path = Path(source)
    if may_be_hub_id(source):
        return _read(lambda: datasets.load_dataset(source, split=split), source)
    if path.is_dir():
        refuse_partial(path)
        if (path / MANIFEST).exists():
            data = load_stage(path)[0]
        else:
            data = _read(lambda: datasets.load_from_disk(str(path), keep_in_memory=True), source)
    elif path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise SppoError(f"{source}: unsupported file type {path.suffix!r} (use .json, .jsonl or .parquet)")
        data = _read(lambda: datasets.load_dataset(builder, data_files=str(path), split="train"), source)
    else:
        raise SppoError(f"{source}: no such file or directory")
    if isinstance(data, DatasetDict):
        if split not in data:
            raise SppoError(f"{source} has no split {split!r} (it has: {', '.join(data)})")
        return data[split]
    if split != "train":
        raise SppoError(f"{source} has no splits: --split {split} needs a dataset with several (a DatasetDict "
                        "directory or a hub dataset)")  # fmt: skip
    return data


def _read(load, source: str) -> Dataset | DatasetDict:
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)  # its "Failed to load JSON" line: the error below says it better
    try:
        return load()
    except Exception as error:  # datasets raises many types; the user needs to know which input failed and why
        raise SppoError(f"cannot read {source}: {_json_problem(Path(source)) or first_line(error)}") from error
    finally:
        datasets_logger.setLevel(level)


def _json_problem(path: Path) -> str | None:
    """What is wrong with a JSON or JSON Lines file that datasets cannot read (it only says that generating the
    dataset failed): that it is empty, or its first line that is not JSON."""
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return None
    text = path.read_text(errors="replace")
    if not text.strip():
        return "the file is empty"
    if path.suffix.lower() == ".json" and not text.lstrip().startswith("{"):  # a JSON array, not JSON Lines
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as error:
            return f"line {error.lineno} is not valid JSON ({error.msg})"
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except ValueError as error:
            return f"line {number} is not valid JSON ({error})"
    return None


def load_prompts(source: str, split: str = "train", prompt_column: str = PROMPT, limit: int | None = None,
                 system_prompt: str | None = None) -> Dataset:  # fmt: skip
    """Prompts for `sppo generate`: column `prompt` (renamed from `prompt_column`), a string or a conversation cut
    after its last user turn; column `conversation`, the prompt as chat messages with `system_prompt` as the system
    turn of those that have none; every other column kept."""
    data = read_dataset(source, split)
    if prompt_column != PROMPT:
        if prompt_column in data.column_names and PROMPT in data.column_names:
            data = data.remove_columns(PROMPT)
        data = _require_columns(data, [prompt_column], source).rename_column(prompt_column, PROMPT)
    data = _require_columns(data, [PROMPT], source)
    # a generations directory used as prompts is sampled afresh
    data = data.remove_columns([c for c in GENERATED if c in data.column_names])
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    _require_rows(data, source)
    prompts = [_checked_prompt(prompt, f"{source}: row {index}") for index, prompt in enumerate(data[PROMPT])]
    conversation = [as_conversation(prompt, system_prompt) for prompt in prompts]
    return data.map(lambda _, i: {PROMPT: prompts[i], CONVERSATION: conversation[i]}, with_indices=True,
                    keep_in_memory=True)  # fmt: skip


def as_conversation(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn; `system_prompt` opens one that has no system turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _checked_prompt(prompt: Any, where: str) -> str | list[dict[str, str]]:
    """A non-empty string, or a conversation of role/content messages cut after its last user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise SppoError(f"{where} has an empty prompt")
        return prompt
    if not (isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt)):
        raise SppoError(f"{where}: a prompt is a string or a list of {{'role', 'content'}} messages, got {prompt!r}")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise SppoError(f"{where}: the conversation has no user turn")
    if any(m["role"] == "system" for m in messages[1:]):
        raise SppoError(f"{where}: a system turn may only open the conversation")
    return messages[: users[-1] + 1]


def _is_message(message: Any) -> bool:
    return (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
            and isinstance(message.get("content"), str))  # fmt: skip


def conversations(batch: dict[str, list]) -> list[list[dict[str, str]]]:
    """The prompts of a batch of generations as chat messages (generations made before conversations had a
    `conversation` column: their string prompts, as one user turn)."""
    return batch[CONVERSATION] if CONVERSATION in batch else [as_conversation(p) for p in batch[PROMPT]]


def validate_generations(data: Dataset, source: str) -> Dataset:
    _require_columns(data, [PROMPT, PROMPT_TEXT, RESPONSES], source)
    _require_rows(data, source)
    for index, responses in enumerate(data[RESPONSES]):
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise SppoError(f"{source}: row {index}: `{RESPONSES}` must be a list of strings")
        if len(responses) < 2:
            raise SppoError(f"{source}: row {index} has {len(responses)} response(s); ranking needs K >= 2")
    return data


def validate_rankings(data: Dataset, source: str) -> Dataset:
    _require_columns(data, [CHOSEN, REJECTED, *WIN_RATE_COLUMNS], source)
    _require_rows(data, source)
    for index, row in enumerate(data.select_columns([CHOSEN, REJECTED, *WIN_RATE_COLUMNS])):
        for column in (CHOSEN, REJECTED):
            if not _is_conversation(row[column]):
                raise SppoError(
                    f"{source}: row {index}: `{column}` must be a list of messages ending with the assistant's"
                )
        if row[CHOSEN][:-1] != row[REJECTED][:-1]:
            raise SppoError(f"{source}: row {index}: `{CHOSEN}` and `{REJECTED}` answer different prompts")
        for column in WIN_RATE_COLUMNS:
            value = row[column]
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or math.isnan(value):
                raise SppoError(f"{source}: row {index}: `{column}` must be a probability in [0, 1], got {value!r}")
    return data


def _is_conversation(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) >= 2
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        and messages[-1].get("role") == "assistant"
    )


def _require_columns(data: Dataset, columns: list[str], source: str) -> Dataset:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise SppoError(
            f"{source} is missing column(s) {', '.join(map(repr, missing))} (it has: {', '.join(data.column_names)})"
        )
    return data


def _require_rows(data: Dataset, source: str) -> None:
    if len(data) == 0:
        raise SppoError(f"{source} has no rows")


# ---- stage outputs -------------------------------------------------------------------------------------------------


def load_stage(path: str | Path, stage: str | None = None) -> tuple[Dataset, dict]:
    """Load a finished stage output, a directory or one `sppo push` published (by its hub id); a directory without
    a finished manifest is refused."""
    source = str(path)
    path = published(source) or Path(path)
    manifest = read_manifest(path)
    if stage is not None and manifest["stage"] != stage:
        raise SppoError(f"{source} is the output of `sppo {manifest['stage']}`, expected `sppo {stage}`")
    parquet = sorted(str(p) for p in path.glob("data/*.parquet"))  # as published
    if parquet:
        return _read(lambda: datasets.load_dataset("parquet", data_files=parquet, split="train"), source), manifest
    # In memory: operations on a dataset mapped from disk may write cache files into the finished output.
    return _read(lambda: datasets.load_from_disk(str(path), keep_in_memory=True), source), manifest


def published(source: str) -> Path | None:
    """The local copy of a hub dataset that `sppo push` published (it has a manifest), if `source` is one."""
    if not may_be_hub_id(source):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(source, MANIFEST, repo_type="dataset")  # first: any other dataset is not fetched twice
        path = Path(snapshot_download(source, repo_type="dataset"))
    except Exception as error:  # not on the hub, not reachable: the caller says the path does not exist
        logging.getLogger("sppo").info("%s is not a reachable hub dataset: %s", source, first_line(error))
        return None
    return path if (path / MANIFEST).is_file() else None


def sampled_chat_template(manifest: dict) -> str | None:
    """The fingerprint of the --chat-template a generate or eval output was sampled with; None: the model's own."""
    return manifest.get("identity", {}).get("inputs", {}).get("chat_template")


def read_manifest(path: str | Path) -> dict:
    refuse_partial(path)
    path = published(str(path)) or Path(path)
    if not path.exists():
        raise SppoError(f"{path}: no such file or directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SppoError(f"{path} has no {MANIFEST}: it is not a finished sppo output (interrupted run?)") from None
    except json.JSONDecodeError as error:
        raise SppoError(f"{path / MANIFEST} is not valid JSON: {error}") from None
    if not manifest.get("complete") or "stage" not in manifest:
        raise SppoError(f"{path / MANIFEST} does not describe a finished sppo output")
    return manifest
