"""Planning one generation: the views it trains on, its objective and its teacher.

The one place a generation is assembled from the recipe. train.py trains what
`plan_generation` returns, the cache command builds the cache a student's teacher will
read (`generation_views`, `teacher_weights`), the report names the views, and the
benchmarks time the same plan and objectives (`generation_objective`). Training reads
generations.temperature here alone: it reaches the student's loss and the teacher (the
log-partition its answers carry; a cache's CacheSpec holds it), which must agree.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from rich.console import Console

from fasttt.adopt import Adopted
from fasttt.augment import generation_key
from fasttt.cache import QUIET, ensure_cache, open_teacher
from fasttt.engine import GenerationSpec, Objective
from fasttt.losses import patriarch_objective, student_objective
from fasttt.models import last_epoch_model
from fasttt.recipe import GenerationsConfig, Recipe
from fasttt.rundir import generation_dir, generation_weights, teacher_cache
from fasttt.teachers import OnlineTeacher, ViewSchedule, view_schedule


def generation_views(recipe: Recipe, m: int, adopted: Adopted | None = None) -> ViewSchedule:
    """The views generation m trains on, which its teacher labels.

    The first student of an adopted teacher sees the views the teacher's run chose for
    its own student, so that it reads the cache beside the teacher's weights.
    """
    seed, generation = ((adopted.seed, adopted.generation + 1) if m == 1 and adopted
                        else (recipe.run.seed, m))
    return view_schedule(seed, generation, recipe.schedule.epochs, recipe.augment,
                         recipe.cache)


def teacher_weights(run_dir: Path, m: int, adopted: Adopted | None) -> tuple[Path, Path | None]:
    """Generation m's teacher's verified weights, and the other run that owns them (or None)."""
    if m == 1 and adopted is not None:
        return adopted.weights(), adopted.run_dir
    return generation_weights(run_dir, m - 1), None


def generation_objective(method: GenerationsConfig, m: int) -> Objective:
    """Generation m's loss: the patriarch's softened one from labels, or a student's."""
    if m == 0:
        return patriarch_objective(method.patriarch_loss, method.u, method.k, method.eta)
    return student_objective(method.lam, method.temperature)


def plan_generation(run_dir: Path, m: int, recipe: Recipe, num_classes: int,
                    adopted: Adopted | None, accelerator: Accelerator,
                    console: Console = QUIET) -> GenerationSpec:
    """Generation m's objective, views and teacher (generation m-1's last epoch)."""
    method, views = recipe.generations, generation_views(recipe, m, adopted)
    directory = generation_dir(run_dir, m)
    if m == 0:  # the patriarch learns from labels with the softened objective
        return GenerationSpec(0, directory, generation_objective(method, 0), views)
    # a student learns from labels and its teacher's last epoch, on its own views
    console.print(f"gen{m}: {views.describe()}")
    temperature = method.temperature
    weights, owner = teacher_weights(run_dir, m, adopted)
    if recipe.cache.mode == "online":
        model = last_epoch_model(weights, recipe.model, recipe.run, num_classes,
                                 accelerator.device)
        teacher = OnlineTeacher(model, views, num_classes, temperature)
    else:
        spec = ensure_cache(weights, views, temperature, recipe, num_classes, accelerator,
                            console, owner)
        teacher = open_teacher(teacher_cache(weights), spec, accelerator.device)
    # an adopted teacher's views are keyed by its run; the batch order stays this run's
    order = generation_key(recipe.run.seed, m) if owner is not None else None
    return GenerationSpec(m, directory, generation_objective(method, m), views, teacher,
                          order_key=order)
