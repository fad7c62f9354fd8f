"""Experiment trackers, through Accelerate: one tracker run per generation.

Each generation is a run named gen<m> in the project named after the fasttt run, with the
resolved recipe (and the generation) as its hyperparameters and one point per epoch of
every metric in metrics.jsonl, so a whole run shows its generations side by side. Local
trackers write under the generation's directory, and live and die with it: TensorBoard
in gen<m>/ itself, one event file of scalars and hyperparameters (so `tensorboard --logdir
runs` names it <name>/gen<m>), the others (Aim, ...) under gen<m>/tracking/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker, get_available_trackers, on_main_process
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from fasttt.errors import UserError
from fasttt.recipe import Recipe

TRACKING = "tracking"
# How each tracker names a run inside its project (Accelerate passes these through).
RUN_NAME_ARGUMENT = {"wandb": "name", "mlflow": "run_name", "trackio": "name",
                     "swanlab": "experiment_name"}
# The metrics TensorBoard's HParams dashboard shows next to each generation's hyperparameters.
HPARAM_METRICS = ("val_top1", "val_loss", "train_loss")


class GenerationTensorBoard(TensorBoardTracker):
    """TensorBoard writing one generation's scalars and hyperparameters into one directory.

    Accelerate's writes into logging_dir/<project>, and its hyperparameters into another
    run, a subdirectory named by the time; here both go to `directory` itself.
    """

    def __init__(self, directory: Path):
        super().__init__("", directory)

    @on_main_process
    def start(self):
        self.logging_dir = str(self.logging_dir_param)
        self.writer = SummaryWriter(self.logging_dir)

    @on_main_process
    def store_init_configuration(self, values: dict):
        for summary in hparams(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


def check_trackers(names: tuple[str, ...]) -> None:
    """Refuse, in one line, trackers that are not installed (Accelerate would skip them)."""
    available = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        kept = ", ".join(json.dumps(name) for name in names if name not in missing)
        raise UserError(f"run.log_with names {', '.join(missing)}, not installed here: "
                        f"pip install {' '.join(missing)}, or leave it out "
                        f"(--set 'run.log_with=[{kept}]')")


def hyperparameters(recipe: Recipe, generation: int) -> dict:
    """The resolved recipe as flat `section.key` hyperparameters, plus the generation."""
    flat = {"generation": generation}
    for section in dataclasses.fields(recipe):
        for key, value in dataclasses.asdict(getattr(recipe, section.name)).items():
            flat[f"{section.name}.{key}"] = (
                ", ".join(map(str, value)) if isinstance(value, tuple | list) else value)
    return flat


@contextlib.contextmanager
def generation_trackers(accelerator: Accelerator, project: str, generation: int,
                        config: dict, directory: Path):
    """Trackers open for one generation's epochs (`accelerator.log` goes to them).

    `project` is the run's name, `config` the generation's `hyperparameters`.
    """
    if not accelerator.log_with:
        yield
        return
    accelerator.project_configuration.logging_dir = str(directory / TRACKING)
    run_name, named = f"gen{generation}", accelerator.log_with
    # TensorBoard's tracker, given ready-made: Accelerate starts it like its own
    accelerator.log_with = [GenerationTensorBoard(directory) if str(t) == "tensorboard" else t
                            for t in named]
    try:
        accelerator.init_trackers(
            project, config,
            {tracker: {argument: run_name} for tracker, argument in RUN_NAME_ARGUMENT.items()})
    finally:
        accelerator.log_with = named
    try:
        yield
    finally:  # Accelerate's end_training would also end the process group: only close these
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()
