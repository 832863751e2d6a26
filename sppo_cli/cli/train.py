from sppo_cli.cli.options import report, required, stage_command
from sppo_cli.config import TrainConfig

MODEL = required("model", "Policy to train; also the frozen reference.")
DATA = required("data", "Output directory of `sppo rank`, or a dataset in the published SPPO format.")


@stage_command(TrainConfig, MODEL, DATA)
def train(config: TrainConfig, model: str, data: str, output, overwrite: bool, verbose: bool):
    """Train the policy on the rankings with the SPPO loss; re-running an interrupted run resumes it."""
    from sppo_cli.train import train as run

    manifest, done = run(model, data, output, config, overwrite, verbose)
    dropped = manifest.get("dropped_prompt_too_long")
    dropped = f", {dropped} rows left out (prompt fills --max-length)" if dropped else ""
    report(output, done, f"{manifest['steps']} steps{dropped}{_progress(manifest)}, {manifest['seconds']:.1f} s")


def _progress(manifest: dict) -> str:
    """At the last step: the log-ratios against their targets, which show progress when the loss cannot (README)."""
    progress = manifest.get("final_progress")
    if progress:
        return (f"; at the last step: log-ratio of chosen {progress['logratios/chosen']:+.3g} (target "
                f"{progress['targets/chosen']:+.3g}), of rejected {progress['logratios/rejected']:+.3g} (target "
                f"{progress['targets/rejected']:+.3g}), {progress['logratios/toward_target']:.0%} toward their "
                f"targets, drift {progress['logratios/drift']:+.3g}")  # fmt: skip
    return f", final train loss {manifest['final_loss']:.4g}" if manifest.get("final_loss") is not None else ""
