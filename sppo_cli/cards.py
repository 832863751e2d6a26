"""Model and dataset cards, written from the stages' manifests: what produced an output, with which settings, and
how it did."""

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from sppo_cli.models import is_hub_id

CITATION = """@article{wu2024self,
  title={Self-Play Preference Optimization for Language Model Alignment},
  author={Wu, Yue and Sun, Zhiqing and Yuan, Huizhuo and Ji, Kaixuan and Yang, Yiming and Gu, Quanquan},
  journal={arXiv preprint arXiv:2405.00675},
  year={2024}
}"""
TRAINING_SETTINGS = ("loss", "beta", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "num_processes", "optim", "lr_scheduler_type", "warmup_steps",
                     "max_length", "max_prompt_length", "lora_r", "seed")  # fmt: skip
SAMPLING_SETTINGS = ("num_samples", "temperature", "top_p", "max_new_tokens", "min_new_tokens", "stop",
                     "repetition_penalty", "presence_penalty", "seed", "system_prompt", "chat_template")  # fmt: skip
COUNTS = ("rows", "prompts", "samples", "skipped_too_long", "pairs", "tied_prompts", "comparisons", "steps",
          "dropped_prompt_too_long", "truncated_responses", "truncated_conversations", "correct_responses",
          "judged_responses")  # fmt: skip


def model_card(manifest: dict, name: str, base_model: str | None = None, datasets: list[str] = (),
               evals: list[dict] = (), license: str | None = None) -> str:  # fmt: skip
    """The card of a model `sppo train` made. `base_model` is the hub id it started from and `datasets` those of its
    training data (by default its manifest's inputs, where they were hub ids); `evals` are `sppo eval` manifests of
    this model, which become its model-index."""
    started_from, data_from = manifest["inputs"].get("model", ""), str(manifest["inputs"].get("data", ""))
    base_model = base_model or (started_from if is_hub_id(started_from) else None)
    datasets = list(datasets) or ([data_from] if is_hub_id(data_from) else [])
    data = ModelCardData(base_model=base_model, datasets=list(datasets) or None, tags=["sppo", "trl"],
                         license=license, library_name="transformers", model_name=name,
                         eval_results=[result for e in evals for result in _eval_results(e)] or None)  # fmt: skip
    parameters = manifest["parameters"]
    loss = parameters.get("loss", "sppo")
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{started_from}`"
    lines = [
        f"# {name}", "",
        f"Fine-tuned from {origin} "
        f"with Self-Play Preference Optimization ([SPPO, arXiv 2405.00675](https://arxiv.org/abs/2405.00675)), loss "
        f"`{loss}`, by sppo {manifest.get('sppo_version', '')} on trl's `DPOTrainer`.", "",
        "## Training", "",
        f"On the rankings {_named(datasets) or '`' + str(manifest['inputs'].get('data')) + '`'}: "
        f"{manifest.get('rows')} pairs, {manifest.get('steps')} optimizer steps; mean training loss "
        f"{_number(manifest.get('train_loss'))}, final {_number(manifest.get('final_loss'))}.", "",
        _table({name: parameters.get(name) for name in TRAINING_SETTINGS if name in parameters}),
    ]  # fmt: skip
    for evaluation in evals:
        lines += ["", "## Evaluation", "", _evaluation(evaluation)]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + "\n".join(lines)).content


def dataset_card(manifest: dict, name: str) -> str:
    """The card of a generate, rank or eval output: the stage, its inputs and their revisions, its settings, counts."""
    stage, parameters = manifest["stage"], manifest["parameters"]
    files = [{"split": "train", "path": "data/*.parquet"}]
    data = DatasetCardData(tags=["sppo", f"sppo-{stage}"], configs=[{"config_name": "default", "data_files": files}])
    what = {
        "generate": "responses sampled from a policy",
        "rank": "rankings in the published SPPO training format "
        "(chosen, rejected, chosen_probs, chosen_probs_win, chosen_probs_lose)",
        "eval": "an evaluation: responses of a model and a baseline, and the judge's verdicts",
    }.get(stage, stage)
    inputs = {f"{key}": f"`{source}` ({manifest.get('identity', {}).get('inputs', {}).get(key, '')})"
              for key, source in manifest["inputs"].items()}  # fmt: skip
    settings = {key: parameters[key] for key in (*SAMPLING_SETTINGS, "ranker", "probability_mode", "answer_column")
                if key in parameters}  # fmt: skip
    lines = [
        f"# {name}", "",
        f"Made by `sppo {stage}` (sppo {manifest.get('sppo_version', '')}, for Self-Play Preference Optimization, "
        f"[arXiv 2405.00675](https://arxiv.org/abs/2405.00675)): {what}.", "",
        "## Inputs (and the content or hub revision they were)", "", _table(inputs), "",
        "## Settings", "", _table(settings), "",
        "## Counts", "", _table({key: manifest[key] for key in COUNTS if key in manifest}),
    ]  # fmt: skip
    if "metrics" in manifest:
        lines += ["", "## Metrics", "", _table(manifest["metrics"])]
    lines += ["", "The full record is `manifest.json`.", "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return DatasetCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + "\n".join(lines)).content


def _eval_results(manifest: dict) -> list[EvalResult]:
    """The model-index entries of an evaluation: its prompts by hub id, or as local held-out prompts (never a path)."""
    prompts = str(manifest["inputs"].get("prompts") or "")
    dataset = prompts if is_hub_id(prompts) else None
    metrics = manifest.get("metrics", {})
    names = {"win_rate": "win rate against the baseline", "lc_win_rate": "length-controlled win rate",
             "accuracy": "accuracy (rule:math)"}  # fmt: skip
    return [EvalResult(task_type="text-generation", dataset_type=dataset or "local", dataset_name=dataset or
                       "held-out prompts", metric_type=key, metric_name=label, metric_value=round(metrics[key], 4))
            for key, label in names.items() if metrics.get(key) is not None]  # fmt: skip


def _evaluation(manifest: dict) -> str:
    metrics = manifest.get("metrics", {})
    rows = {"baseline": f"`{manifest['inputs'].get('baseline')}`", "prompts judged": manifest.get("rows"),
            "judge": f"`{manifest['parameters'].get('ranker')}`"}  # fmt: skip
    for key in ("win_rate", "lc_win_rate", "accuracy", "baseline_accuracy"):
        if metrics.get(key) is not None:
            interval = metrics.get(f"{key}_ci")
            rows[key] = f"{metrics[key]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
    return _table(rows)


def _table(rows: dict) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows.items())])


def _named(datasets: list[str]) -> str:
    return ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets)


def _number(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def license_of(model: str | None) -> str | None:
    """The license of a model, from its card (a local one, or the hub's)."""
    if not model:
        return None
    try:
        card = ModelCard.load(str(Path(model) / "README.md")) if Path(model).is_dir() else ModelCard.load(model)
        return card.data.license
    except Exception:  # no card, or no hub to ask: the card then names no license
        return None
