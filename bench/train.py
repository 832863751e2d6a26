"""Step time and peak memory of `sppo train` variants against trl's DPOTrainer(loss_type="sppo_hard").

    python bench/train.py [--hidden-size 256 --layers 4 --rows 64 --batch-size 8 --response-tokens 128]

Each variant runs in its own process (so peak memory is its own) on the same model, data and batch:
  sppo           SPPOTrainer, reference model in memory (the default)
  sppo-precomp   SPPOTrainer, reference log-probs precomputed before training (no reference model)
  sppo-lora      SPPOTrainer with a LoRA adapter (r=16, all linear layers; reference = adapter disabled)
  trl-sppo_hard  trl.DPOTrainer with its built-in sppo_hard loss (the obvious alternative)
Step time is the median over the steps after the first; memory is the peak GPU allocation on CUDA, else the
process's peak resident set size.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("sppo", "sppo-precomp", "sppo-lora", "trl-sppo_hard")


def reply(prompt: str, response: str) -> list[dict[str, str]]:
    """A one-turn conversation and its answer, as rankings hold them."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def rankings(rows: int, response_tokens: int):
    from datasets import Dataset

    from sppo_cli.tiny import corpus

    lines = corpus()
    words = " ".join(lines).split()

    def text(start: int) -> str:
        return " ".join(words[(start + i) % len(words)] for i in range(response_tokens // 2))

    return Dataset.from_list(
        [
            {
                "chosen": reply(lines[i % len(lines)], text(7 * i)),
                "rejected": reply(lines[i % len(lines)], text(11 * i + 3)),
                "chosen_probs": 0.7, "chosen_probs_win": 0.65, "chosen_probs_lose": 0.4,
            }
            for i in range(rows)
        ]
    )


def run_variant(variant: str, model: str, args) -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from sppo_cli.config import TrainConfig
    from sppo_cli.train import lora_config, to_trainer_format
    from sppo_cli.trainer import SPPOConfig, SPPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, report_to=[],
                  save_strategy="no", gradient_checkpointing=False, learning_rate=1e-5, max_length=1024,
                  logging_steps=1000, disable_tqdm=True, bf16=torch.cuda.is_available())
    dataset = to_trainer_format(rankings(args.rows, args.response_tokens))
    tokenizer = AutoTokenizer.from_pretrained(model)
    if variant == "trl-sppo_hard":
        trainer = DPOTrainer(model=model, args=DPOConfig(loss_type=["sppo_hard"], beta=0.001, **common),
                             train_dataset=dataset, processing_class=tokenizer)
    else:
        config = SPPOConfig(precompute_ref_log_probs=variant == "sppo-precomp", **common)
        lora = lora_config(TrainConfig(lora_r=16, lora_alpha=32)) if variant == "sppo-lora" else None
        trainer = SPPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora)
    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(timer.times[1:]), "peak_mb": peak_mb, "steps": len(timer.times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--model", help="An existing model directory instead of a tiny one.")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one child run
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args)))
        return
    if args.model is None:
        from sppo_cli.tiny import build_tiny_model

        args.model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "model", 0, args.hidden_size, args.layers))
    results = {}
    for variant in VARIANTS:
        child = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        if "--model" not in sys.argv:
            child += ["--model", args.model]
        output = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
        print(f"  measured {variant}", file=sys.stderr)

    base = results["sppo"]
    print(f"model {args.model} | rows {args.rows} | batch {args.batch_size} | ~{args.response_tokens} tokens/response")
    print(f"{'variant':<15}{'step s':>9}{'x sppo':>8}{'peak MB':>10}{'x sppo':>8}")
    for variant, r in results.items():
        print(f"{variant:<15}{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>8.2f}"
              f"{r['peak_mb']:>10.0f}{r['peak_mb'] / base['peak_mb']:>8.2f}")


if __name__ == "__main__":
    main()
