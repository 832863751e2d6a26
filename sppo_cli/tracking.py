"""An evaluation's metrics, logged to the trackers training reports to (training logs through transformers' own
integrations): tensorboard event files in the output's `runs/`, and a Weights & Biases run named `run_name`, in the
group WANDB_RUN_GROUP names (pipeline.sh sets it, so that one pipeline run's stages sit side by side)."""

from pathlib import Path

from sppo_cli.errors import SppoError


def log_metrics(directory: Path, metrics: dict, report_to: str, run_name: str | None, settings: dict) -> None:
    scalars = {f"eval/{name}": value for name, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}  # fmt: skip
    for tracker in (name.strip() for name in report_to.split(",")):  # those of config.EVAL_TRACKERS
        if tracker == "tensorboard":
            _tensorboard(directory / "runs" / (run_name or "eval"), scalars)
        elif tracker == "wandb":
            _wandb(run_name, scalars, settings)


def _tensorboard(directory: Path, scalars: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        for name, value in scalars.items():
            writer.add_scalar(name, value, 0)


def _wandb(run_name: str | None, scalars: dict, settings: dict) -> None:
    try:
        import wandb
    except ImportError:
        raise SppoError("report_to wandb needs wandb: pip install wandb") from None
    run = wandb.init(name=run_name, job_type="eval", config=settings, reinit="create_new")
    run.log(scalars)
    run.finish()


def finish_training_runs(report_to: str) -> None:
    """End the run transformers' integration opened for training, as each stage is a run of its own."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.run.finish()
