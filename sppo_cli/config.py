"""Every setting of every stage, defined once.

Each stage's settings are one frozen dataclass. Its fields are the command's flags and the keys of the command's
section in a `--config` recipe (`cli/options.py` builds both from here); the manifest records every field; and the
fields that change the stage's result make up its identity, the key a finished or interrupted run is recognised by.
Fields marked `identity=False` only decide how the work runs (batch sizes, memory, number of workers, logging), so a
retry that changes them keeps the finished work.

The paper's settings (arXiv 2405.00675, section 5) are the defaults.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from sppo_cli.errors import SettingError


def setting(
    default: Any,
    help: str,
    *,
    identity: bool = True,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    alias: str | None = None,
    file: bool = False,
) -> Any:
    """A settings field: its default, its help text, whether it is part of the identity, its valid range, and whether
    it names a file (whose content, not its name, is then part of the identity, as the run's inputs are)."""
    metadata = {"help": help, "identity": identity, "at_least": at_least, "above": above, "at_most": at_most,
                "alias": alias, "file": file}  # fmt: skip
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    def __post_init__(self):
        for spec in fields(self):
            _check(spec.name, spec.type, spec.metadata, getattr(self, spec.name))

    def identity(self) -> dict:
        """The settings that change the result: what a finished or interrupted run is recognised by. A file setting
        counts as set or not: its content is one of the run's inputs (`files`)."""
        return {spec.name: bool(value) if spec.metadata.get("file") else value
                for spec in fields(self) if spec.metadata.get("identity", True)
                for value in [getattr(self, spec.name)]}  # fmt: skip

    def files(self) -> dict[str, str]:
        """The files the settings name, by setting."""
        named = {spec.name: getattr(self, spec.name) for spec in fields(self)
                 if spec.metadata.get("file") and getattr(self, spec.name)}  # fmt: skip
        for name, path in named.items():
            if not Path(path).is_file():
                raise SettingError(name, f"names no file: {path}")
        return named

    def record(self) -> dict:
        return asdict(self)


def _check(name: str, kind: Any, rules: Any, value: Any) -> None:
    if get_origin(kind) is Literal and value not in get_args(kind):
        raise SettingError(name, f"must be one of {', '.join(map(str, get_args(kind)))}, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if rules.get("at_least") is not None and value < rules["at_least"]:
        raise SettingError(name, f"must be at least {rules['at_least']}, got {value}")
    if rules.get("above") is not None and value <= rules["above"]:
        raise SettingError(name, f"must be greater than {rules['above']}, got {value}")
    if rules.get("at_most") is not None and value > rules["at_most"]:
        raise SettingError(name, f"must be at most {rules['at_most']}, got {value}")


MAX_SEED = 2**32 - 1  # what numpy and torch seed from

# ---- generation -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateOptions(Settings):
    chat_template: str | None = setting(None, "Jinja chat template file to use instead of the model's.", file=True)


@dataclass(frozen=True)
class PromptOptions(TemplateOptions):
    split: str = setting("train", "Split to read from a dataset with several.")
    prompt_column: str = setting("prompt", "Column holding the prompt: a string, or a conversation (a list of "
                                 "role/content messages; one that ends with the assistant's turn is cut after the "
                                 "last user turn).")  # fmt: skip
    system_prompt: str | None = setting(None, "A system turn for every prompt that has none.")
    limit: int | None = setting(None, "Use only the first N prompts.", at_least=1)


@dataclass(frozen=True)
class SamplingOptions(Settings):
    num_samples: int = setting(5, "Responses per prompt (K).", at_least=1, alias="-k")
    temperature: float = setting(0.7, "Sampling temperature.", above=0)
    top_p: float = setting(0.9, "Nucleus sampling: keep the smallest set of tokens with this much probability.",
                           above=0, at_most=1)  # fmt: skip
    max_new_tokens: int = setting(512, "Most tokens per response.", at_least=1)
    min_new_tokens: int = setting(0, "Fewest tokens per response.", at_least=0)
    stop: list[str] = setting([], "A string that ends a response (repeat for several); it is left out of it.")
    repetition_penalty: float = setting(1.0, "Penalty on tokens already in the prompt or response (1: none).", above=0)
    presence_penalty: float = setting(0.0, "Penalty on tokens already in the response (vllm backend; 0: none).",
                                      at_least=-2, at_most=2)  # fmt: skip
    seed: int = setting(42, "Random seed; every prompt draws its own seed from it and its row.", at_least=0,
                        at_most=MAX_SEED)  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if "" in self.stop:
            raise SettingError("stop", "must not be empty (it would end every response at once)")
        if self.min_new_tokens > self.max_new_tokens:
            raise SettingError("min_new_tokens", f"must be at most max_new_tokens ({self.max_new_tokens})")

    def distribution(self) -> dict:
        """The settings that shape the distribution responses are drawn from (all but how many and the seed)."""
        return {name: value for name, value in asdict(self).items() if name in SAMPLING_DISTRIBUTION}


SAMPLING_DISTRIBUTION = ("temperature", "top_p", "max_new_tokens", "min_new_tokens", "stop", "repetition_penalty",
                         "presence_penalty")  # fmt: skip


@dataclass(frozen=True)
class EngineOptions(Settings):
    backend: Literal["auto", "vllm", "transformers"] = setting("auto", "auto: vllm when it can be imported.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", "Weights' dtype for sampling.")
    batch_size: int = setting(8, "Prompts per batch (transformers backend; vLLM schedules its own).", at_least=1)
    max_model_len: int | None = setting(None, "Context window; longer prompts are skipped.", at_least=1)
    gpu_memory_utilization: float = setting(0.9, "Share of each GPU's memory for vLLM.", identity=False, above=0,
                                            at_most=1)  # fmt: skip
    tensor_parallel_size: int = setting(1, "GPUs per model replica (vllm backend).", at_least=1)


@dataclass(frozen=True)
class WorkOptions(Settings):
    shard_size: int = setting(1000, "Prompts per shard: each finished shard is saved, and a re-run resumes after it.",
                              identity=False, at_least=1)  # fmt: skip
    data_parallel_size: int = setting(1, "Worker processes, one per GPU (group); with --ray-address, Ray actors.",
                                      identity=False, at_least=1)  # fmt: skip
    ray_address: str | None = setting(None, "Run the workers on this Ray cluster (`auto`: the one this machine is "
                                      "part of); --output must be on storage every node sees.", identity=False)
    num_shards: int | None = setting(None, "Run one slice of the work (with --shard-index), e.g. one Slurm array task "
                                     "per node; the same command without them merges the slices.", identity=False,
                                     at_least=1)  # fmt: skip
    shard_index: int | None = setting(None, "Which slice, from 0 to --num-shards - 1.", identity=False, at_least=0)
    wait_for_merge: bool = setting(False, "With --num-shards: once this slice is done, wait until another process (on "
                                   "node 0) has merged the slices into --output.", identity=False)

    def __post_init__(self):
        super().__post_init__()
        if (self.num_shards is None) != (self.shard_index is None):
            raise SettingError("shard_index", "and --num-shards go together")
        if self.num_shards is not None and self.shard_index >= self.num_shards:
            raise SettingError("shard_index", f"must be below --num-shards ({self.num_shards}), got {self.shard_index}")
        if self.wait_for_merge and self.num_shards is None:
            raise SettingError("wait_for_merge", "is for a slice: it needs --num-shards and --shard-index")
        if self.num_shards is not None and self.ray_address:
            raise SettingError("num_shards", "and --ray-address are two ways to spread the work: choose one")


@dataclass(frozen=True)
class GenerateConfig(WorkOptions, EngineOptions, SamplingOptions, PromptOptions):
    """`sppo generate`: K responses per prompt from the current policy."""

    def __post_init__(self):
        super().__post_init__()
        if self.tensor_parallel_size > 1 and self.backend == "transformers":
            raise SettingError("tensor_parallel_size", "needs the vllm backend")
        if self.presence_penalty and self.backend == "transformers":
            raise SettingError("presence_penalty", "needs the vllm backend (transformers has no presence penalty)")
        if self.stop and self.min_new_tokens and self.backend == "transformers":  # vLLM looks for them after it
            raise SettingError("stop", "with min_new_tokens needs the vllm backend (transformers would stop before)")

    def identity(self) -> dict:
        settings = super().identity()
        del settings["batch_size"]  # every prompt has its own seed: its samples do not depend on the batches
        return settings


# ---- ranking --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankerOptions(Settings):
    ranker: str = setting("llm-blender/PairRM", "PairRM checkpoint (directory or hub id), reward-model:PATH_OR_ID, "
                          "rule:math, or python:module:function.")  # fmt: skip
    probability_mode: Literal["scores", "pairwise"] = setting(
        "scores", "PairRM: scores (the published reduction) or pairwise (keeps intransitive preferences).")
    answer_column: str = setting("answer", "rule:math: the column with the reference answer.")
    source_max_length: int = setting(1224, "PairRM: prompt tokens kept (LLM-Blender's).", at_least=3)
    candidate_max_length: int = setting(412, "PairRM: response tokens kept (LLM-Blender's).", at_least=3)
    reward_max_length: int | None = setting(None, "Reward model: tokens kept of each conversation, whose beginning is "
                                            "cut (never the response) [its context window].", at_least=2)  # fmt: skip
    ranker_batch_size: int | None = setting(None, "Pairs (PairRM) or responses (reward model) per forward pass "
                                            "[32 on a GPU, 2 on a CPU].", identity=False, at_least=1)  # fmt: skip


    def identity(self) -> dict:
        """The kind of ranker and the options it reads; which checkpoint or plug-in file it is, is an input."""
        settings = super().identity()
        kind = ranker_kind(self.ranker)
        settings["ranker"] = kind
        if kind != "pairrm":
            for option in ("probability_mode", "source_max_length", "candidate_max_length"):
                del settings[option]
        if kind != "rule:math":
            del settings["answer_column"]
        if kind != "reward-model":
            del settings["reward_max_length"]
        return settings


def ranker_kind(spec: str) -> str:
    """`pairrm`, `reward-model`, a rule, or a plug-in's module:function: what a ranker spec names, its files aside."""
    if spec.startswith(("rule:", "python:")):
        return spec
    return "reward-model" if spec.startswith("reward-model:") else "pairrm"


@dataclass(frozen=True)
class RankConfig(WorkOptions, RankerOptions):
    """`sppo rank`: judge the K responses of each prompt; win rates and the chosen/rejected pair."""

    drop_truncated: bool = setting(False, "Never choose or reject a response that --max-new-tokens cut off (it still "
                                   "counts in the others' win rates); a prompt left with fewer than two is dropped.")

    def identity(self) -> dict:
        settings = super().identity()
        if not self.drop_truncated:  # as rankings were made before the option: they stay finished
            del settings["drop_truncated"]
        return settings


# ---- evaluation -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingOptions(Settings):
    report_to: str = setting("tensorboard", "tensorboard, wandb, none, or a comma-separated list.", identity=False)
    run_name: str | None = setting(None, "Name of the run for the trackers (pipeline.sh: iteration and stage; "
                                   "WANDB_RUN_GROUP groups the runs).", identity=False)  # fmt: skip


EVAL_TRACKERS = ("tensorboard", "wandb", "none")


@dataclass(frozen=True)
class EvalConfig(TrackingOptions, GenerateConfig, RankerOptions):
    """`sppo eval`: the model's responses judged against a baseline's, on the same prompts."""

    num_samples: int = setting(1, "Responses per prompt from each side; the i-th of the model is judged against the "
                               "i-th of the baseline.", at_least=1, alias="-k")  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.num_shards is not None:  # judging needs both sides' every response: one run does it, or Ray
            raise SettingError("num_shards", "is for generate and rank; spread an evaluation with --ray-address")
        for tracker in self.report_to.split(","):
            if tracker.strip() not in EVAL_TRACKERS:
                raise SettingError("report_to", f"names {tracker!r}: evaluations log to {', '.join(EVAL_TRACKERS)}")

    def identity(self) -> dict:
        settings = super().identity()
        settings.pop("probability_mode", None)  # two responses: PairRM's two modes give the same probability
        return settings


# ---- training -------------------------------------------------------------------------------------------------------

SPPO_LOSSES = ("sppo", "sppo_single", "sppo_hard")
BASELINE_LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}  # iterative DPO and IPO, by trl's name for them


@dataclass(frozen=True)
class TrainConfig(TrackingOptions, TemplateOptions):
    """`sppo train`. Fields named as in trl's DPOConfig are passed to it under that name (see trainer.SPPOConfig)."""

    loss: Literal["sppo", "sppo_single", "sppo_hard", "dpo", "ipo"] = setting(
        "sppo", "The SPPO loss, or trl's DPO or IPO loss as a baseline (see the README).")
    beta: float = setting(0.001, "1/eta of the SPPO loss.", above=0)
    learning_rate: float = setting(5e-7, "Peak learning rate.", above=0)
    num_train_epochs: float = setting(1.0, "Passes over the rankings.", above=0)
    max_steps: int = setting(-1, "Stop after this many optimizer steps (-1: the epochs decide).", at_least=-1)
    per_device_train_batch_size: int = setting(8, "Pairs per process and step.", at_least=1)
    gradient_accumulation_steps: int = setting(1, "Steps whose gradients are summed before each update.", at_least=1)
    optim: str = setting("rmsprop", "Optimizer, by its transformers name (adamw_torch, rmsprop, ...).")
    optim_args: str | None = setting(None, "Extra optimizer arguments, as transformers takes them (a=1,b=2).")
    adam_beta1: float = setting(0.9, "Adam's beta1.", at_least=0, at_most=1)
    adam_beta2: float = setting(0.999, "Adam's beta2.", at_least=0, at_most=1)
    adam_epsilon: float = setting(1e-8, "Adam's epsilon.", above=0)
    lr_scheduler_type: str = setting("linear", "Learning-rate schedule (linear, cosine, constant, ...).")
    lr_scheduler_kwargs: str | None = setting(None, "The schedule's extra arguments, a JSON object.")
    warmup_steps: float = setting(0.1, "Warm-up steps, or a share of all steps when below 1.", at_least=0)
    weight_decay: float = setting(0.0, "Weight decay.", at_least=0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0: none).", at_least=0)
    max_length: int | None = setting(1024, "Tokens kept of prompt + response (the end is cut).", at_least=2)
    max_prompt_length: int | None = setting(None, "Prompt tokens kept (from the end) when prompt + response is "
                                            "longer than --max-length.", at_least=1)  # fmt: skip
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass to save memory.",
                                           identity=False)  # fmt: skip
    precompute_ref_log_probs: bool = setting(False, "Compute the reference log-probs once before training: no "
                                             "reference model in memory.", identity=False)  # fmt: skip
    lora_r: int = setting(0, "LoRA rank; 0 trains every weight.", at_least=0)
    lora_alpha: int = setting(16, "LoRA alpha.", at_least=1)
    lora_dropout: float = setting(0.0, "LoRA dropout.", at_least=0, at_most=1)
    lora_target_modules: str = setting("all-linear", "Comma-separated module names, or all-linear.")
    load_in_4bit: bool = setting(False, "QLoRA: load the base in 4 bits (CUDA + bitsandbytes; needs --lora-r).")
    attn_implementation: str | None = setting(None, "Attention kernel (eager, sdpa, flash_attention_2, ...).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("float32", "Dtype of the policy's weights.")
    bf16: bool | None = setting(None, "bf16 mixed precision (default: on where the GPU supports it).")
    fp16: bool = setting(False, "fp16 mixed precision (GPUs without bf16).")
    num_processes: int = setting(1, "Processes (GPUs) on this node, launched with torchrun.", at_least=1)
    num_nodes: int = setting(1, "Nodes training together; run the same command on each, with its --node-rank.",
                             at_least=1)  # fmt: skip
    node_rank: int = setting(0, "This node's rank, from 0 (the node that keeps the output) to --num-nodes - 1.",
                             identity=False, at_least=0)  # fmt: skip
    master_addr: str | None = setting(None, "Address of node 0, which every node reaches (multi-node).",
                                      identity=False, alias="--main-process-ip")  # fmt: skip
    master_port: int = setting(29500, "A free port on node 0 (multi-node).", identity=False, at_least=1, at_most=65535,
                               alias="--main-process-port")  # fmt: skip
    deepspeed: str | None = setting(None, "DeepSpeed config, e.g. recipes/deepspeed/zero3.json.", file=True)
    seed: int = setting(42, "Random seed.", at_least=0, at_most=MAX_SEED)
    logging_steps: int = setting(1, "Log the loss and rewards every N steps.", identity=False, at_least=1)
    save_steps: int = setting(200, "Checkpoint every N steps; a re-run resumes from the last.", identity=False,
                              at_least=1)  # fmt: skip
    save_total_limit: int | None = setting(1, "Checkpoints kept.", identity=False, at_least=1)
    dataloader_num_workers: int = setting(0, "Processes loading batches.", identity=False, at_least=0)

    def identity(self) -> dict:
        settings = super().identity()
        if self.num_nodes == 1:  # as runs were made before the option: they stay finished
            del settings["num_nodes"]
        return settings

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps == 0:
            raise SettingError("max_steps", "must be -1 (the epochs decide) or at least 1, got 0")
        if self.node_rank >= self.num_nodes:
            raise SettingError("node_rank", f"must be below --num-nodes ({self.num_nodes}), got {self.node_rank}")
        if self.num_nodes > 1 and not self.master_addr:
            raise SettingError("master_addr", "is needed with --num-nodes above 1: the address of node 0")
        if self.load_in_4bit and not self.lora_r:
            raise SettingError("load_in_4bit", "trains a LoRA adapter: set lora_r too")
        if self.lr_scheduler_kwargs is not None:
            try:
                if not isinstance(json.loads(self.lr_scheduler_kwargs), dict):
                    raise ValueError
            except ValueError:
                problem = f"must be a JSON object, got {self.lr_scheduler_kwargs!r}"
                raise SettingError("lr_scheduler_kwargs", problem) from None



# ---- tiny models ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyConfig(Settings):
    """The tiny offline models of the demo and the tests."""

    seed: int = setting(0, "Random seed of the weights.", at_least=0, at_most=MAX_SEED)


# ---- publishing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushConfig(Settings):
    """`sppo push`: how a finished output is published (nothing is pushed without a repository id)."""

    public: bool = setting(False, "Publish openly; repositories are private otherwise.")
    revision: str | None = setting(None, "A branch of the repository to push to.")
    base_model: str | None = setting(None, "A model's card: the hub id it was trained from (by default its input, "
                                     "when that was a hub id).")  # fmt: skip
    dataset: list[str] = setting([], "A model's card: the hub id of its training data, repeatable (by default its "
                                 "input, when that was a hub id).")  # fmt: skip
    eval: list[str] = setting([], "A model's card: an `sppo eval` output of it, for its model-index (repeatable).")
    include_adapter: bool = setting(False, "A LoRA run: push its adapter/ too.")
