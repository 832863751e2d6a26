"""Stage 3: fit the policy to the win rates with the SPPO squared loss (SPPO_REFERENCE.md section 2).

With beta = 1/eta and Delta = log pi_theta(y|x) - log pi_ref(y|x), summed over the response tokens:
  sppo:        1/2 [ (Delta_w - eta (P_win - 1/2))^2 + (Delta_l - eta (P_lose - 1/2))^2 ]
  sppo_single: 1/2 [ (Delta_w - eta (P - 1/2))^2     + (Delta_l + eta (P - 1/2))^2 ]
  sppo_hard:         (Delta_w - eta/2)^2             + (Delta_l + eta/2)^2
where P_win, P_lose are the winner's and loser's estimated win rates and P = P(winner beats loser).
`SPPOTrainer` is trl's DPOTrainer with this loss: tokenisation, reference handling, precomputed reference
log-probs, PEFT and DeepSpeed all come from DPOTrainer.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from sppo_cli.data import (
    CHOSEN,
    CHOSEN_PROBS,
    CHOSEN_PROBS_LOSE,
    CHOSEN_PROBS_WIN,
    MANIFEST,
    REJECTED,
    WIN_RATE_COLUMNS,
    finish_output,
    load_stage,
    partial_dir,
    read_dataset,
    validate_rankings,
    write_manifest,
)
from sppo_cli.errors import SppoError
from sppo_cli.models import load_tokenizer, resolve_model

SPPO_LOSSES = ("sppo", "sppo_single", "sppo_hard")
RUN_FILE = "run.json"  # the settings of an unfinished run, so that --resume continues only the same run
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *WIN_RATE_COLUMNS}


def sppo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    win_rates: dict[str, torch.Tensor],
    beta: float,
    loss_type: str = "sppo",
) -> torch.Tensor:
    """Per-row SPPO loss; `win_rates` holds the `chosen_probs*` columns of the batch."""
    eta = 1.0 / beta
    if loss_type == "sppo":
        chosen_target = eta * (win_rates[CHOSEN_PROBS_WIN] - 0.5)
        rejected_target = eta * (win_rates[CHOSEN_PROBS_LOSE] - 0.5)
        return 0.5 * ((chosen_logratios - chosen_target) ** 2 + (rejected_logratios - rejected_target) ** 2)
    if loss_type == "sppo_single":
        target = eta * (win_rates[CHOSEN_PROBS] - 0.5)
        return 0.5 * ((chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2)
    if loss_type == "sppo_hard":
        return (chosen_logratios - eta / 2) ** 2 + (rejected_logratios + eta / 2) ** 2
    raise SppoError(f"unknown loss {loss_type!r} (choose from {', '.join(SPPO_LOSSES)})")


def check_loss(loss_type: list[str], beta: float) -> None:
    if len(loss_type) != 1 or loss_type[0] not in SPPO_LOSSES:
        raise SppoError(f"--loss must be one of {', '.join(SPPO_LOSSES)}, got {', '.join(loss_type)}")
    if beta <= 0:
        raise SppoError(f"--beta must be positive, got {beta}")


@dataclass
class SPPOConfig(DPOConfig):
    """DPOConfig with the SPPO paper's defaults (8 GPUs x 8 rows, RMSprop, lr 5e-7, 1 epoch, beta 1e-3)."""

    loss_type: list[str] = field(default_factory=lambda: ["sppo"], metadata={"help": f"One of {SPPO_LOSSES}."})
    beta: float = 0.001
    learning_rate: float = 5e-7
    optim: str = "rmsprop"
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    logging_steps: float = 1
    report_to: str | list[str] = "tensorboard"
    save_strategy: str = "steps"
    save_steps: float = 200
    save_total_limit: int | None = 1
    seed: int = 42
    bf16: bool | None = field(default=None, metadata={"help": "Defaults to True where the GPU supports bf16."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        self.dataloader_pin_memory = self.dataloader_pin_memory and torch.cuda.is_available()
        if self.deepspeed:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Several CPU processes: accelerate would count one process without CUDA; a gloo state made first is used.
            PartialState(backend="gloo")
            self.accelerator_config = {"use_configured_state": True}
        super().__post_init__()
        check_loss(self.loss_type, self.beta)


class _WithWinRates:
    """Wraps DPOTrainer's preference collator so the win-rate columns reach the loss as float tensors."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        for column in WIN_RATE_COLUMNS:
            batch[column] = torch.tensor([example[column] for example in examples], dtype=torch.float32)
        return batch


class SPPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is SPPO's squared regression of the log-ratios onto the win rates."""

    _tag_names = ["trl", "sppo"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = _WithWinRates(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *WIN_RATE_COLUMNS]

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in WIN_RATE_COLUMNS})

    def _compute_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_inputs, labels=labels, use_cache=False, fused_lm_head=True)
        # log_probs are 0 where the label is masked, so the sum runs over the response tokens only
        logps = outputs.log_probs[:, -(completion_mask.size(1) - 1) :].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps

        win_rates = {column: inputs[column] for column in WIN_RATE_COLUMNS}
        loss = sppo_loss(chosen_logratios, rejected_logratios, win_rates, self.beta, self.loss_types[0]).mean()

        self._log_metrics(mode, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios):
        def mean(tensor: torch.Tensor) -> float:
            return self.accelerator.gather_for_metrics(tensor.detach()).float().mean().item()

        chosen_rewards, rejected_rewards = self.beta * chosen_logratios, self.beta * rejected_logratios
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(mean(chosen_rewards))
        metrics["rewards/rejected"].append(mean(rejected_rewards))
        metrics["rewards/margins"].append(mean(chosen_rewards - rejected_rewards))
        metrics["rewards/accuracies"].append(mean((chosen_rewards > rejected_rewards).float()))
        metrics["logratios/chosen"].append(mean(chosen_logratios))
        metrics["logratios/rejected"].append(mean(rejected_logratios))
        metrics["logps/chosen"].append(mean(chosen_logps))
        metrics["logps/rejected"].append(mean(rejected_logps))


def load_rankings(source: str) -> Dataset:
    """A finished `sppo rank` output, or any dataset in the published SPPO training format."""
    path = Path(source)
    data = load_stage(path, "rank")[0] if path.is_dir() and (path / MANIFEST).exists() else read_dataset(source)
    return validate_rankings(data, source)


def to_trainer_format(rankings: Dataset) -> Dataset:
    """Split the shared prompt from the two conversations, as DPOTrainer expects, and keep the win rates."""

    def split(row: dict) -> dict:
        return {"prompt": row[CHOSEN][:-1], CHOSEN: row[CHOSEN][-1:], REJECTED: row[REJECTED][-1:]}

    keep = {CHOSEN, REJECTED, *WIN_RATE_COLUMNS}
    # In memory: a map over a dataset loaded from disk would write cache files into the finished rankings directory.
    return rankings.map(split, remove_columns=[c for c in rankings.column_names if c not in keep], keep_in_memory=True)


def load_inputs(model: str, data: str) -> tuple[PreTrainedTokenizerBase, Dataset]:
    """The tokenizer and the trainer-ready rankings; the checks a launcher runs before it starts the processes."""
    tokenizer = load_tokenizer(resolve_model(model))
    return tokenizer, to_trainer_format(load_rankings(data))


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint that was fully written (trainer_state.json is saved last), if any."""
    complete = [c for c in directory.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
    return str(max(complete, key=lambda c: int(c.name.split("-")[-1]))) if complete else None


def train(
    model: str,
    data: str,
    output_dir: str | Path,
    config: SPPOConfig,
    peft_config: LoraConfig | None = None,
    load_in_4bit: bool = False,
    resume: bool = False,
) -> dict | None:
    """Train `model` on the rankings in `data`, with `model` itself as the frozen reference.

    Every process of a distributed run calls this; the main process writes the manifest, renames the output into
    place and returns the manifest (the others return None). With `resume`, training continues from the last
    checkpoint of an interrupted run of the same output, if there is one.
    """
    tokenizer, dataset = load_inputs(model, data)
    state = PartialState()
    inputs = {"model": model, "data": str(data)}
    parameters = {
        "loss": config.loss_type[0],
        "beta": config.beta,
        "learning_rate": config.learning_rate,
        "epochs": config.num_train_epochs,
        "per_device_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": state.num_processes,
        "max_length": config.max_length,
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "lora": _describe_lora(peft_config),
        "load_in_4bit": load_in_4bit,
        "deepspeed": config.deepspeed if isinstance(config.deepspeed, str) else bool(config.deepspeed),
        "seed": config.seed,
    }
    partial = partial_dir(output_dir)
    checkpoint = last_complete_checkpoint(partial)
    if checkpoint and not resume:
        raise SppoError(
            f"{partial} holds checkpoints of an interrupted run: pass --resume to continue from them, "
            "or delete it to start over"
        )
    if checkpoint:
        _check_same_run(partial / RUN_FILE, {**inputs, **parameters})
    state.wait_for_everyone()  # every process has looked before the main one clears the directory
    if state.is_main_process and checkpoint is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / RUN_FILE).write_text(json.dumps({**inputs, **parameters}, indent=1) + "\n")
    state.wait_for_everyone()

    config.output_dir = str(partial)  # checkpoints and tensorboard logs (partial/runs) land here
    trainer = SPPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=_four_bit_config() if load_in_4bit else None,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(partial / "adapter" if peft_config else partial))  # collective under ZeRO-3
    if not state.is_main_process:
        return None
    if peft_config:
        _merge_adapter(model, partial / "adapter", partial)
        tokenizer.save_pretrained(partial)
    for saved in partial.glob("checkpoint-*"):
        shutil.rmtree(saved)
    (partial / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    (partial / RUN_FILE).unlink()
    manifest = write_manifest(
        partial,
        stage="train",
        inputs=inputs,
        parameters=parameters,
        rows=len(dataset),
        steps=result.global_step,
        train_loss=result.training_loss,
        resumed_from=Path(checkpoint).name if checkpoint else None,
    )
    finish_output(partial, output_dir)
    return manifest


def _check_same_run(run_file: Path, settings: dict) -> None:
    """A checkpoint is only resumed by the run that wrote it: same model, data and training settings."""
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError):
        message = f"{run_file.parent} has checkpoints but no readable {RUN_FILE}: delete it to start over"
        raise SppoError(message) from None
    changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
    if changed:
        raise SppoError(
            f"--resume: the checkpoints in {run_file.parent} come from a run with other settings "
            f"({', '.join(changed)}); use the same arguments, or delete it to start over"
        )


def lora_config(rank: int, alpha: int, target_modules: str) -> LoraConfig:
    modules = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")


def _describe_lora(peft_config: LoraConfig | None) -> dict | None:
    if peft_config is None:
        return None
    modules = peft_config.target_modules
    modules = modules if isinstance(modules, str) else sorted(modules)
    return {"r": peft_config.r, "alpha": peft_config.lora_alpha, "target_modules": modules}


def _four_bit_config() -> BitsAndBytesConfig:
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise SppoError("--load-in-4bit needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes)")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def _merge_adapter(base_model: str, adapter: Path, output: Path) -> None:
    """Fold the trained adapter into a full-precision copy of the base, so the next iteration's generate loads it."""
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(output)


def launch(num_processes: int) -> int:
    """Run this same command once per process under torchrun (on one node); returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}"]
    return subprocess.call([*command, "-m", "sppo_cli.cli", *sys.argv[1:]])


def is_launched() -> bool:
    return "LOCAL_RANK" in os.environ
