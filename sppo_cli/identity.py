"""What a stage's result depends on: its settings and the content of its inputs, never their names.

A local file or directory is identified by a hash of its content. Files larger than `WHOLE_FILE_LIMIT` (model
weights) are identified by their size and a hash of three windows of `WINDOW` bytes (start, middle and end): a
checkpoint rewritten by training changes all of them, and a copy keeps them, while hashing tens of gigabytes before
every stage would take minutes. A hub id is identified by the commit it resolves to, so a new revision pushed under
the same name is never mistaken for the old one.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from sppo_cli.errors import SettingError, SppoError, first_line

WHOLE_FILE_LIMIT = 256 * 2**20
WINDOW = 16 * 2**20
RepoType = Literal["model", "dataset"]


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if size <= WHOLE_FILE_LIMIT:
            while chunk := file.read(2**20):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            for offset in (0, size // 2 - WINDOW // 2, size - WINDOW):
                file.seek(offset)
                digest.update(file.read(WINDOW))
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a directory's files (their relative paths and digests)."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def hub_revision(repo_id: str, repo_type: RepoType) -> str:
    """The commit `repo_id` resolves to now: asked of the hub, or read from the local cache when offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type).sha
    except RepositoryNotFoundError:
        message = f"{repo_id}: not a local path, and the hub has no such {repo_type} (or it is private)"
        raise SppoError(message) from None
    except Exception as error:  # offline, unreachable, server errors: the network's many exception types
        reason = first_line(error)
    ref = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / "main"
    if ref.is_file():
        return ref.read_text().strip()
    raise SppoError(f"cannot tell which revision of {repo_id} to use: the hub is unreachable ({reason}) and it is "
                    "not in the local cache")  # fmt: skip


def template_fingerprint(chat_template: str | None) -> str | None:
    """A --chat-template file by content; None for the model's own template."""
    if chat_template and not Path(chat_template).is_file():
        raise SettingError("chat_template", f"names no file: {chat_template}")
    return fingerprint(chat_template) if chat_template else None


def vocabulary_fingerprint(tokenizer) -> str:
    """What token ids mean to `tokenizer`: ids sampled with one vocabulary are scored only by a model of the same."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    return "sha256:" + hashlib.sha256(vocabulary.encode()).hexdigest()


def fingerprint(source: str, repo_type: RepoType = "model") -> str:
    """`sha256:…` for a local file or directory, `hub:ID@COMMIT` for a hub id."""
    path = Path(source)
    if path.exists():
        return "sha256:" + content_digest(path)
    return f"hub:{source}@{hub_revision(source, repo_type)}"


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two identities, readable: `temperature (0.7 -> 0.9)`, `model (other content)`."""
    changes = []
    for group in ("settings", "inputs"):
        before, after = old.get(group, {}), new.get(group, {})
        for name in sorted(before.keys() | after.keys()):
            if before.get(name) != after.get(name):
                changes.append(_describe(name, before.get(name), after.get(name), group == "inputs"))
    return changes


def _describe(name: str, before: Any, after: Any, is_input: bool) -> str:
    if is_input:
        return f"{name} (other content)" if before and after else f"{name} ({'added' if after else 'removed'})"
    return f"{name} ({before!r} -> {after!r})"
