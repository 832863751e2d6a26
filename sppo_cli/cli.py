"""The `sppo` command: parses options and calls the stage functions; no logic of its own."""

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from sppo_cli.errors import SppoError, first_line

app = typer.Typer(
    help="Self-Play Preference Optimization: generate → rank → train, one iteration at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to write (must not exist).")]
Overwrite = Annotated[bool, typer.Option(help="Replace --output if it exists.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]


def _read_config(ctx: typer.Context, path: Path | None) -> Path | None:
    """Defaults for this command from the `<command>:` section of a YAML recipe; flags given still win."""
    if path is None:
        return None
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SppoError(f"cannot read the recipe {path}: {first_line(error)}") from error
    section = recipe.get(ctx.command.name, {}) if isinstance(recipe, dict) else None
    if not isinstance(section, dict):
        raise SppoError(f"{path}: `{ctx.command.name}:` must be a mapping of option names to values")
    known = {param.name for param in ctx.command.params} - {"config"}
    defaults = {key.replace("-", "_"): value for key, value in section.items()}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise SppoError(f"{path}: unknown option(s) for `sppo {ctx.command.name}`: {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


Config = Annotated[
    Path | None,
    typer.Option(help="YAML recipe: its `<command>:` section sets defaults; flags override.", is_eager=True,
                 callback=_read_config),
]


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Policy to sample from: a model directory or hub id.")],
    prompts: Annotated[str, typer.Option(help="save_to_disk directory, .json/.jsonl/.parquet file, or hub id.")],
    output: Output,
    config: Config = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-k", help="Responses per prompt (K >= 2).")] = 5,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 512,
    seed: Seed = 42,
    backend: Annotated[str, typer.Option(help="auto (vllm if importable), vllm or transformers.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Prompts per batch (transformers backend).")] = 8,
    max_model_len: Annotated[int | None, typer.Option(help="Context window; longer prompts are skipped.")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Fraction of GPU memory for vLLM.")] = 0.9,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs per model replica (vllm backend).")] = 1,
    data_parallel_size: Annotated[int, typer.Option(help="Model replicas, one worker process each.")] = 1,
    shard_size: Annotated[int, typer.Option(help="Prompts per shard, the unit of resuming and progress.")] = 1000,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    split: str = "train",
    prompt_column: str = "prompt",
    overwrite: Overwrite = False,
):
    """Sample K responses per prompt from the policy; re-running an interrupted run resumes it."""
    from sppo_cli import data
    from sppo_cli.generate import EngineConfig, SamplingConfig, generate_to_disk, resolve_backend

    sampling = SamplingConfig(num_samples, temperature, top_p, max_new_tokens, seed)
    engine = EngineConfig(
        model=model,
        backend=resolve_backend(backend),
        dtype=dtype,
        batch_size=batch_size,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        data_parallel_size=data_parallel_size,
        shard_size=shard_size,
    )
    prompt_data = data.load_prompts(prompts, split, prompt_column, limit)
    data.require_new_output(output, overwrite)
    stats = generate_to_disk(prompt_data, engine, sampling, output, {"model": model, "prompts": prompts})
    summary = f"{stats['prompts']} prompts, {stats['samples']} samples, {stats['generated_tokens']} tokens, "
    _done(output, summary + f"{stats['seconds']:.1f} s ({engine.backend})")


@app.command()
def rank(
    generations: Annotated[str, typer.Option(help="Output directory of `sppo generate`.")],
    output: Output,
    config: Config = None,
    ranker: Annotated[
        str,
        typer.Option(
            help="PairRM checkpoint (directory or hub id), reward-model:PATH_OR_ID, rule:math, "
            "or python:module:function."
        ),
    ] = "llm-blender/PairRM",
    probability_mode: Annotated[str, typer.Option(help="PairRM: scores (published) or pairwise.")] = "scores",
    answer_column: Annotated[str, typer.Option(help="rule:math: column with the reference answer.")] = "answer",
    source_max_length: Annotated[int, typer.Option(help="PairRM: prompt tokens kept (LLM-Blender's).")] = 1224,
    candidate_max_length: Annotated[int, typer.Option(help="PairRM: response tokens kept (LLM-Blender's).")] = 412,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Pairs (PairRM) or responses (reward model) per forward pass [32 on GPU, 2 on CPU]."),
    ] = None,
    data_parallel_size: Annotated[int, typer.Option(help="Ranker replicas, one worker process (GPU) each.")] = 1,
    overwrite: Overwrite = False,
):
    """Judge the K responses of each prompt; write win rates and chosen/rejected pairs."""
    from sppo_cli import data
    from sppo_cli.rank import rank as rank_generations
    from sppo_cli.rankers import load_ranker

    generation_data = data.validate_generations(data.load_stage(generations, "generate")[0], generations)
    data.require_new_output(output, overwrite)
    max_lengths = {"source_max_length": source_max_length, "candidate_max_length": candidate_max_length}
    make_ranker = functools.partial(load_ranker, ranker, probability_mode, batch_size, answer_column, **max_lengths)
    rankings, stats = rank_generations(generation_data, make_ranker, data_parallel_size)
    parameters = {"ranker": ranker, "probability_mode": probability_mode, "answer_column": answer_column, **max_lengths}
    data.save_stage(rankings, output, "rank", {"generations": generations}, parameters, **stats)
    _done(output, f"{stats['pairs']} pairs, {stats['tied_prompts']} prompts with tied responses")


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Policy to train; also the frozen reference.")],
    data: Annotated[str, typer.Option(help="Output directory of `sppo rank` (or a dataset in SPPO format).")],
    output: Output,
    config: Config = None,
    loss: Annotated[str, typer.Option(help="sppo, sppo_single or sppo_hard.")] = "sppo",
    beta: Annotated[float, typer.Option(help="1/eta of the SPPO loss.")] = 0.001,
    learning_rate: float = 5e-7,
    epochs: float = 1.0,
    per_device_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_length: int = 1024,
    gradient_checkpointing: bool = True,
    precompute_ref_logps: Annotated[
        bool, typer.Option(help="Compute reference log-probs once before training; no reference model in memory.")
    ] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank; 0 trains every weight.")] = 0,
    lora_alpha: int = 16,
    lora_target_modules: Annotated[str, typer.Option(help="Comma-separated module names, or all-linear.")] = (
        "all-linear"
    ),
    load_in_4bit: Annotated[bool, typer.Option(help="QLoRA: load the base in 4 bits (CUDA + bitsandbytes).")] = False,
    num_processes: Annotated[int, typer.Option(help="Processes (GPUs) on this node, launched with torchrun.")] = 1,
    deepspeed: Annotated[str | None, typer.Option(help="DeepSpeed config, e.g. recipes/deepspeed/zero3.json.")] = None,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (for --resume).")] = 200,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint of an interrupted run.")] = False,
    report_to: Annotated[str, typer.Option(help="tensorboard, wandb, none, or comma-separated.")] = "tensorboard",
    seed: Seed = 42,
    overwrite: Overwrite = False,
):
    """Train the policy on the rankings with the SPPO loss."""
    from sppo_cli.data import require_new_output
    from sppo_cli.train import SPPOConfig, check_loss, is_launched, launch, load_inputs, lora_config
    from sppo_cli.train import train as train_policy

    if load_in_4bit and not lora_r:
        raise SppoError("--load-in-4bit trains a LoRA adapter: set --lora-r too")
    require_new_output(output, overwrite)
    if not is_launched() and (num_processes > 1 or deepspeed):  # DeepSpeed always needs a launcher
        check_loss([loss], beta)
        load_inputs(model, data)  # bad input: one line here, not one per process and a launcher traceback
        raise typer.Exit(launch(num_processes))
    sppo_config = SPPOConfig(
        output_dir=str(output),
        loss_type=[loss],
        beta=beta,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        per_device_train_batch_size=per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        precompute_ref_log_probs=precompute_ref_logps,
        deepspeed=deepspeed,
        save_steps=save_steps,
        report_to=report_to.split(","),
        seed=seed,
    )
    peft_config = lora_config(lora_r, lora_alpha, lora_target_modules) if lora_r else None
    manifest = train_policy(model, data, output, sppo_config, peft_config, load_in_4bit, resume)
    if manifest is not None:
        _done(output, f"{manifest['steps']} steps, final train loss {manifest['train_loss']:.4g}")


TinyOutput = Annotated[Path, typer.Argument(help="Directory to write.")]


@app.command("tiny-model")
def tiny_model(output: TinyOutput, seed: Seed = 0, overwrite: Overwrite = False):
    """Build a tiny random Llama with its own tokenizer and chat template (offline)."""
    from sppo_cli.tiny import build_tiny_model

    _build_tiny("tiny-model", build_tiny_model, output, seed, overwrite)


@app.command("tiny-pairrm")
def tiny_pairrm(output: TinyOutput, seed: Seed = 0, overwrite: Overwrite = False):
    """Build a tiny random PairRM checkpoint (PairRM-hf layout, offline)."""
    from sppo_cli.pairrm import build_tiny_pairrm

    _build_tiny("tiny-pairrm", build_tiny_pairrm, output, seed, overwrite)


@app.command("tiny-reward-model")
def tiny_reward_model(output: TinyOutput, seed: Seed = 0, overwrite: Overwrite = False):
    """Build a tiny random scalar reward model sharing the tiny model's tokenizer (offline)."""
    from sppo_cli.tiny import build_tiny_reward_model

    _build_tiny("tiny-reward-model", build_tiny_reward_model, output, seed, overwrite)


def _build_tiny(kind: str, build, output: Path, seed: int, overwrite: bool) -> None:
    from sppo_cli.data import build_artifact

    build_artifact(output, kind, lambda directory: build(directory, seed), {"seed": seed}, overwrite)
    _done(output, kind)


def _done(output: Path, summary: str) -> None:
    console.print(f"[green]✓[/green] {output}: {summary}", soft_wrap=True)


def main() -> None:
    try:
        app()
    except SppoError as error:
        console.print(f"[red]sppo: error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]sppo: interrupted[/red]")
        sys.exit(130)
    except Exception as error:  # a bug or an unexpected library failure: one line, the traceback on request
        if os.environ.get("SPPO_DEBUG"):
            raise
        message = f"{type(error).__name__}: {first_line(error)} (set SPPO_DEBUG=1 for the traceback)"
        console.print(
            f"[red]sppo: error:[/red] {message}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
