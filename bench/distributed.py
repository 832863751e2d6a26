"""Generation spread over workers: local worker processes against Ray actors, and Ray's cost per shard.

    python bench/distributed.py [--model DIR | --hidden-size 256 --layers 4] [--prompts 96 --shard-size 8]
                                [-k 4 --max-new-tokens 64 --workers 2]

On the same model, prompts and shards, measured one after the other in this process (`sppo generate`'s own
`sample`, transformers backend, so each worker starts in seconds):
  local x1      one process, no workers
  local xN      N data-parallel worker processes (--data-parallel-size N)
  ray x1, xN    1 and N actors of a Ray cluster started here (--ray-address), one CPU each
Each run includes its workers' start (importing torch, loading the model), as a user's run does. Then the cost of
Ray's scheduling alone: the same shards with work that does nothing, per shard. Every run's samples are checked to
be the same as the one-process run's. Needs `pip install '.[ray]'`.
"""

import argparse
import contextlib
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: build a random Llama of the size below)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("-k", "--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--empty-shards", type=int, default=200, help="shards of the scheduling measurement")
    return parser.parse_args()


@contextlib.contextmanager
def nothing():
    from sppo_cli.stage import PER_ROW

    yield lambda shard: {PER_ROW: {"row": [None] * shard.size}}


def main() -> None:
    args = parse_args()
    import ray
    from datasets import Dataset

    from sppo_cli.cluster import run_on_ray
    from sppo_cli.config import GenerateConfig
    from sppo_cli.generate import sample
    from sppo_cli.logs import ProgressBar
    from sppo_cli.stage import Shard
    from sppo_cli.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or str(build_tiny_model(scratch / "model", 0, args.hidden_size, args.layers))
        texts = [f"Question {i}: tell me about fruit." for i in range(args.prompts)]
        prompts = Dataset.from_list([{"prompt": p, "conversation": [{"role": "user", "content": p}]} for p in texts])
        config = GenerateConfig(backend="transformers", num_samples=args.num_samples,
                                max_new_tokens=args.max_new_tokens, shard_size=args.shard_size)  # fmt: skip
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        setups = {"local x1": config, f"local x{args.workers}": replace(config, data_parallel_size=args.workers),
                  "ray x1": replace(config, ray_address="auto"),
                  f"ray x{args.workers}": replace(config, ray_address="auto", data_parallel_size=args.workers)}
        results, reference = {}, None
        for name, setup in setups.items():
            started = time.perf_counter()
            generations, stats = sample(model, prompts, setup, scratch / name.replace(" ", ""), name)
            results[name] = (stats["generated_tokens"], time.perf_counter() - started)
            reference = reference or generations["response_token_ids"]
            assert generations["response_token_ids"] == reference, f"{name} sampled other responses"

        shards = [Shard(i, i, i + 1) for i in range(args.empty_shards)]
        overhead = {}
        for replicas in (1, args.workers):
            directory = scratch / f"empty{replicas}"
            directory.mkdir()
            with ProgressBar(f"ray x{replicas}, empty shards", len(shards)) as bar:
                started = time.perf_counter()
                run_on_ray("auto", directory, shards, nothing, bar.update, replicas)
                overhead[replicas] = (time.perf_counter() - started) / len(shards)
        ray.shutdown()

    print(f"\n{os.cpu_count()} CPU cores; {args.prompts} prompts in shards of {args.shard_size}, K={args.num_samples}, "
          f"up to {args.max_new_tokens} new tokens; random Llama hidden {args.hidden_size} x {args.layers} layers")
    base = results["local x1"][0] / results["local x1"][1]
    print(f"{'':<12}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'vs local x1':>13}")
    for name, (tokens, seconds) in results.items():
        print(f"{name:<12}{tokens:>9}{seconds:>9.2f}{tokens / seconds:>10.0f}{tokens / seconds / base:>13.2f}")
    for replicas, seconds in overhead.items():
        print(f"Ray scheduling, {replicas} actor(s): {seconds * 1000:.1f} ms per shard (work that does nothing, "
              "including the actors' start)")


if __name__ == "__main__":
    main()
