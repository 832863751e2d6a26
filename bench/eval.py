"""Seconds of the evaluations of a pipeline run: `sppo eval` as pipeline.sh runs it, against sampling every side
every time.

    python bench/eval.py [--iterations 3 --prompts 32 -k 2 --max-new-tokens 48 --hidden-size 256 --layers 4]
                         [--backend transformers] [--ranker pairrm|rule:math]

One random Llama per iteration (sppo_cli.tiny; model 0 is the base) answers the same held-out prompts, and a tiny
random PairRM judges (or rule:math, which costs nothing). Both ways run the evaluations of T iterations, each model
against the base model and, from iteration 2, against the model before, in this process, one after the other:
  ours     the base model against itself once (its responses sampled once; identical responses tie without the
           judge), then for each iteration: the model sampled and judged against the base model's reused responses,
           and the comparison with the model before judged on both sides' reused responses, nothing sampled again
  naive    every evaluation samples both of its models, as an evaluation script run per pair of checkpoints does
Both end with the same verdicts on the same pairs (checked). "samples" counts responses drawn.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sppo_cli.config import EvalConfig
from sppo_cli.data import load_stage
from sppo_cli.eval import evaluate
from sppo_cli.rankers.pairrm import build_tiny_pairrm
from sppo_cli.tiny import build_tiny_model, corpus


def write_prompts(path: Path, count: int) -> Path:
    words = " ".join(corpus()).split()
    rows = [{"prompt": " ".join(words[(7 * i + j) % len(words)] for j in range(20)) + "?", "answer": str(i)}
            for i in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def timed(runs: list[tuple[str, str, str | None]], root: Path, config: EvalConfig) -> tuple[float, int, dict]:
    """Run the evaluations (model, baseline, prompts) into root/0, root/1, ...: seconds, samples drawn, verdicts."""
    started, samples, verdicts = time.perf_counter(), 0, {}
    for index, (model, baseline, prompts) in enumerate(runs):
        output = root / str(index)
        evaluate(model, baseline, prompts, output, config)
        sampled = [side for side in (model, baseline) if not (Path(side) / "manifest.json").exists()]
        samples += len(set(sampled)) * config.num_samples * len(load_stage(output)[0])
        verdicts[index] = load_stage(output)[0]["judgements"]
    return time.perf_counter() - started, samples, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("-k", "--num-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--ranker", default="pairrm", help="pairrm (a tiny random one), or rule:math")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = [str(build_tiny_model(root / f"model{t}", seed=t, hidden_size=args.hidden_size,
                                       num_layers=args.layers)) for t in range(args.iterations + 1)]  # fmt: skip
        ranker = str(build_tiny_pairrm(root / "pairrm")) if args.ranker == "pairrm" else args.ranker
        prompts = str(write_prompts(root / "heldout.jsonl", args.prompts))
        config = EvalConfig(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, backend=args.backend,
                            ranker=ranker, report_to="none", batch_size=16)  # fmt: skip
        evaluate(models[0], models[0], prompts, root / "warm-up", config)  # loads and compiles once, untimed

        ours = [(models[0], models[0], prompts)]  # as pipeline.sh: iter0/eval, iter{t}/eval, iter{t}/eval-previous
        naive, against_base = [], {0: str(root / "ours" / "0")}  # iteration -> its evaluation against the base
        for t in range(1, args.iterations + 1):
            against_base[t] = str(root / "ours" / str(len(ours)))
            ours.append((models[t], against_base[0], None))
            naive.append((models[t], models[0], prompts))
            if t > 1:
                ours.append((against_base[t], against_base[t - 1], None))
                naive.append((models[t], models[t - 1], prompts))
        ours_seconds, ours_samples, ours_verdicts = timed(ours, root / "ours", config)
        naive_seconds, naive_samples, naive_verdicts = timed(naive, root / "naive", config)

    same = list(ours_verdicts.values())[1:] == list(naive_verdicts.values())
    print(f"{args.iterations} iterations, {args.prompts} prompts, K = {args.num_samples}, up to {args.max_new_tokens} "
          f"new tokens, Llama hidden {args.hidden_size} x {args.layers} layers, {args.backend}, judge {args.ranker}; "
          f"same verdicts: {same}")  # fmt: skip
    print("| | evaluations | responses sampled | seconds | vs ours |")
    print("|---|---|---|---|---|")
    print(f"| ours (pipeline.sh) | {len(ours)} | {ours_samples} | {ours_seconds:.1f} | 1.00 |")
    print(f"| naive (sample both sides) | {len(naive)} | {naive_samples} | {naive_seconds:.1f} | "
          f"{naive_seconds / ours_seconds:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
