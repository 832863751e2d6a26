"""Publishing finished outputs to the Hugging Face Hub, only when asked and only where asked.

A model goes as it is saved (the merged weights of a LoRA run, its adapter only if asked) with a model card; a
dataset goes as Parquet under `data/` with a dataset card, so that `datasets.load_dataset(repo_id)` and the
authors' training script read it; both carry `manifest.json`, which lets sppo read them back as finished outputs and
skip a push the hub already has (the same manifest and card); the log stays local. Repositories are private unless
`public`, and an existing repository of the other visibility is refused rather than changed. The token is
huggingface_hub's: HF_TOKEN, or `hf auth login`. The upload is huggingface_hub's `upload_folder` (files the hub
already has are not sent again), retried on transient errors; a failure is one line and leaves the local output as it
was.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sppo_cli.cards import dataset_card, license_of, model_card
from sppo_cli.config import PushConfig
from sppo_cli.data import MANIFEST, load_stage, read_manifest
from sppo_cli.errors import SppoError, first_line
from sppo_cli.logs import LOG_NAME, logger
from sppo_cli.stage import LOCK_FILE

CARD = "README.md"
MODEL_STAGES = {"train", "tiny-model", "tiny-math-model", "tiny-pairrm", "tiny-reward-model"}
ATTEMPTS, BACKOFF = 4, 2.0  # seconds before the second attempt; doubled each time


def push(directory: str | Path, repo_id: str, config: PushConfig = PushConfig()) -> str:
    """Publish the finished output `directory` to `repo_id` as `config` says; returns what happened."""
    from huggingface_hub import HfApi, get_token

    directory = Path(directory)
    manifest = read_manifest(directory)
    if get_token() is None:
        raise SppoError("cannot push to the hub: no token; set HF_TOKEN or run `hf auth login`")
    kind = "model" if manifest["stage"] in MODEL_STAGES else "dataset"
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="sppo-push-") as staging:
        folder = Path(staging) / "upload"
        if kind == "model":
            evaluations = [read_manifest(path) for path in config.eval]
            license = license_of(config.base_model or manifest["inputs"].get("model"))
            card = model_card(manifest, repo_id.split("/")[-1], config.base_model, config.dataset, evaluations,
                              license)  # fmt: skip
            _stage_model(directory, folder, card, config.include_adapter)
        else:
            _stage_dataset(directory, folder, dataset_card(manifest, repo_id.split("/")[-1]))
        return _with_retries(repo_id, lambda: _upload(api, folder, repo_id, kind, config.public, config.revision))


def _stage_model(directory: Path, folder: Path, card: str, include_adapter: bool) -> None:
    """The model's files, linked rather than copied where the file system allows, and its card."""
    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copy2(source, target)

    ignored = shutil.ignore_patterns(CARD, LOG_NAME, LOCK_FILE, *([] if include_adapter else ["adapter"]))
    shutil.copytree(directory, folder, copy_function=link, ignore=ignored)
    (folder / CARD).write_text(card)


def _stage_dataset(directory: Path, folder: Path, card: str) -> None:
    data, _ = load_stage(directory)
    (folder / "data").mkdir(parents=True)
    data.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    shutil.copy2(directory / MANIFEST, folder / MANIFEST)
    (folder / CARD).write_text(card)


def _upload(api, folder: Path, repo_id: str, kind: str, public: bool, revision: str | None) -> str:
    api.create_repo(repo_id, repo_type=kind, private=not public, exist_ok=True)  # an existing one keeps its own
    if api.repo_info(repo_id, repo_type=kind).private == public:
        raise SppoError(f"{repo_id} exists and is public: push to it with --public, or make it private on the hub"
                        if not public else f"{repo_id} exists and is private, and --public does not change that: "
                        "make it public on the hub, or push without --public")  # fmt: skip
    if revision:
        api.create_branch(repo_id, repo_type=kind, branch=revision, exist_ok=True)
    if all(_published(api, repo_id, kind, revision, name) == (folder / name).read_text() for name in (MANIFEST, CARD)):
        return f"already published at {repo_id}" + (f"@{revision}" if revision else "")
    manifest = json.loads((folder / MANIFEST).read_text())
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=kind, revision=revision,
                               commit_message=f"sppo {manifest['stage']}: {manifest.get('created', '')}")  # fmt: skip
    return f"pushed to {commit.commit_url}"


def _published(api, repo_id: str, kind: str, revision: str | None, name: str) -> str | None:
    """A file the repository holds, if any: the same manifest and card mean this very output is published."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(api.hf_hub_download(repo_id, name, repo_type=kind, revision=revision)).read_text()
    except EntryNotFoundError:
        return None


def _with_retries(repo_id: str, upload) -> str:
    """Run `upload`, again after transient failures (server errors, the network); user errors are one line."""
    from httpx2 import TransportError  # huggingface_hub's HTTP client: the network's failures
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(ATTEMPTS):
        try:
            return upload()
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status == 401:
                raise SppoError("the hub refused the token (401): set HF_TOKEN or run `hf auth login`") from None
            if status == 403:
                raise SppoError(f"the token may not write to {repo_id} (403)") from None
            if status is None or status < 500 or attempt == ATTEMPTS - 1:
                raise SppoError(f"cannot push {repo_id}: {first_line(error)}; run the same command again") from None
            failure = f"the hub answered {status}"
        except (TransportError, OSError) as error:
            failure = first_line(error)
        if attempt == ATTEMPTS - 1:
            from huggingface_hub import constants

            raise SppoError(f"cannot reach the hub at {constants.ENDPOINT} ({failure}); nothing was changed locally, "
                            "run the same command again")  # fmt: skip
        logger.warning("pushing %s failed (%s); trying again", repo_id, failure)
        time.sleep(BACKOFF * 2**attempt)
    raise AssertionError("unreachable")
