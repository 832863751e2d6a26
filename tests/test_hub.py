"""Publishing to the hub, through the real huggingface_hub client, against a stand-in hub on the loopback address."""

import json
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest
import yaml
from conftest import run_cli, write_jsonl
from hub_server import READ_TOKEN, WRITE_TOKEN, HubServer

from sppo_cli import hub as publishing
from sppo_cli.config import EvalConfig, GenerateConfig, PushConfig, RankConfig, TrainConfig
from sppo_cli.errors import SppoError
from sppo_cli.eval import evaluate
from sppo_cli.generate import generate
from sppo_cli.identity import content_digest
from sppo_cli.rank import rank
from sppo_cli.train import load_inputs, train

SAMPLING = dict(max_new_tokens=6, backend="transformers", batch_size=4, seed=5)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in hub, as the endpoint huggingface_hub and datasets talk to, with a write token."""
    with HubServer() as server:
        for module, name in [(huggingface_hub.constants, "ENDPOINT"), (datasets.config, "HF_ENDPOINT")]:
            monkeypatch.setattr(module, name, server.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
        monkeypatch.setattr(publishing, "BACKOFF", 0.0)
        # huggingface_hub retries some requests itself, waiting seconds in between: not in the tests
        monkeypatch.setattr(huggingface_hub.utils._http, "time", SimpleNamespace(sleep=lambda seconds: None))
        yield server


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model):
    """A finished iteration: generations, rankings, a model and its evaluation."""
    root = tmp_path_factory.mktemp("iteration")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)}
                                                   for a in range(4)])  # fmt: skip
    generate(str(tiny_model), str(prompts), root / "generations", GenerateConfig(num_samples=3, **SAMPLING))
    rank(str(root / "generations"), root / "rankings", RankConfig(ranker="python:plugin_rankers:by_length"))
    train(str(tiny_model), str(root / "rankings"), root / "model",
          TrainConfig(per_device_train_batch_size=2, report_to="none", gradient_checkpointing=False))  # fmt: skip
    evaluate(str(root / "model"), str(tiny_model), str(prompts), root / "eval",
             EvalConfig(ranker="rule:math", **SAMPLING))  # fmt: skip
    return root


def card_metadata(content: bytes) -> dict:
    return yaml.safe_load(content.decode().split("---")[1])


def test_datasets_go_as_parquet_with_a_card_and_load_back_into_sppo_train(hub, outputs, tiny_model, tmp_path):
    before = content_digest(outputs / "rankings")
    outcome = publishing.push(outputs / "rankings", "org/tiny-rankings-iter1")
    assert outcome.startswith("pushed to ")
    files = hub.files("dataset", "org/tiny-rankings-iter1")
    assert sorted(files) == ["README.md", "data/train-00000-of-00001.parquet", "manifest.json"]
    assert hub.repos[("dataset", "org/tiny-rankings-iter1")].private  # private unless asked
    card = files["README.md"].decode()
    assert card_metadata(files["README.md"])["tags"] == ["sppo", "sppo-rank"]
    assert "python:plugin_rankers:by_length" in card and "| pairs |" in card and "arXiv 2405.00675" in card
    assert content_digest(outputs / "rankings") == before  # nothing local changed
    published = datasets.load_dataset("org/tiny-rankings-iter1", split="train")
    published_format = {"chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose"}
    assert published_format <= set(published.column_names)
    manifest, _ = train(str(tiny_model), "org/tiny-rankings-iter1", tmp_path / "model",
                        TrainConfig(per_device_train_batch_size=2, report_to="none", gradient_checkpointing=False))
    assert manifest["identity"]["inputs"]["data"].startswith("hub:org/tiny-rankings-iter1@")  # its commit
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(SppoError, match="sampled with the model's own chat template: train without --chat-template"):
        load_inputs(str(tiny_model), "org/tiny-rankings-iter1", str(template))  # the manifest travels with them
    publishing.push(tmp_path / "model", "org/m")  # its card names the rankings it was trained on
    assert card_metadata(hub.files("model", "org/m")["README.md"])["datasets"] == ["org/tiny-rankings-iter1"]


def test_a_model_goes_with_a_card_that_chains_the_lineage_and_loads_back(hub, outputs, tmp_path):
    config = PushConfig(public=True, base_model="org/tiny-base", dataset=["org/tiny-rankings-iter1"],
                        eval=[str(outputs / "eval")])  # fmt: skip
    outcome = publishing.push(outputs / "model", "org/tiny-SPPO-Iter1", config)
    assert outcome.startswith("pushed to ") and not hub.repos[("model", "org/tiny-SPPO-Iter1")].private
    files = hub.files("model", "org/tiny-SPPO-Iter1")
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json", "README.md"} <= set(files)
    metadata = card_metadata(files["README.md"])
    assert metadata["base_model"] == "org/tiny-base" and metadata["datasets"] == ["org/tiny-rankings-iter1"]
    assert metadata["tags"] == ["sppo", "trl"] and metadata["library_name"] == "transformers"
    results = metadata["model-index"][0]["results"]
    assert {m["type"] for r in results for m in r["metrics"]} >= {"win_rate", "accuracy"}
    assert {r["dataset"]["type"] for r in results} == {"local"}  # local prompts: no path goes out
    assert {r["dataset"]["name"] for r in results} == {"held-out prompts"}
    assert "sppo.log" not in files  # the log stays local
    card = files["README.md"].decode()
    assert "@article{wu2024self" in card and "final" in card and "model.partial" not in card and "DPO:" not in card
    sampled, _ = generate("org/tiny-SPPO-Iter1", str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?"}])),
                          tmp_path / "gens", GenerateConfig(num_samples=2, **SAMPLING))  # the model, by hub id
    assert sampled["identity"]["inputs"]["model"].startswith("hub:org/tiny-SPPO-Iter1@")


def test_the_local_model_card_is_sppo_s(outputs):
    card = (outputs / "model" / "README.md").read_text()
    assert "Self-Play Preference Optimization" in card and "model.partial" not in card
    assert "tags:\n- sppo\n- trl" in card


def test_an_identical_output_is_not_pushed_twice_and_a_branch_per_iteration_works(hub, outputs):
    publishing.push(outputs / "generations", "org/tiny-generations-iter1")
    commits = hub.repos[("dataset", "org/tiny-generations-iter1")].commits
    assert publishing.push(outputs / "generations", "org/tiny-generations-iter1").startswith("already published")
    assert hub.repos[("dataset", "org/tiny-generations-iter1")].commits == commits
    publishing.push(outputs / "model", "org/tiny-SPPO-Iter1")
    assert "model-index" not in card_metadata(hub.files("model", "org/tiny-SPPO-Iter1")["README.md"])
    outcome = publishing.push(outputs / "model", "org/tiny-SPPO-Iter1", PushConfig(eval=[str(outputs / "eval")]))
    assert outcome.startswith("pushed to ")  # the same model with a new card: the card goes up
    assert "model-index" in card_metadata(hub.files("model", "org/tiny-SPPO-Iter1")["README.md"])
    publishing.push(outputs / "model", "org/tiny-SPPO", PushConfig(revision="iter1"))
    assert "model.safetensors" in hub.files("model", "org/tiny-SPPO", "iter1")


@pytest.mark.parametrize(
    "token, fail, message",
    [
        (None, [], "cannot push to the hub: no token; set HF_TOKEN or run `hf auth login`"),
        ("hf_wrong", [], "the hub refused the token (401)"),
        (READ_TOKEN, [], "the token may not write to org/x (403)"),
        (WRITE_TOKEN, [503] * 100, "cannot push org/x"),  # retried by huggingface_hub, then by sppo, in vain
    ],
)
def test_a_failed_push_is_one_line_and_leaves_the_output_as_it_was(hub, outputs, monkeypatch, token, fail, message):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    hub.fail = list(fail)
    before = content_digest(outputs / "rankings")
    with pytest.raises(SppoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        publishing.push(outputs / "rankings", "org/x")
    assert content_digest(outputs / "rankings") == before


def test_an_existing_repository_keeps_its_visibility_and_a_push_of_the_other_is_refused(hub, outputs):
    publishing.push(outputs / "generations", "org/open", PushConfig(public=True))
    commits = hub.repos[("dataset", "org/open")].commits
    with pytest.raises(SppoError, match="org/open exists and is public: push to it with --public"):
        publishing.push(outputs / "rankings", "org/open")  # private by default: never into a public repository
    assert hub.repos[("dataset", "org/open")].commits == commits
    publishing.push(outputs / "generations", "org/closed")
    with pytest.raises(SppoError, match="org/closed exists and is private, and --public does not change that"):
        publishing.push(outputs / "generations", "org/closed", PushConfig(public=True))
    assert hub.repos[("dataset", "org/closed")].private


def test_transient_failures_are_retried(hub, outputs):
    hub.fail = [500, 502] * 4  # more than huggingface_hub's own retries of a commit
    assert publishing.push(outputs / "eval", "org/tiny-eval").startswith("pushed to ")
    assert not hub.fail and "manifest.json" in hub.files("dataset", "org/tiny-eval")


def test_a_hub_out_of_reach_is_one_line(hub, outputs, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(SppoError, match="cannot reach the hub at http://127.0.0.1:9 .*nothing was changed locally"):
        publishing.push(outputs / "rankings", "org/x")


def test_the_commands_push_when_asked(capsys, hub, outputs, tmp_path):
    code, err = run_cli(capsys, "rank", "--generations", outputs / "generations", "--output", tmp_path / "r",
                        "--ranker", "python:plugin_rankers:by_length", "--push-to-hub", "org/r", "--public")
    assert code == 0, err
    assert "pushed to" in err and not hub.repos[("dataset", "org/r")].private
    code, err = run_cli(capsys, "push", outputs / "rankings", "--repo-id", "org/pushed")
    assert code == 0 and ("dataset", "org/pushed") in hub.repos
    code, err = run_cli(capsys, "push", outputs / "rankings")
    assert code == 2  # --repo-id is required: no organisation is ever assumed
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("push:\n  public: true\n")  # a recipe sets what the flags can
    code, err = run_cli(capsys, "push", outputs / "generations", "--repo-id", "org/open", "--config", recipe)
    assert code == 0 and not hub.repos[("dataset", "org/open")].private
    assert json.loads(hub.files("dataset", "org/pushed")["manifest.json"])["stage"] == "rank"


def test_published_outputs_are_inputs_by_hub_id(hub, outputs, tiny_model, tmp_path):
    publishing.push(outputs / "generations", "org/gens")
    publishing.push(outputs / "eval", "org/eval")
    manifest, _ = rank("org/gens", tmp_path / "ranks", RankConfig(ranker="python:plugin_rankers:by_length"))
    assert manifest["pairs"] > 0 and manifest["identity"]["inputs"]["generations"].startswith("hub:org/gens@")
    manifest, _ = evaluate(str(tiny_model), "org/eval", None, tmp_path / "e", EvalConfig(ranker="rule:math",
                                                                                     **SAMPLING))  # fmt: skip
    assert manifest["rows"] == 4 and manifest["identity"]["inputs"]["baseline"].startswith("hub:org/eval@")
