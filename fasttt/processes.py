"""The processes of a run: the Accelerator, a console only the main process prints to, and
work done once on the main process whose refusal every process sees."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from rich.console import Console

from fasttt.errors import UserError
from fasttt.tracking import check_trackers


def make_accelerator(mixed_precision: str, console: Console, log_with: tuple[str, ...] = (),
                     run_dir: Path | None = None) -> Accelerator:
    """Accelerate with the recipe's precision (on a CPU, full precision: bf16 there is slow)
    and the run's trackers (fasttt/tracking.py opens them per generation)."""
    check_trackers(log_with)
    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU: then the CPU trains, as without a GPU
    gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    # cpu=True is what lets Accelerate join several CPU processes with gloo (MULTI_CPU);
    # without it, processes started by torchrun each train alone.
    accelerator = Accelerator(mixed_precision=mixed_precision if gpu else "no", cpu=not gpu,
                              log_with=list(log_with) or None, project_dir=run_dir)
    asked = launched_processes()
    if asked > accelerator.num_processes == 1:
        raise UserError(f"accelerate launch was asked for {asked} processes, but on a machine "
                        "without GPUs it starts one unless told --multi_gpu: run `accelerate "
                        f"launch --multi_gpu --num_processes {asked} --num_machines 1 "
                        "--mixed_precision no --dynamo_backend no fasttt/train.py RECIPE.toml`")
    if gpu:  # fixed shapes: let cuDNN pick its fastest kernels; TF32 for float32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not gpu and mixed_precision != "no" and accelerator.is_main_process:
        console.print(f"training on the CPU: float32 instead of {mixed_precision}")
    return accelerator


def launched_processes() -> int:
    """The --num_processes `accelerate launch` was given, read from the parent process; 0 if
    the parent is not accelerate's launcher (Linux /proc; elsewhere 0)."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return 0
    if not any(a.endswith(("accelerate", "accelerate.commands.launch")) for a in argv[:3]):
        return 0
    for i, arg in enumerate(argv[:-1]):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else (
            argv[i + 1] if arg == "--num_processes" else "")
        if value.isdigit():
            return int(value)
    return 0


def accelerator_and_console(mixed_precision: str, log_with: tuple[str, ...] = (),
                            run_dir: Path | None = None) -> tuple[Accelerator, Console]:
    """The run's Accelerator, and a console that only the main process prints to."""
    console = Console()
    accelerator = make_accelerator(mixed_precision, console, log_with, run_dir)
    return accelerator, console if accelerator.is_main_process else Console(quiet=True)


def on_main_process(accelerator: Accelerator, work, *args):
    """Run `work` on the main process only; its refusal is raised on every process.

    A refusal seen by one rank alone would leave the others waiting for it forever.
    """
    result, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            result = work(*args)
        except UserError as err:
            refusal = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise UserError(refusal[0])
    return result


def main_value(accelerator: Accelerator, value):
    """The main process's `value` (picklable) on every process: one decision for all ranks."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def finish(accelerator: Accelerator) -> None:
    """End the run's processes cleanly: trackers closed, the process group destroyed.

    A process group left to the interpreter's exit can abort one rank (`terminate called
    without an active exception`) after the run finished, and a scheduler marks it failed.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
