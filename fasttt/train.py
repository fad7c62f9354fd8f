"""Train image classifiers in generations with a tolerant teacher (Yang et al., AAAI 2019).

    accelerate launch fasttt/train.py recipes/digits_d06.toml              # 1 CPU or 1 GPU
    accelerate launch --num_processes 8 fasttt/train.py R.toml             # 8 GPUs
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip H \\
        --num_processes 16 fasttt/train.py R.toml                          # 2 nodes x 8 GPUs
    python fasttt/train.py R.toml --set schedule.epochs=2 --runs-dir /tmp/runs

The outline of the method: a patriarch learns from labels with a softened objective
(TSD, LSR or CP; CE for the baseline), then each generation m = 1..M trains a student
of the same architecture from scratch on labels plus its teacher, the LAST-epoch
weights of generation m-1, on views of its own. Rerunning the same command resumes
where a run stopped; a finished generation is never retrained. A run may instead adopt
another run's finished generation as its teacher (generations.teacher) and train
students only, and may stop early when a holdout says the generations saturate
(generations.stop).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch fasttt/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fasttt.errors import exit_at_once_on_interrupt

    exit_at_once_on_interrupt()  # a signal during the imports below is no traceback

from accelerate import Accelerator
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from beton_builders.digits import build_digits_dir
from fasttt.adopt import Adopted, adopt_teacher, adopted_teacher
from fasttt.analysis import analyze_run
from fasttt.cache import check_cache_serves, drop_used_caches
from fasttt.checkpoint import drop_checkpoints
from fasttt.data import check_fits, ensure_betons, sequential_loaders_reused
from fasttt.engine import train_generation
from fasttt.errors import (
    OneLineParser,
    exit_at_once_on_interrupt,
    exit_on_user_error,
    ignore_signals_once_complete,
    results_complete,
)
from fasttt.generation import plan_generation
from fasttt.models import check_model_name, compiled_so_far, decide_compile
from fasttt.processes import accelerator_and_console, finish, on_main_process
from fasttt.progress import duration, log_line
from fasttt.recipe import Recipe, load_recipe
from fasttt.report import write_report
from fasttt.rundir import (
    claim_run_dir,
    generation_dir,
    generation_weights,
    is_finished,
    lock_run_dir,
    read_eval,
)
from fasttt.stopping import judge_generation
from fasttt.tracking import generation_trackers, hyperparameters

USAGE = "fasttt/train.py RECIPE.toml [--set SECTION.KEY=VALUE ...] [--runs-dir DIR]"


def parse_args(argv: list[str]):
    """RECIPE.toml [--set section.key=value ...] [--runs-dir DIR]."""
    parser = OneLineParser(description=__doc__.splitlines()[0], usage_line=USAGE)
    parser.add_argument("recipe", type=Path, metavar="RECIPE.toml",
                        help="the recipe: a TOML file of the keys fasttt/recipe.py documents")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe key, e.g. --set schedule.epochs=30 (repeatable)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), metavar="DIR",
                        help="where the run directory DIR/<run.name> goes (default: runs)")
    return parser.parse_args(argv)


def print_generations(results: list[dict], console: Console) -> None:
    """One row per finished generation: best and last epoch accuracies."""
    table = Table(title="generations")
    for column in ("gen", "best epoch", "best top-1", "last top-1", "last top-5"):
        table.add_column(column, justify="right")
    for m, r in enumerate(results):
        table.add_row(str(m), str(r["best"]["epoch"]), f"{r['best']['val_top1']:.2f}",
                      f"{r['last']['val_top1']:.2f}", f"{r['last']['val_top5']:.2f}")
    console.print(table)


def train_generations(run_dir: Path, recipe: Recipe, num_classes: int, adopted: Adopted | None,
                      accelerator: Accelerator, console: Console) -> None:
    """The patriarch, then each student taught by the generation before; finished ones kept.

    With data.holdout, each generation is judged on the holdout once it has finished; the
    saturation rule (generations.stop) may end the run before the last planned student.
    """
    results, trained, compiled_before = [], 0, compiled_so_far()
    for m in range(recipe.generations.students + 1):
        directory = generation_dir(run_dir, m)
        if m == 0 and adopted is not None:
            log_line(console, f"gen0: {adopted.describe()}, adopted as the teacher")
            results.append(read_eval(run_dir, 0))
        elif is_finished(directory):
            console.print(f"gen{m}: finished earlier, kept")
            generation_weights(run_dir, m)  # there and whole, or a one-line refusal
            on_main_process(accelerator, drop_checkpoints, directory)  # a kill's leftovers
            results.append(read_eval(run_dir, m))
        else:
            spec = plan_generation(run_dir, m, recipe, num_classes, adopted, accelerator,
                                   console)
            with generation_trackers(accelerator, recipe.run.name, m,
                                     hyperparameters(recipe, m), directory):
                results.append(train_generation(spec, recipe, num_classes, accelerator,
                                                console))
            trained += 1
            print_generations(results, console)
        if recipe.cache.keep == "last":
            freed = on_main_process(accelerator, drop_used_caches, run_dir)
            if freed:
                log_line(console, f"cache.keep = \"last\": freed {decimal(freed)} of teacher "
                                  "caches whose students have finished")
        if recipe.data.holdout and judge_generation(run_dir, m, accelerator, console):
            break
    if recipe.run.compile is True and trained:  # every generation shares the graphs
        graphs, seconds = (now - before for now, before in zip(compiled_so_far(),
                                                               compiled_before, strict=True))
        users = " (their training steps)" if recipe.run.whole_step else " and their teachers"
        log_line(console, f"torch.compile ({recipe.run.compile_mode}): {graphs} graphs "
                          f"compiled in {duration(seconds)}, used by {trained} "
                          f"generation{'s' * (trained > 1)}{users}")


def main(argv: list[str] | None = None) -> None:
    """Train the patriarch and its students, then analyse the run and write its report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.recipe, args.set)
    check_model_name(recipe.model.name)  # here: a typo must not leave a run directory behind
    accelerator, console = accelerator_and_console(recipe.run.mixed_precision,
                                                   recipe.run.log_with,
                                                   args.runs_dir / recipe.run.name)
    manifest = ensure_betons(recipe.data, accelerator, build_digits_dir)
    check_fits(manifest, recipe.data, recipe.augment, k=recipe.generations.k,
               batch_size=recipe.optim.batch_size, processes=accelerator.num_processes)
    check_cache_serves(recipe.cache, recipe.generations.temperature,
                       len(manifest["class_names"]))
    run_dir = args.runs_dir / recipe.run.name
    lock = on_main_process(accelerator, lock_run_dir, run_dir)
    try:
        on_main_process(accelerator, claim_run_dir, run_dir, recipe,
                        Path(recipe.data.beton_dir), manifest)
        if recipe.generations.teacher:
            on_main_process(accelerator, adopt_teacher, run_dir, recipe.generations.teacher,
                            recipe.model.name, recipe.data, manifest)
        adopted = adopted_teacher(run_dir) if recipe.generations.teacher else None
        # recipe.toml keeps "auto": decided per machine, for this process's training only
        recipe = dataclasses.replace(recipe, run=decide_compile(recipe.run, recipe.augment.kind,
                                                                accelerator.device))
        with sequential_loaders_reused():
            train_generations(run_dir, recipe, len(manifest["class_names"]), adopted,
                              accelerator, console)
            analyze_run(run_dir, accelerator, console)
        report = on_main_process(accelerator, write_report, run_dir, console)
        results_complete()  # a signal from here on cuts nothing short (fasttt/errors.py)
        console.print(f"report: {report}")
        finish(accelerator)
    finally:
        if lock is not None:  # held by the main process until the run ends, however it ends
            lock.close()


if __name__ == "__main__":
    exit_at_once_on_interrupt()  # also for `python -m fasttt.train`, as the interpreter exits
    try:
        exit_on_user_error(main)
    finally:
        ignore_signals_once_complete()  # a complete run ends quietly, with status 0
