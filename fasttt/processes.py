"""The processes of a run: the Accelerator, a console only the main process prints to, and
work done once on the main process whose refusal every process sees."""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    asked = launch_request()
    if accelerator.num_processes == 1 and (asked.processes > 1 or asked.machines > 1):
        raise UserError(one_process_advice(asked, parse_flag_from_env("ACCELERATE_USE_CPU")))
    if gpu:  # fixed shapes: let cuDNN pick its fastest kernels; TF32 for float32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not gpu and mixed_precision != "no" and accelerator.is_main_process:
        console.print(f"training on the CPU: float32 instead of {mixed_precision}")
    return accelerator


@dataclass(frozen=True)
class LaunchRequest:
    """What `accelerate launch` was asked for on its command line; 0 / "" where not given."""

    processes: int = 0
    machines: int = 0
    machine_rank: str = ""
    main_process_ip: str = ""
    main_process_port: str = ""


def launch_request(argv: list[str] | None = None) -> LaunchRequest:
    """The processes and machines `accelerate launch` was given, read from the parent process
    (Linux /proc; elsewhere, or under another parent, nothing asked)."""
    if argv is None:
        try:
            argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            return LaunchRequest()
    if not any(a.endswith(("accelerate", "accelerate.commands.launch")) for a in argv[:3]):
        return LaunchRequest()

    def flag(name: str) -> str:
        for i, arg in enumerate(argv):
            if arg.startswith(f"--{name}="):
                return arg.split("=", 1)[1]
            if arg == f"--{name}" and i + 1 < len(argv):
                return argv[i + 1]
        return ""

    def count(name: str) -> int:
        value = flag(name)
        return int(value) if value.isdigit() else 0

    return LaunchRequest(count("num_processes"), count("num_machines"), flag("machine_rank"),
                         flag("main_process_ip"), flag("main_process_port"))


def one_process_advice(asked: LaunchRequest, cpu_asked: bool) -> str:
    """The refusal of a launch that started one process where several were asked, with the
    command that starts them: on the CPU only accelerate's --multi_gpu launcher (torchrun)
    starts several processes, on one machine or on several (gloo); --cpu starts one."""
    env = "ACCELERATE_USE_CPU=1 " if cpu_asked else ""  # else --multi_gpu takes the GPUs
    how = "with --cpu" if cpu_asked else "on a machine without GPUs"
    tail = "--mixed_precision no --dynamo_backend no fasttt/train.py RECIPE.toml"
    if asked.machines <= 1:
        return (f"accelerate launch was asked for {asked.processes} processes, but {how} it "
                f"starts one unless told --multi_gpu: run `{env}accelerate launch --multi_gpu "
                f"--num_processes {asked.processes} --num_machines 1 {tail}`")
    machines = asked.machines
    each = max(1, -(-asked.processes // machines))  # --num_processes counts every machine's
    port = f" --main_process_port {asked.main_process_port}" if asked.main_process_port else ""
    ip = asked.main_process_ip or "H"
    return (f"accelerate launch was asked for {machines} machines, but {how} it starts one "
            f"process on each, which trains alone: run `{env}accelerate launch --multi_gpu "
            f"--num_machines {machines} --num_processes {machines * each} --machine_rank "
            f"{asked.machine_rank or 'R'} --main_process_ip {ip}{port} {tail}` on each of the "
            f"{machines} machines, with its own --machine_rank from 0 to {machines - 1} (0 on "
            f"{'the main machine, H its address' if ip == 'H' else ip}): {each} "
            f"process{'es' if each > 1 else ''} per machine, joined with gloo")


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
