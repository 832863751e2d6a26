"""Stage 3: fit the policy to the rankings' win rates with the SPPO loss (trainer.py), the policy itself frozen as
the reference.

Every process of a distributed run (torchrun, accelerate, DeepSpeed) calls `train`; the main one keeps the stage's
record (stage.py). Checkpoints land in `<output>.partial`, so re-running an interrupted run resumes from the last
complete one. `sppo train --num-processes N` (or --deepspeed) launches itself under torchrun: the launching process
holds the stage, shows the progress and prints one line; the training processes write to the stage's log.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerBase, TrainerCallback

from sppo_cli.cards import license_of, model_card
from sppo_cli.config import BASELINE_LOSSES, TrainConfig
from sppo_cli.data import (
    CHOSEN,
    CHOSEN_TOKEN_IDS,
    MANIFEST,
    PROMPT_TEXT,
    PROMPT_TOKEN_IDS,
    REJECTED,
    REJECTED_TOKEN_IDS,
    SAMPLED_CHAT_TEMPLATE,
    SAMPLED_VOCABULARY,
    WIN_RATE_COLUMNS,
    load_stage,
    published,
    read_dataset,
    read_manifest,
    validate_rankings,
)
from sppo_cli.errors import SppoError, first_line
from sppo_cli.identity import template_fingerprint, vocabulary_fingerprint
from sppo_cli.logs import LOG_NAME, ProgressBar, logger, stage_log
from sppo_cli.models import bf16_supported, load_tokenizer, on_gpu, require_chat_template, resolve_model, torch_dtype
from sppo_cli.parallel import WorkerError, die_with_parent
from sppo_cli.stage import StageRun, write_json
from sppo_cli.tracking import finish_training_runs
from sppo_cli.trainer import SPPOConfig, SPPOTrainer

# How the launching process and the training processes it starts talk: the job, rank 0's progress, each one's error.
LAUNCH_SUFFIX, LAUNCH_FILE, STATUS_FILE, ERROR_FILE = ".launch", "launch.json", "status.json", "error-{rank}.json"
_EXPLICIT = {"loss", "report_to", "lr_scheduler_kwargs", "chat_template", "lora_r", "lora_alpha", "lora_dropout",
             "lora_target_modules", "load_in_4bit", "num_processes", "attn_implementation", "dtype", "num_nodes",
             "node_rank", "master_addr", "master_port"}  # fmt: skip


def sppo_config(config: TrainConfig, output_dir: Path) -> SPPOConfig:
    """The trainer's configuration: TrainConfig's fields named as DPOConfig's pass as they are."""
    passed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _EXPLICIT}
    model_init_kwargs = {"dtype": config.dtype}
    if config.attn_implementation:
        model_init_kwargs["attn_implementation"] = config.attn_implementation
    report_to = [] if config.report_to == "none" else config.report_to.split(",")
    scheduler_kwargs = json.loads(config.lr_scheduler_kwargs) if config.lr_scheduler_kwargs else {}
    loss = BASELINE_LOSSES.get(config.loss, config.loss)
    try:
        return SPPOConfig(output_dir=str(output_dir), loss_type=[loss], report_to=report_to,
                          lr_scheduler_kwargs=scheduler_kwargs, model_init_kwargs=model_init_kwargs, disable_tqdm=True,
                          **passed)  # fmt: skip
    except ValueError as error:  # transformers checks the values it knows (optimizers, schedules, trackers)
        raise SppoError(f"invalid training settings: {first_line(error)}") from error


def lora_config(config: TrainConfig) -> LoraConfig | None:
    if not config.lora_r:
        return None
    names = config.lora_target_modules
    modules = "all-linear" if names == "all-linear" else [m.strip() for m in names.split(",")]
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=modules, task_type="CAUSAL_LM")  # fmt: skip


def load_rankings(source: str, chat_template: str | None = None) -> tuple[Dataset, str | None]:
    """A finished `sppo rank` output, or any dataset in the published SPPO training format, and the vocabulary of its
    sampled token ids (None: none are known). Rankings that say which chat template their responses were sampled with
    must be trained with that one: the model keeps it for the next iteration's sampling."""
    path = published(source) or Path(source)
    if not (path.is_dir() and (path / MANIFEST).exists()):
        return validate_rankings(read_dataset(source), source), None
    data, manifest = load_stage(source, "rank")
    sampled = manifest.get(SAMPLED_CHAT_TEMPLATE, template_fingerprint(chat_template))
    if sampled != template_fingerprint(chat_template):
        raise SppoError(f"{source} was sampled with " + ("the model's own chat template: train without --chat-template"
                        if sampled is None else "another --chat-template: train with the one it was sampled with"))
    return validate_rankings(data, source), manifest.get(SAMPLED_VOCABULARY)


def to_trainer_format(rankings: Dataset, sampled_tokens: bool = False) -> Dataset:
    """The columns SPPOTrainer tokenizes: the two conversations, the win rates, the sampled prompt text, and with
    `sampled_tokens` the token ids that were sampled, which it then scores as they are."""
    keep = {CHOSEN, REJECTED, PROMPT_TEXT, *WIN_RATE_COLUMNS}
    if sampled_tokens:
        keep |= {PROMPT_TOKEN_IDS, CHOSEN_TOKEN_IDS, REJECTED_TOKEN_IDS}
    return rankings.select_columns([c for c in rankings.column_names if c in keep])


def load_inputs(model: str, data: str, chat_template: str | None = None) -> tuple[PreTrainedTokenizerBase, Dataset]:
    """The tokenizer and the trainer-ready rankings: bad input fails here, before any process starts. The sampled
    token ids are trained on when the rankings have them in this tokenizer's vocabulary."""
    tokenizer = load_tokenizer(resolve_model(model), chat_template)
    require_chat_template(tokenizer)
    rankings, vocabulary = load_rankings(data, chat_template)
    return tokenizer, to_trainer_format(rankings, vocabulary == vocabulary_fingerprint(tokenizer))


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint that was fully written: its trainer_state.json (saved last) reads back, and its weights
    and optimizer state (DeepSpeed's `global_step*` directory holds both) are there; an older one otherwise."""
    for checkpoint in sorted(directory.glob("checkpoint-*"), key=lambda c: -int(c.name.split("-")[-1])):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        deepspeed = any(checkpoint.glob("global_step*"))
        weights = deepspeed or any(checkpoint.glob(pattern) for pattern in _WEIGHTS)
        if weights and (deepspeed or (checkpoint / "optimizer.pt").is_file()):
            return str(checkpoint)
    return None


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")  # fmt: skip


def is_launched() -> bool:
    return "LOCAL_RANK" in os.environ


def under_sppo_launcher() -> bool:
    return "SPPO_STATUS_FILE" in os.environ


def resolved(config: TrainConfig) -> TrainConfig:
    """The settings as they will run: bf16 decided for this machine, and the real numbers of processes per node and
    of nodes when a launcher (sppo's torchrun, or the user's torchrun or accelerate) started this one."""
    bf16 = bf16_supported() if config.bf16 is None else config.bf16
    if not is_launched():
        return dataclasses.replace(config, bf16=bf16)
    world = int(os.environ.get("WORLD_SIZE", config.num_processes * config.num_nodes))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return dataclasses.replace(config, bf16=bf16, num_processes=per_node, num_nodes=world // per_node)


def train(model: str, data: str, output: str | Path, config: TrainConfig, overwrite: bool = False,
          verbose: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """Run the stage: returns the manifest and whether `output` was already this run's finished result (every
    process of a distributed run returns them)."""
    tokenizer, dataset = load_inputs(model, data, config.chat_template)
    config = resolved(config)
    run = StageRun("train", output, config, {"model": model, "data": data}, overwrite,
                   input_types={"data": "dataset"})  # fmt: skip
    run.scratch.append("checkpoint-*")
    run.work.append("checkpoint-*/trainer_state.json")
    if not is_launched() and (config.num_processes > 1 or config.num_nodes > 1 or config.deepspeed):  # DeepSpeed: too
        return _launch(run, model, data, config, verbose)
    manifest = run.finished()
    if manifest is not None:
        return manifest, True
    trainer_config = sppo_config(config, run.partial)  # sets up the distributed state
    state = PartialState()
    try:
        if state.is_main_process and run.open(lock=not under_sppo_launcher()) is None:  # the launcher holds the lock
            if state.num_processes == 1:  # finished by another process meanwhile
                return read_manifest(run.output), True
            run.open(lock=False)  # the other processes are on their way: this run finishes the output again
        state.wait_for_everyone()
        with stage_log(run.partial / LOG_NAME, verbose, inherited=under_sppo_launcher()):
            if state.is_main_process:
                run.log_start()
            manifest = run.completed()
            state.wait_for_everyone()  # every process has looked before the main one may finish the run
            if manifest is None:
                stats = _fit(model, tokenizer, dataset, run.partial, config, trainer_config)
                if state.is_main_process:  # trl's own card would name the partial directory and cite DPO
                    card = model_card(run.manifest(**stats), run.output.name, license=license_of(model))
                    (run.partial / "README.md").write_text(card)
                    manifest = run.write_manifest(**stats)
            if state.is_main_process:
                run.finish()
                run.log_finish(manifest)
    finally:
        run.close()
    state.wait_for_everyone()
    return manifest or read_manifest(run.output), False


def _fit(model: str, tokenizer, dataset: Dataset, partial: Path, config: TrainConfig,
         trainer_config: SPPOConfig) -> dict:  # fmt: skip
    checkpoint = last_complete_checkpoint(partial)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    peft_config = lora_config(config)
    try:
        trainer = SPPOTrainer(model=model, args=trainer_config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[_Progress()],
                              quantization_config=_four_bit_config() if config.load_in_4bit else None)  # fmt: skip
    except ValueError as error:  # the model's loading checks its settings (attention kernel, dtype)
        raise SppoError(f"cannot set up training: {first_line(error)}") from error
    dropped = len(dataset) - len(trainer.train_dataset)
    if dropped:
        if not len(trainer.train_dataset):
            raise SppoError(f"every prompt fills --max-length ({config.max_length} tokens) on its own, leaving no "
                            "response token to learn from: raise --max-length, or set --max-prompt-length")  # fmt: skip
        logger.warning("%d of %d rows left out: their prompt fills --max-length (%d tokens)", dropped, len(dataset),
                       config.max_length)  # fmt: skip
    result = trainer.train(resume_from_checkpoint=checkpoint)
    finish_training_runs(config.report_to)
    trainer.save_model(str(partial / "adapter" if peft_config else partial))  # collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return {}
    if peft_config:
        _merge_adapter(model, partial / "adapter", partial, config.dtype)
        tokenizer.save_pretrained(partial)
    history = trainer.state.log_history
    (partial / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
    scored = "sampled token ids" if CHOSEN_TOKEN_IDS in dataset.column_names else "re-tokenized text"
    return {"rows": len(trainer.train_dataset), "dropped_prompt_too_long": dropped,
            "responses_trained_as": scored, "steps": result.global_step, **loss_summary(history),  # fmt: skip
            "resumed_from": Path(checkpoint).name if checkpoint else None}  # fmt: skip


PROGRESS_METRICS = ("logratios/chosen", "targets/chosen", "logratios/rejected", "targets/rejected",
                    "logratios/toward_target", "logratios/drift")  # SPPOTrainer's; see README "Reading training"


def loss_summary(history: list[dict]) -> dict:
    """The mean training loss over all steps and the last logged one, from the logged losses (each the mean over
    the steps since the one before), so that a resumed run reports the same numbers as an uninterrupted one; and the
    last logged progress metrics."""
    logged = [entry for entry in history if "loss" in entry]
    if not logged:
        return {"train_loss": None, "final_loss": None, "final_progress": None}
    steps = [entry["step"] - previous for entry, previous in zip(logged, [0] + [e["step"] for e in logged[:-1]])]
    mean = sum(entry["loss"] * n for entry, n in zip(logged, steps)) / sum(steps)
    progress = {name: logged[-1][name] for name in PROGRESS_METRICS if name in logged[-1]} or None
    return {"train_loss": mean, "final_loss": logged[-1]["loss"], "final_progress": progress}


class _Progress(TrainerCallback):
    """The stage's progress bar on the main process, or, under the launcher, its status file."""

    def __init__(self):
        self.status = os.environ.get("SPPO_STATUS_FILE")
        self.bar: ProgressBar | None = None
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.status:
            self.bar = ProgressBar("train", state.max_steps, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.bar:
            self.bar.update(state.global_step - self.bar.bar.n)
        elif self.status:
            write_json(Path(self.status), {"step": state.global_step, "max_steps": state.max_steps,
                                           "loss": self.loss})  # fmt: skip

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)
        if self.bar and self.loss is not None:
            self.bar.bar.set_postfix(loss=f"{self.loss:.4g}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar:
            self.bar.close()


# ---- launching ------------------------------------------------------------------------------------------------------


def _launch(run: StageRun, model: str, data: str, config: TrainConfig, verbose: bool) -> tuple[dict, bool]:
    """Run this node's training processes under torchrun; show their progress; one line if they fail. Node 0 holds
    the stage (its lock and log); the global main process, there, finishes the output, which every node then reads."""
    manifest = run.finished()
    if manifest is not None:
        return manifest, True
    try:
        if config.node_rank == 0 and run.open() is None:  # finished by another process meanwhile
            return read_manifest(run.output), True
        # beside the output, not in its partial (which the training processes rename into place): removed once the run
        # succeeds, or by the next run; torchrun's own temporary directories land there too
        exchange = run.output.resolve().with_name(f"{run.output.name}{LAUNCH_SUFFIX}{config.node_rank or ''}")
        shutil.rmtree(exchange, ignore_errors=True)
        exchange.mkdir()
        with stage_log((run.partial if config.node_rank == 0 else exchange) / LOG_NAME, verbose):
            run.log_start()
            write_json(exchange / LAUNCH_FILE, {"model": model, "data": data, "output": str(run.output),
                                                "config": config.record(), "overwrite": run.overwrite})  # fmt: skip
            command = [sys.executable, "-m", "torch.distributed.run", *_rendezvous(config),
                       f"--nproc_per_node={config.num_processes}", "-m", "sppo_cli.train",
                       str(exchange / LAUNCH_FILE)]  # fmt: skip
            threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.num_processes)))
            environment = {**os.environ, "SPPO_STATUS_FILE": str(exchange / STATUS_FILE), "OMP_NUM_THREADS": threads,
                           "SPPO_STAGE_STARTED": str(run.started), "TMPDIR": str(exchange)}  # fmt: skip
            logger.info("launching: %s", " ".join(command))
            process = subprocess.Popen(command, env=environment, preexec_fn=die_with_parent)
            try:
                _follow(process, exchange / STATUS_FILE)
            finally:
                if process.poll() is None:  # interrupted: no training process outlives the command
                    process.terminate()
                    process.wait()
            if process.returncode != 0:  # the exchange directory stays: node > 0 keeps its log there
                raise _failure(exchange, process.returncode)
        shutil.rmtree(exchange, ignore_errors=True)
    finally:
        run.close()
    manifest = read_manifest(run.output)
    return manifest, False


def _rendezvous(config: TrainConfig) -> list[str]:
    """How torchrun's processes find each other: on this node alone, or across --num-nodes nodes through node 0."""
    if config.num_nodes == 1:
        return ["--standalone"]
    return [f"--nnodes={config.num_nodes}", f"--node-rank={config.node_rank}", f"--master-addr={config.master_addr}",
            f"--master-port={config.master_port}"]  # fmt: skip


def _follow(process: subprocess.Popen, status: Path) -> None:
    with ProgressBar("train", None, unit="step") as bar:
        while True:
            finished = process.poll() is not None
            progress = _read_json(status)
            if "max_steps" in progress:
                bar.bar.total = progress["max_steps"]
                bar.update(progress["step"] - bar.bar.n)
            if finished:
                return
            time.sleep(0.5)


def _failure(exchange: Path, exit_code: int) -> Exception:
    """The training processes' error: a user error as one, a bug as one, else the launcher's exit code."""
    errors = [_read_json(path) for path in sorted(exchange.glob(ERROR_FILE.format(rank="*")))]
    for error in errors:
        if "error" in error:
            return SppoError(error["error"])
    if errors:
        return WorkerError(f"a training process failed: {errors[0]['bug']}")
    return WorkerError(f"the training processes failed (torchrun exit code {exit_code})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _launched_main(job_file: str) -> None:
    """A training process started by `_launch`: run the job; report an error to the launching process."""
    die_with_parent()  # torchrun's own death must take this process with it
    job = json.loads(Path(job_file).read_text())
    try:
        train(job["model"], job["data"], job["output"], TrainConfig(**job["config"]), job["overwrite"])
    except Exception as error:
        logger.exception("training process failed")
        user_error = isinstance(error, SppoError)
        report = {"error": str(error)} if user_error else {"bug": f"{type(error).__name__}: {first_line(error)}"}
        write_json(Path(job_file).with_name(ERROR_FILE.format(rank=os.environ.get("RANK", "0"))), report)
        sys.exit(1)


# ---- LoRA -----------------------------------------------------------------------------------------------------------


def _four_bit_config() -> BitsAndBytesConfig:
    if not on_gpu() or importlib.util.find_spec("bitsandbytes") is None:
        raise SppoError("--load-in-4bit needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes)")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def _merge_adapter(base_model: str, adapter: Path, output: Path, dtype: str) -> None:
    """Fold the trained adapter into the base, loaded in the training dtype, so the next iteration's generate loads
    a plain model."""
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype(dtype))
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(output)


if __name__ == "__main__":
    _launched_main(sys.argv[1])
