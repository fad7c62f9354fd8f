"""Teachers and the views they label: one view schedule, two ways to ask a teacher.

A generation's *view schedule* says which keyed view of every sample each of its epochs
shows: epoch e shows view e mod R (R = one per epoch unless the recipe stores fewer),
with the generation in the key, so each generation draws its own views. The student's
loop, the cache build and the online teacher all read it, so a teacher labels exactly
the pixels its student sees (or, by explicit choice, the un-augmented image).

Both teachers answer one question, "the teacher's output for these samples on view v",
in one format, a `TopKTeacher`: the k largest logits, their class ids and the
log-partition at the student's temperature (k = C keeps everything). The online
teacher runs its model on the view's pixels; the cached teacher (fasttt/cache.py, which
owns the cache's format) looks the rows up in a cache the online teacher filled, with no
model in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fasttt.augment import Keyed, eval_view, generation_key, train_size, train_view
from fasttt.errors import UserError
from fasttt.recipe import AugmentConfig, CacheConfig


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher's k largest logits per sample, their class ids and log-partition at temperature."""

    values: Tensor  # (B, k) teacher logits, float16 or float32, not divided by T
    ids: Tensor  # (B, k) integer class ids of `values`
    log_partition: Tensor  # (B,) float32 logsumexp(full teacher logits / temperature)
    temperature: float = 1.0  # the T log_partition was computed at; the student must match it

    def __post_init__(self):
        if self.values.dim() != 2 or self.values.shape != self.ids.shape:
            raise ValueError(f"values {tuple(self.values.shape)} and ids "
                             f"{tuple(self.ids.shape)} must be the same (B, k) shape")
        if self.log_partition.shape != self.values.shape[:1]:
            raise ValueError(f"log_partition {tuple(self.log_partition.shape)} must be "
                             f"({self.values.shape[0]},)")
        if self.ids.is_floating_point():
            raise ValueError(f"ids must be integer, got {self.ids.dtype}")

    def top1(self) -> tuple[Tensor, Tensor]:
        """The teacher's top class per sample and its probability at `temperature`."""
        best = self.values.float().max(dim=1, keepdim=True)
        ids = self.ids.gather(1, best.indices).squeeze(1)
        return ids, (best.values.squeeze(1) / self.temperature - self.log_partition).exp()

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
        """Keep the k largest of full (B, C) teacher logits."""
        if not 1 <= k <= logits.shape[1]:
            raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
        values, ids = top_logits(logits, k)
        log_partition = log_partitions(logits, (temperature,))[:, 0]
        return cls(values, ids, log_partition, float(temperature))


def top_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of (B, C) logits and their class ids; k = C keeps them all, unsorted."""
    logits = logits.detach()
    if k == logits.shape[1]:  # everything kept: no sort, class c sits in column c
        return logits, torch.arange(k, device=logits.device).expand_as(logits)
    return logits.topk(k, dim=1)


def log_partitions(logits: Tensor, temperatures) -> Tensor:
    """(B, len(temperatures)) float32 logsumexp(logits / T) of full (B, C) logits, per T."""
    logits = logits.detach().float()
    return torch.stack([torch.logsumexp(logits / t, dim=1) for t in temperatures], dim=1)


@dataclass(frozen=True)
class KeyedView:
    """One keyed view of a batch: the generation's key, the view's index and its size."""

    key: Keyed
    view: Keyed
    size: int

    def on(self, device: torch.device) -> KeyedView:
        """The key and view as device tensors: a compiled step takes them as inputs, so one
        graph serves every epoch and generation of a size (they draw the same views)."""
        return KeyedView(torch.full((), self.key, dtype=torch.int64, device=device),
                         torch.full((), self.view, dtype=torch.int64, device=device), self.size)


@dataclass(frozen=True)
class ViewSchedule:
    """Which keyed view each epoch of one generation shows, and the pixels of a view."""

    key: int  # generation_key(run seed, generation): keys the views and the batch order
    epochs: int
    count: int  # R, the recipe's cache.views: epoch e shows view e mod R
    augment: AugmentConfig
    unaugmented_teacher: bool = False  # the teacher labels one un-augmented view instead

    def view(self, epoch: int) -> int:
        """The student's view at `epoch`."""
        return epoch % self.count

    def teacher_view(self, epoch: int) -> int:
        """The stored teacher view that goes with the student's view at `epoch`."""
        return 0 if self.unaugmented_teacher else self.view(epoch)

    @property
    def stored(self) -> int:
        """How many views a teacher labels for this schedule (a cache's stored views)."""
        return 1 if self.unaugmented_teacher else self.count

    def keyed(self, view: int) -> KeyedView:
        """View `view` of this generation, at its size."""
        return KeyedView(self.key, view, train_size(view, self.augment))

    def pixels(self, images: Tensor, index: Tensor, keyed: KeyedView,
               extent: Tensor | None) -> Tensor:
        """The keyed view's pixels of each sample: the recipe's crop and flip, normalised."""
        return train_view(images, index, seed=keyed.key, view=keyed.view, size=keyed.size,
                          augment=self.augment, extent=extent)

    def student_pixels(self, images: Tensor, index: Tensor, epoch: int,
                       extent: Tensor | None) -> Tensor:
        """What the student sees at `epoch`: view e mod R, at that view's size."""
        return self.pixels(images, index, self.keyed(self.view(epoch)), extent)

    def teacher_pixels(self, images: Tensor, index: Tensor, view: int,
                       extent: Tensor | None) -> Tensor:
        """What the teacher labels for stored view `view`."""
        if self.unaugmented_teacher:
            return eval_view(images, size=self.augment.eval_size, augment=self.augment,
                             extent=extent)
        return self.pixels(images, index, self.keyed(view), extent)

    def describe(self) -> str:
        """The teacher's views in words, for the run's log and report."""
        if self.unaugmented_teacher:
            return "the teacher labels the un-augmented image; the student sees its own views"
        if self.count >= self.epochs:
            return "the teacher labels the student's own view, a fresh one every epoch"
        return (f"the teacher labels the student's views, {self.count} per sample for "
                f"{self.epochs} epochs (epoch e shows view e mod {self.count})")


def view_schedule(seed: int, generation: int, epochs: int, augment: AugmentConfig,
                  cache: CacheConfig) -> ViewSchedule:
    """Generation m's schedule: the patriarch sees a fresh view every epoch, students R views."""
    count = epochs if generation == 0 or cache.views == 0 else min(cache.views, epochs)
    unaugmented = generation > 0 and cache.teacher_view == "unaugmented"
    if any(train_size(e, augment) != train_size(e % count, augment) for e in range(epochs)):
        raise UserError(f"progressive resizing gives view v other sizes in later epochs: set "
                        f"cache.views = 0 (one view per epoch) or {epochs}")
    return ViewSchedule(generation_key(seed, generation), epochs, count, augment, unaugmented)


class OnlineTeacher:
    """A frozen model labelling the schedule's views of each batch, one forward pass a batch."""

    def __init__(self, model: torch.nn.Module, schedule: ViewSchedule, top_k: int,
                 temperature: float):
        # Its parameters keep requires_grad (no_grad below keeps autograd out): a compiled
        # model guards on it, and a frozen teacher would compile a graph of its own.
        self.model = model.eval()
        self.schedule, self.top_k, self.temperature = schedule, top_k, temperature

    @torch.no_grad()
    def logits(self, index: Tensor, view: int, images: Tensor, extent: Tensor | None,
               shown: Tensor | None = None) -> Tensor:
        """Full float32 logits on view `view`; `shown`, the student's pixels, saves augmenting."""
        if shown is None or self.schedule.unaugmented_teacher:
            shown = self.schedule.teacher_pixels(images, index, view, extent)
        # A copy even in float32: a model compiled with CUDA graphs returns memory that the
        # student's forward, replayed from the same pool, overwrites before the loss reads it.
        return self.model(shown).to(torch.float32, copy=True)

    def __call__(self, index: Tensor, view: int, images: Tensor, extent: Tensor | None,
                 shown: Tensor | None = None) -> TopKTeacher:
        """Outputs on view `view`, as `logits` takes it."""
        return TopKTeacher.from_logits(self.logits(index, view, images, extent, shown),
                                       self.top_k, self.temperature)
