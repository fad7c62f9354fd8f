"""Train image classifiers in generations with a tolerant teacher (Yang et al., AAAI 2019).

    accelerate launch fasttt/train.py recipes/digits_d06.toml              # 1 CPU or 1 GPU
    accelerate launch --num_processes 8 fasttt/train.py R.toml             # 8 GPUs
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip H \\
        --num_processes 16 fasttt/train.py R.toml                          # 2 nodes x 8 GPUs
    python fasttt/train.py R.toml --set schedule.epochs=2 --runs-dir /tmp/runs

The outline of the method: a patriarch learns from labels with a softened objective
(TSD, LSR or CP; CE for the baseline), then each generation m = 1..M trains a student
of the same architecture from scratch on labels plus its teacher, the LAST-epoch
weights of generation m-1. Rerunning the same command resumes where a run stopped; a
finished generation is never retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch fasttt/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.table import Table

from fasttt.analysis import analyze_run
from fasttt.cache import CachedTeacher, build_cache, expected_manifest
from fasttt.checkpoint import drop_checkpoints
from fasttt.data import MANIFEST, read_manifest
from fasttt.engine import (
    GenerationSpec,
    OnlineTeacher,
    is_finished,
    last_epoch_model,
    train_generation,
)
from fasttt.errors import UserError, exit_on_user_error
from fasttt.losses import patriarch_objective, student_objective
from fasttt.recipe import Recipe, load_recipe
from fasttt.report import write_report
from fasttt.rundir import check_inputs, lock_run_dir, prepare_run_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    """RECIPE.toml [--set section.key=value ...] [--runs-dir DIR]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    return parser.parse_args(argv)


def ensure_betons(recipe: Recipe, accelerator: Accelerator) -> dict:
    """The beton manifest; the embedded digits betons are built on first use."""
    beton_dir = Path(recipe.data.beton_dir)
    if recipe.data.builtin == "digits" and not (beton_dir / MANIFEST).is_file():
        from beton_builders.__main__ import main as build

        on_main_process(accelerator, build, ["digits", str(beton_dir)])
    return read_manifest(beton_dir)


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


def make_accelerator(recipe: Recipe, console: Console) -> Accelerator:
    """Accelerate with the recipe's precision; on a CPU, full precision (bf16 there is slow)."""
    precision, gpu = recipe.run.mixed_precision, torch.cuda.is_available()
    # cpu=True is what lets Accelerate join several CPU processes with gloo (MULTI_CPU);
    # without it, processes started by torchrun each train alone.
    accelerator = Accelerator(mixed_precision=precision if gpu else "no", cpu=not gpu)
    if gpu:  # fixed shapes: let cuDNN pick its fastest kernels; TF32 for float32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not gpu and precision != "no" and accelerator.is_main_process:
        console.print(f"no GPU: training in float32 instead of {precision}")
    return accelerator


def accelerator_and_console(recipe: Recipe) -> tuple[Accelerator, Console]:
    """The run's Accelerator, and a console that only the main process prints to."""
    console = Console()
    accelerator = make_accelerator(recipe, console)
    return accelerator, console if accelerator.is_main_process else Console(quiet=True)


def precompute_cache(gen_dir: Path, recipe: Recipe, accelerator: Accelerator) -> dict:
    """Build (or verify) gen_dir/cache from its last epoch; return the cache's manifest."""
    num_classes = len(read_manifest(recipe.data.beton_dir)["class_names"])
    wanted = expected_manifest(recipe, gen_dir / "last.safetensors", num_classes)
    if not (gen_dir / "cache" / "manifest.json").is_file():
        model = last_epoch_model(gen_dir, recipe, num_classes, accelerator.device)
        build_cache(gen_dir / "cache", model, wanted, recipe, accelerator)
    return wanted


def teacher_from(previous: Path, recipe: Recipe, num_classes: int,
                 accelerator: Accelerator) -> tuple[object, int]:
    """Generation m-1 as the student's teacher, and the student's view cycle R.

    precomputed: a lookup into previous/cache (built first if needed); online: the
    frozen model labelling each batch.
    """
    if recipe.cache.mode == "online":
        return OnlineTeacher(last_epoch_model(previous, recipe, num_classes,
                                             accelerator.device)), 0
    wanted = precompute_cache(previous, recipe, accelerator)
    return CachedTeacher(previous / "cache", wanted, accelerator.device), recipe.cache.views


def print_generations(results: list[dict], console: Console) -> None:
    """One row per finished generation: best and last epoch accuracies."""
    table = Table(title="generations")
    for column in ("gen", "best epoch", "best top-1", "last top-1", "last top-5"):
        table.add_column(column, justify="right")
    for m, r in enumerate(results):
        table.add_row(str(m), str(r["best"]["epoch"]), f"{r['best']['val_top1']:.2f}",
                      f"{r['last']['val_top1']:.2f}", f"{r['last']['val_top5']:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Train the patriarch and its students, then analyse the run and write its report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.recipe, args.set)
    accelerator, console = accelerator_and_console(recipe)
    run_dir = args.runs_dir / recipe.run.name
    lock = on_main_process(accelerator, lock_run_dir, run_dir)  # held until the process ends
    on_main_process(accelerator, prepare_run_dir, run_dir, recipe)
    manifest = ensure_betons(recipe, accelerator)
    on_main_process(accelerator, check_inputs, run_dir, Path(recipe.data.beton_dir), manifest)
    num_classes = len(manifest["class_names"])
    method = recipe.generations
    results = []
    for m in range(method.students + 1):
        directory = run_dir / f"gen{m}"
        if is_finished(directory):
            console.print(f"gen{m}: finished earlier, kept")
            on_main_process(accelerator, drop_checkpoints, directory)  # a kill's leftovers
            results.append(read_json(directory / "eval.json"))
            continue
        if m == 0:  # the patriarch learns from labels with the softened objective
            spec = GenerationSpec(0, directory, patriarch_objective(
                method.patriarch_loss, method.u, method.k, method.eta))
        else:  # a student learns from labels and generation m-1's last epoch
            teacher, cycle = teacher_from(run_dir / f"gen{m - 1}", recipe, num_classes,
                                          accelerator)
            spec = GenerationSpec(m, directory, student_objective(method.lam, method.temperature),
                                  teacher, cycle)
        results.append(train_generation(spec, recipe, num_classes, accelerator, console))
        print_generations(results, console)
    analyze_run(run_dir, recipe, accelerator, console)
    report = on_main_process(accelerator, write_report, run_dir, console)
    console.print(f"report: {report}")
    del lock


def read_json(path: Path) -> dict:
    """A JSON file written by this run."""
    return json.loads(path.read_text())


if __name__ == "__main__":
    exit_on_user_error(main)
