"""`SPPOTrainer`: trl's DPOTrainer with the SPPO loss. The only module that touches trl's internals.

With beta = 1/eta and Delta = log pi_theta(y|x) - log pi_ref(y|x), summed over the response tokens (arXiv 2405.00675,
and the authors' published trainer):
  sppo:        1/2 [ (Delta_w - eta (P_win - 1/2))^2 + (Delta_l - eta (P_lose - 1/2))^2 ]
  sppo_single: 1/2 [ (Delta_w - eta (P - 1/2))^2     + (Delta_l + eta (P - 1/2))^2 ]
  sppo_hard:         (Delta_w - eta/2)^2             + (Delta_l + eta/2)^2
where P_win, P_lose are the winner's and loser's estimated win rates and P = P(winner beats loser).

What differs from DPOTrainer, and nothing else: the loss (`_compute_loss`, which keeps trl's router load-balancing
loss for mixture-of-experts policies; with loss_type `sigmoid` or `ipo` it is trl's DPO or IPO loss, the baselines),
the win-rate columns that must reach it, and the tokenisation: a row that carries the token ids that were sampled is
trained on exactly those.
"""

import os
from dataclasses import dataclass, field

import torch
import trl
from accelerate import PartialState
from datasets import Dataset
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from sppo_cli.config import BASELINE_LOSSES, SPPO_LOSSES, TrainConfig
from sppo_cli.data import (
    CHOSEN,
    CHOSEN_PROBS,
    CHOSEN_PROBS_LOSE,
    CHOSEN_PROBS_WIN,
    CHOSEN_TOKEN_IDS,
    PROMPT_TEXT,
    PROMPT_TOKEN_IDS,
    REJECTED,
    REJECTED_TOKEN_IDS,
    WIN_RATE_COLUMNS,
)
from sppo_cli.errors import SppoError
from sppo_cli.models import bf16_supported, on_gpu

SUPPORTED_TRL = SpecifierSet(">=1.16,<1.17")


def check_trl_version(version: str) -> None:
    if Version(version) not in SUPPORTED_TRL:
        raise SppoError(
            f"sppo needs trl {SUPPORTED_TRL} (found {version}): SPPOTrainer overrides DPOTrainer internals that "
            "change between trl releases; `pip install 'trl==1.16.0'`"
        )


check_trl_version(trl.__version__)

PAPER = TrainConfig()  # the paper's settings, the defaults below
LOSS_TYPES = SPPO_LOSSES + tuple(BASELINE_LOSSES.values())  # trl's loss_type names this trainer takes
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *WIN_RATE_COLUMNS}
_RESPONSE_PLACEHOLDER = "SPPO-RESPONSE-PLACEHOLDER-3f9c1e"
SAMPLED_TOKEN_COLUMNS = (PROMPT_TOKEN_IDS, CHOSEN_TOKEN_IDS, REJECTED_TOKEN_IDS)


def sppo_targets(win_rates: dict[str, torch.Tensor], beta: float, loss_type: str = "sppo") -> tuple[torch.Tensor, ...]:
    """What the SPPO loss regresses the chosen and the rejected log-ratios onto; `win_rates` holds the `chosen_probs*`
    columns of the batch."""
    eta = 1.0 / beta
    if loss_type == "sppo":
        return eta * (win_rates[CHOSEN_PROBS_WIN] - 0.5), eta * (win_rates[CHOSEN_PROBS_LOSE] - 0.5)
    if loss_type == "sppo_single":
        target = eta * (win_rates[CHOSEN_PROBS] - 0.5)
        return target, -target
    if loss_type == "sppo_hard":
        half = torch.full_like(win_rates[CHOSEN_PROBS], eta / 2)
        return half, -half
    raise SppoError(f"unknown loss {loss_type!r} (choose from {', '.join(SPPO_LOSSES)})")


def sppo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    win_rates: dict[str, torch.Tensor],
    beta: float,
    loss_type: str = "sppo",
) -> torch.Tensor:
    """Per-row SPPO loss; `win_rates` holds the `chosen_probs*` columns of the batch."""
    chosen_target, rejected_target = sppo_targets(win_rates, beta, loss_type)
    scale = 1.0 if loss_type == "sppo_hard" else 0.5  # as the published trainer writes each
    return scale * ((chosen_logratios - chosen_target) ** 2 + (rejected_logratios - rejected_target) ** 2)


@dataclass
class SPPOConfig(DPOConfig):
    """DPOConfig with the SPPO paper's defaults (config.TrainConfig) and `max_prompt_length`."""

    loss_type: list[str] = field(default_factory=lambda: [PAPER.loss],
                                 metadata={"help": f"One of {LOSS_TYPES}."})
    beta: float = PAPER.beta
    learning_rate: float = PAPER.learning_rate
    optim: str = PAPER.optim
    lr_scheduler_type: str = PAPER.lr_scheduler_type
    warmup_steps: float = PAPER.warmup_steps
    num_train_epochs: float = PAPER.num_train_epochs
    per_device_train_batch_size: int = PAPER.per_device_train_batch_size
    logging_steps: float = PAPER.logging_steps
    report_to: str | list[str] = PAPER.report_to
    save_strategy: str = "steps"
    save_steps: float = PAPER.save_steps
    save_total_limit: int | None = PAPER.save_total_limit
    seed: int = PAPER.seed
    max_prompt_length: int | None = field(
        default=PAPER.max_prompt_length,
        metadata={"help": "Prompt tokens kept (from the end) when prompt + response is longer than max_length."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "Defaults to True where the GPU supports bf16."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bf16_supported()
        self.dataloader_pin_memory = self.dataloader_pin_memory and on_gpu()
        if self.deepspeed:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not on_gpu():
            # Several CPU processes: accelerate would count one process without CUDA; a gloo state made first is used
            # (a DeepSpeed one for DeepSpeed, else plain data parallelism over CPU processes).
            PartialState(backend="gloo", cpu=not self.deepspeed)
            self.accelerator_config = {"use_configured_state": True}
        super().__post_init__()
        if len(self.loss_type) != 1 or self.loss_type[0] not in LOSS_TYPES:
            raise SppoError(f"loss must be one of {', '.join(LOSS_TYPES)}, got {', '.join(self.loss_type)}")
        if self.beta <= 0:
            raise SppoError(f"beta must be positive, got {self.beta}")


def tokenize_row(tokenizer: PreTrainedTokenizerBase, max_length: int | None, max_prompt_length: int | None,
                 row: dict) -> dict:  # fmt: skip
    """trl's token columns for one ranking row.

    A row with the token ids that were sampled (what `sppo rank` passes on from `sppo generate`) is trained on exactly
    those: the prompt's, and each response's up to its end-of-sequence token, or up to its stop string's tokens, or
    without either where --max-new-tokens cut it off. Otherwise (rankings in the published format) the text is
    tokenized: the `prompt_text` the responses were sampled from when the row has it, else the prompt turns rendered
    by the template, and each response ends the way the template closes an assistant turn.
    """
    if row.get(CHOSEN_TOKEN_IDS) is not None:
        prompt_ids, chosen_ids, rejected_ids = row[PROMPT_TOKEN_IDS], row[CHOSEN_TOKEN_IDS], row[REJECTED_TOKEN_IDS]
    else:
        messages = row[CHOSEN][:-1]
        prompt_text = row.get(PROMPT_TEXT) or tokenizer.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)  # fmt: skip
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        end_of_turn = _end_of_turn(tokenizer, messages)
        chosen_ids, rejected_ids = (
            tokenizer(row[column][-1]["content"] + end_of_turn, add_special_tokens=False)["input_ids"]
            for column in (CHOSEN, REJECTED)
        )
    longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    if max_prompt_length is not None and max_length is not None and longest > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end of the prompt, next to the response
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """What the chat template writes after an assistant message's content (e.g. `<|eot_id|>`)."""
    rendered = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": _RESPONSE_PLACEHOLDER}],
                                             tokenize=False)  # fmt: skip
    if _RESPONSE_PLACEHOLDER not in rendered:
        raise SppoError(f"the chat template of {tokenizer.name_or_path} does not write an assistant message as it is; "
                        "sppo cannot tell where a response ends")  # fmt: skip
    return rendered.split(_RESPONSE_PLACEHOLDER, 1)[1]


class _WithWinRates:
    """Wraps DPOTrainer's collator so the win-rate columns reach the loss as float tensors."""

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

    def _prepare_dataset(self, dataset: Dataset, processing_class, args: SPPOConfig, dataset_name: str) -> Dataset:
        def tokenize(row: dict) -> dict:
            return tokenize_row(processing_class, args.max_length, args.max_prompt_length, row)

        text_columns = [c for c in (PROMPT_TEXT, CHOSEN, REJECTED, *SAMPLED_TOKEN_COLUMNS)
                        if c in dataset.column_names]  # fmt: skip
        dataset = dataset.map(tokenize, remove_columns=text_columns, keep_in_memory=True)
        if args.max_length is None:
            return dataset
        # As trl does: a prompt that fills max_length alone leaves no response token to learn from.
        return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length, keep_in_memory=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *WIN_RATE_COLUMNS]

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in WIN_RATE_COLUMNS})

    def _compute_loss(self, model, inputs, return_outputs=False):
        if self.loss_types[0] not in SPPO_LOSSES:  # a baseline: trl's own DPO or IPO loss, which takes no win rates
            return super()._compute_loss(model, {k: v for k, v in inputs.items() if k not in WIN_RATE_COLUMNS},
                                         return_outputs)  # fmt: skip
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        if self.aux_loss_enabled:  # mixture of experts: the model returns its router load-balancing loss
            model_inputs["output_router_logits"] = True
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
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        targets = sppo_targets(win_rates, self.beta, self.loss_types[0])
        self._log_metrics(mode, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios, targets)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios, targets):
        """trl's reward metrics, and what shows progress at the paper's beta, where the targets are hundreds of nats
        and the loss barely moves: the log-ratios against their targets, the share of log-ratios that have moved in
        their target's direction, and the drift from the reference (the mean log-ratio of both responses)."""

        def mean(tensor: torch.Tensor) -> float:
            return self.accelerator.gather_for_metrics(tensor.detach()).float().mean().item()

        # per row (gather_for_metrics keeps as many values as the last batch has rows), over the targets that are not
        # 0 (a win rate of exactly 1/2 has no direction)
        toward = (chosen_logratios * targets[0] > 0).float() + (rejected_logratios * targets[1] > 0).float()
        toward_target = toward / ((targets[0] != 0).float() + (targets[1] != 0).float()).clamp(min=1)
        chosen_rewards, rejected_rewards = self.beta * chosen_logratios, self.beta * rejected_logratios
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(mean(chosen_rewards))
        metrics["rewards/rejected"].append(mean(rejected_rewards))
        metrics["rewards/margins"].append(mean(chosen_rewards - rejected_rewards))
        metrics["rewards/accuracies"].append(mean((chosen_rewards > rejected_rewards).float()))
        metrics["logratios/chosen"].append(mean(chosen_logratios))
        metrics["logratios/rejected"].append(mean(rejected_logratios))
        metrics["targets/chosen"].append(mean(targets[0]))
        metrics["targets/rejected"].append(mean(targets[1]))
        metrics["logratios/toward_target"].append(mean(toward_target))
        metrics["logratios/drift"].append(mean((chosen_logratios + rejected_logratios) / 2))
        metrics["logps/chosen"].append(mean(chosen_logps))
        metrics["logps/rejected"].append(mean(rejected_logps))
