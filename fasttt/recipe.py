"""Recipes: TOML files read into typed, frozen dataclasses; every key is documented here.

A recipe may start with `base = "other.toml"` (relative to itself) and hold only what
differs. `--set section.key=value` overrides one key from the command line. An unknown
key, a wrong type or a value out of range is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fasttt.errors import UserError
from fasttt.files import write_text


class RecipeError(ValueError):
    """A bad value, raised by a section's checks with the key it concerns."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RecipeError(key, message)


# Upper bounds far beyond any real run: a larger value is a typo that would otherwise
# pass here and fail much later (an allocation, a loop that never ends, an int64 overflow).
MAX_SEED = 2**31 - 1  # numpy, torch and FFCV all take it
MAX_EPOCHS = 100_000
MAX_BATCH = 2**16
MAX_SIDE = 16_384  # pixels, of canvases and views
MAX_WORKERS = 1024
MAX_STUDENTS = 100
MAX_BASE_DEPTH = 32  # `base =` links followed from one recipe
MAX_TEMPERATURES = 64
WHOLE_STEP = "whole-step"  # run.compile_mode that compiles the training step (fasttt/engine.py)
TEACHER_PATTERN = re.compile(r"[^\0]*[^/\0]/gen(0|[1-9][0-9]{0,2})")  # runs/NAME/genM
RUN_NAME = re.compile(r"\w[\w.+=,@-]*")  # \w: letters, digits, _ (any script)
MAX_NAME_BYTES = 200  # of a file name's 255
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
            "swanlab", "trackio")  # Accelerate's LoggerType names
# Keys that change how fast a run goes or what it logs, never what it trains on or computes:
# a resumed or rerun run may change them (fasttt/rundir.py records each change). Every
# other key defines the result, and a run directory holds the result of one recipe.
BOOKKEEPING = frozenset({
    "data.num_workers",  # FFCV's decoding threads; each epoch's order comes from the seed
    # (not data.os_cache: on one process it switches FFCV's shuffle between RANDOM and
    # QUASI_RANDOM, so a resume would no longer replay the uninterrupted run's batches)
    "cache.batch_size",  # teacher inference batch: outputs are per sample (BatchNorm in eval)
    "cache.keep",  # whether a used teacher's cache is deleted; each student reads only its own
    "run.log_with",  # trackers receive copies of metrics.jsonl's rows
})


def plain_name(text: str) -> str:
    """`text` made a valid run.name: each run of other characters becomes one _."""
    cleaned = re.sub(r"[^\w.+=,@-]+", "_", text.strip()).lstrip(".+=,@-")
    cleaned = cleaned.encode()[:MAX_NAME_BYTES].decode(errors="ignore")
    return cleaned or "run"


def derived_name(name: str, suffix: str) -> str:
    """A valid run.name for a new run that advice derives from run `name`: name + suffix."""
    room = MAX_NAME_BYTES - len(suffix.encode())
    return name.encode()[:room].decode(errors="ignore") + suffix


@dataclass(frozen=True)
class RunConfig:
    """[run]: naming, seeding and numerics of the whole run."""

    # runs/<name>/ holds everything the run writes: a plain file name on one line, of
    # letters, digits and . _ - + = , @ (no spaces, quotes or control characters), starting
    # with a letter, digit or _, at most 200 bytes
    name: str = "run"
    seed: int = 0  # keys the augmentation views and every loader order
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # "no" on the CPU
    # torch.compile the model's forward. "auto": on, replaying CUDA graphs, for a GPU run of
    # fixed-size images (augment.kind = "pad_crop"), where it was measured to win (CIFAR-100
    # ResNet-56 on an H200: 13.3 -> 4.0 s per epoch after a 61 s first one); off on the CPU
    # and for photos (unmeasured). Either way the eager and compiled steps train alike.
    compile: bool | Literal["auto"] = "auto"
    # torch.compile's mode (with compile = true): "reduce-overhead" replays CUDA graphs,
    # for small models whose steps are bound by kernel launches (CIFAR ResNets, batch 128).
    # "whole-step" (unmeasured on a GPU, so "auto" never picks it) compiles the training
    # step's device work as one graph instead: keyed augmentation, an online teacher, the
    # forward and the loss, its backward with it; then the SGD update as a second graph,
    # its learning rate a device tensor; replayed as CUDA graphs on a GPU. A cache's
    # answers are read before them, and evaluation stays eager.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "whole-step"] = "default"
    channels_last: bool = True
    # experiment trackers, by Accelerate's names (tensorboard, wandb, mlflow, comet_ml,
    # aim, clearml, dvclive, swanlab, trackio); [] logs to metrics.jsonl only
    log_with: tuple[str, ...] = ("tensorboard",)

    @property
    def whole_step(self) -> bool:
        """Whether the training step's device work is compiled as one graph (not the model)."""
        return self.compile is True and self.compile_mode == WHOLE_STEP

    def check(self) -> None:
        _require(RUN_NAME.fullmatch(self.name) is not None
                 and len(self.name.encode()) <= MAX_NAME_BYTES, "name",
                 "must be a plain file name on one line: letters, digits and . _ - + = , @, "
                 f"starting with a letter, digit or _, at most {MAX_NAME_BYTES} bytes, e.g. "
                 f"\"{plain_name(self.name)}\"")
        _require(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}")
        unknown = [name for name in self.log_with if name not in TRACKERS]
        _require(not unknown, "log_with", f"must name trackers among {', '.join(TRACKERS)}")


@dataclass(frozen=True)
class DataConfig:
    """[data]: which betons to read and how."""

    # a directory made by `python -m beton_builders`; with builtin, one it may build (it
    # must then have a name: not "", ".", ".." or "/")
    beton_dir: str = "data/digits"
    canvas_size: int = 0  # photos only: canvas side in pixels (>= the beton's max resolution)
    num_workers: int = 2  # FFCV decoding threads per process
    # who decodes a photo beton's JPEGs: "cpu": FFCV's threads; "gpu": the loader sends the
    # bytes and each batch is decoded on the run's device (nvJPEG; libjpeg-turbo on the
    # CPU); raw samples (--write-mode raw or proportion) keep FFCV's path. Their pixels
    # differ slightly, so a teacher's cache serves only students of its decoder. "auto":
    # "cpu" until a GPU measurement shows nvJPEG winning (unmeasured)
    decode: Literal["cpu", "gpu", "auto"] = "cpu"
    # with decode = "gpu": the percent of JPEG samples decoded on the device, chosen by
    # sample index (index % 100 < it), never by load, so that a sample sees one decoder all
    # run; FFCV's threads decode the rest meanwhile
    gpu_decode_percent: int = 100
    os_cache: bool = True  # rely on the page cache (False: FFCV's own, for huge betons)
    train_limit: int = 0  # train on the first N samples only (quick checks); 0 = all
    builtin: Literal["", "digits"] = ""  # "digits": build the embedded betons if missing
    # a stratified fraction of the training split set aside, the same for every run on
    # these betons: no generation trains on it and no cache labels it; generations.stop
    # decides on it (0 = none)
    holdout: float = 0.0
    # class -> superclass, one entry per class, for DistC/DistS; empty: the beton
    # manifest's fine_to_coarse (CIFAR-100), else those statistics are skipped
    superclasses: tuple[int, ...] = ()

    def check(self) -> None:
        _require(self.beton_dir.strip() != "" and self.beton_dir.isprintable(), "beton_dir",
                 "must name the betons' directory on one line, e.g. \"data/digits\"")
        _require(not self.builtin or Path(self.beton_dir).name not in ("", ".."), "beton_dir",
                 f"must name a directory of its own to build the {self.builtin} betons in "
                 "(not \".\", \"..\" or \"/\"), e.g. \"data/digits\"")
        _require(self.canvas_size >= 0, "canvas_size", "must be >= 0")
        _require(self.canvas_size <= MAX_SIDE, "canvas_size", f"must be <= {MAX_SIDE}")
        _require(all(c >= 0 for c in self.superclasses), "superclasses", "must be >= 0")
        _require(self.num_workers >= 1, "num_workers", "must be >= 1")
        _require(1 <= self.gpu_decode_percent <= 100, "gpu_decode_percent",
                 "must be in 1..100 (data.decode = \"cpu\" decodes none on the device)")
        _require(self.num_workers <= MAX_WORKERS, "num_workers", f"must be <= {MAX_WORKERS}")
        _require(self.train_limit >= 0, "train_limit", "must be >= 0")
        _require(0 <= self.holdout <= 0.5, "holdout", "must be in [0, 0.5]")


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the architecture every generation shares."""

    name: str = "cifar_resnet20"  # any timm name, or a CIFAR network of fasttt.models

    def check(self) -> None:
        _require(self.name.strip() != "", "name", "must be a model name")


@dataclass(frozen=True)
class OptimConfig:
    """[optim]: SGD with (Nesterov) momentum."""

    batch_size: int = 128  # global, over all processes
    lr: float = 0.1  # at reference_batch_size; scaled by `lr_scaling` to batch_size
    reference_batch_size: int = 128
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr * batch_size / reference
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # False: no weight decay on norm weights and biases

    def check(self) -> None:
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.batch_size <= MAX_BATCH, "batch_size", f"must be <= {MAX_BATCH}")
        _require(self.reference_batch_size >= 1, "reference_batch_size", "must be >= 1")
        _require(self.reference_batch_size <= MAX_BATCH, "reference_batch_size",
                 f"must be <= {MAX_BATCH}")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.lr <= 1000, "lr", "must be <= 1000")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.weight_decay <= 1, "weight_decay", "must be <= 1")


@dataclass(frozen=True)
class ScheduleConfig:
    """[schedule]: epochs and the learning-rate shape, applied per iteration."""

    epochs: int = 164  # per generation
    kind: Literal["step", "linear"] = "step"  # step: milestones; linear: FFCV-style ramps
    milestones: tuple[int, ...] = (82, 123)  # epochs, for "step"
    factor: float = 0.1  # lr multiplier at each milestone
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs (fractions allowed)
    peak_epoch: float = 2.0  # "linear": lr rises to its peak here ...
    end_lr_ratio: float = 0.0  # ... then falls linearly to lr * end_lr_ratio at the end

    def check(self) -> None:
        _require(self.epochs >= 1, "epochs", "must be >= 1")
        _require(self.epochs <= MAX_EPOCHS, "epochs", f"must be <= {MAX_EPOCHS}")
        _require(self.kind != "step" or all(0 < m <= self.epochs for m in self.milestones),
                 "milestones", "must lie in 1..epochs")
        _require(list(self.milestones) == sorted(set(self.milestones)), "milestones",
                 "must be strictly increasing")
        _require(0 < self.factor <= 1, "factor", "must be in (0, 1]")
        _require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", "must be in 0..epochs")
        _require(self.kind != "linear" or 0 <= self.peak_epoch <= self.epochs, "peak_epoch",
                 "must be in 0..epochs")
        _require(self.end_lr_ratio >= 0, "end_lr_ratio", "must be >= 0")
        _require(self.end_lr_ratio <= 1, "end_lr_ratio", "must be <= 1")


@dataclass(frozen=True)
class AugmentConfig:
    """[augment]: keyed, on-device views (fasttt/augment.py)."""

    kind: Literal["pad_crop", "resized_crop", "none"] = "pad_crop"
    pad: int = 4  # pad_crop: zero padding in pixels before the random crop
    flip: bool = True  # random horizontal flip, p = 0.5
    scale: tuple[float, ...] = (0.08, 1.0)  # resized_crop: area
    ratio: tuple[float, ...] = (0.75, 4 / 3)  # resized_crop: w/h
    min_size: int = 32  # train output side at the first epoch, pixels
    max_size: int = 32  # ... and from `end_ramp` on (progressive resizing, FFCV-style)
    start_ramp: int = 0  # epoch at which the size starts growing
    end_ramp: int = 0  # epoch at which it reaches max_size
    eval_size: int = 32  # evaluation output side
    eval_crop_ratio: float = 1.0  # centre crop of this fraction of the shorter side
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per channel, 0..1
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def check(self) -> None:
        _require(self.pad >= 0, "pad", "must be >= 0")
        _require(self.pad <= MAX_SIDE, "pad", f"must be <= {MAX_SIDE}")
        _require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "scale",
                 "must be [low, high] with 0 < low <= high <= 1")
        _require(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "ratio",
                 "must be [low, high] with 0 < low <= high")
        _require(1 <= self.min_size <= self.max_size, "min_size", "must be in 1..max_size")
        _require(self.max_size <= MAX_SIDE, "max_size", f"must be <= {MAX_SIDE}")
        _require(0 <= self.start_ramp <= self.end_ramp, "end_ramp", "must be >= start_ramp")
        _require(self.eval_size >= 1, "eval_size", "must be >= 1")
        _require(self.eval_size <= MAX_SIDE, "eval_size", f"must be <= {MAX_SIDE}")
        _require(0 < self.eval_crop_ratio <= 1, "eval_crop_ratio", "must be in (0, 1]")
        _require(len(self.mean) == 3 and all(0 <= m <= 1 for m in self.mean), "mean",
                 "must be 3 values in [0, 1]")
        _require(len(self.std) == 3 and all(0 < s <= 1 for s in self.std), "std",
                 "must be 3 values in (0, 1]")


@dataclass(frozen=True)
class GenerationsConfig:
    """[generations]: the method, D(u, lambda): a patriarch and `students` generations."""

    students: int = 5  # M: generations after the patriarch
    patriarch_loss: Literal["ce", "tsd", "lsr", "cp"] = "tsd"
    u: float = 0.6  # target primary confidence of the patriarch; 1.0 means plain CE
    # The patriarch's CE weight eta itself, overriding the one derived from u (TSD's
    # optimum): for LSR and CP, whose eta the paper does not tie to u. 0 = derive from u.
    eta: float = 0.0
    k: int = 5  # K: top scores in the TSD term
    lam: float = 0.6  # lambda: weight of CE in the student loss (1 - lambda on the KL)
    temperature: float = 1.0  # T of the student KL (the paper uses 1)
    # "runs/NAME/genM": generation 0 is that finished generation of another run (same
    # model and betons), read through its cache; only students train here. "" = a patriarch
    teacher: str = ""
    # "fixed": train every student; "saturation": stop once the holdout top-1 (data.holdout)
    # has not improved by `min_delta` points for `patience` generations
    stop: Literal["fixed", "saturation"] = "fixed"
    patience: int = 1
    min_delta: float = 0.0  # percentage points of holdout top-1

    def check(self) -> None:
        _require(self.students >= 0, "students", "must be >= 0")
        _require(self.students <= MAX_STUDENTS, "students", f"must be <= {MAX_STUDENTS}")
        _require(0 < self.u <= 1, "u", "must be in (0, 1]")
        _require(0 <= self.eta <= 1, "eta", "must be in [0, 1] (0: derived from u)")
        _require(self.k >= 2, "k", "must be >= 2")
        _require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        _require(0.01 <= self.temperature <= 100, "temperature", "must be in [0.01, 100]")
        _require(self.teacher == "" or (TEACHER_PATTERN.fullmatch(self.teacher) is not None
                                        and self.teacher.isprintable()),
                 "teacher", "must name a finished generation of another run on one line, "
                 "runs/NAME/genM")
        _require(1 <= self.patience <= MAX_STUDENTS, "patience", f"must be in 1..{MAX_STUDENTS}")
        _require(0 <= self.min_delta <= 100, "min_delta", "must be in [0, 100]")


@dataclass(frozen=True)
class CacheConfig:
    """[cache]: how each teacher's outputs are precomputed for its student."""

    # precomputed: gen<m>/cache/ labels every view once (fasttt/cache.py); online: a
    # teacher forward pass per student step, for comparison.
    mode: Literal["precomputed", "online"] = "precomputed"
    # R: keyed views per sample, student epoch e shows view e mod R (in both modes);
    # 0 = one view per student epoch (schedule.epochs): exactly the online teacher
    views: int = 0
    # "student": the teacher labels the student's own views; "unaugmented": one
    # un-augmented view per sample (a fixed teacher) while the student sees its views
    teacher_view: Literal["student", "unaugmented"] = "student"
    top_k: int = 0  # logits kept per sample and view; 0 keeps all classes
    dtype: Literal["float16", "float32"] = "float16"
    # the temperatures whose log-partition is stored (4 bytes per row each), so students of
    # several generations.temperature share one cache; [] = the student's own. A cache
    # keeping every class (top_k = 0) serves any temperature.
    temperatures: tuple[float, ...] = ()
    batch_size: int = 512  # teacher inference batch, per process
    # "last": delete a teacher's cache once its student has finished (frees disk; only
    # the newest teacher's cache stays); "all" keeps every cache
    keep: Literal["all", "last"] = "all"

    def check(self) -> None:
        _require(self.views >= 0, "views", "must be >= 0")
        _require(self.views <= MAX_EPOCHS, "views", f"must be <= {MAX_EPOCHS}")
        _require(self.top_k >= 0, "top_k", "must be >= 0 (0 keeps all)")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.batch_size <= MAX_BATCH, "batch_size", f"must be <= {MAX_BATCH}")
        _require(all(0.01 <= t <= 100 for t in self.temperatures), "temperatures",
                 "must each be in [0.01, 100]")
        _require(len(self.temperatures) <= MAX_TEMPERATURES, "temperatures",
                 f"must hold at most {MAX_TEMPERATURES} values")


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: one dataclass per TOML section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    generations: GenerationsConfig = field(default_factory=GenerationsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def value(self, key: str):
        """The value of `section.key` (a tuple as a list: 0.3, 4.0, "tsd", [1.0, 4.0])."""
        section, name = key.split(".", 1)
        value = getattr(getattr(self, section), name)
        return list(value) if isinstance(value, tuple) else value

    def differences(self, new: Recipe) -> dict[str, tuple]:
        """`section.key` -> (this value, new value) of each key the two recipes set differently."""
        return {f"{section.name}.{key}": (value, getattr(getattr(new, section.name), key))
                for section in dataclasses.fields(self)
                for key, value in dataclasses.asdict(getattr(self, section.name)).items()
                if value != getattr(getattr(new, section.name), key)}

    def to_toml(self) -> str:
        """The fully resolved recipe as TOML text that `load_recipe` reads back unchanged."""
        lines = []
        for section in dataclasses.fields(self):
            lines.append(f"[{section.name}]")
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        """Write the resolved recipe to `path` atomically."""
        write_text(Path(path), self.to_toml())


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}


def _describe(kind) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is Literal:
        return " or ".join(json.dumps(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"a list of {_describe(typing.get_args(kind)[0])}s"
    return {bool: "true or false", int: "integer", float: "number", str: "string"}[kind]


def _convert(value, kind):
    """`value` as `kind`, or None when it does not have that type (ints pass as floats)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # the first type that takes it
        return next((v for v in (_convert(value, k) for k in typing.get_args(kind))
                     if v is not None), None)
    if origin is Literal:
        return value if value in typing.get_args(kind) and isinstance(value, str) else None
    if origin is tuple:
        if not isinstance(value, list):
            return None
        items = tuple(_convert(v, typing.get_args(kind)[0]) for v in value)
        return None if any(i is None for i in items) else items
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool):
        return None
    return value if isinstance(value, kind) else None


def _shown(text: str) -> str:
    """`text` as is, or quoted with escapes where it would break the one-line message."""
    return text if text.isprintable() else repr(text)


def _unrepresentable(value) -> str | None:
    """Why a converted value cannot travel on (to int64 tensors, UTF-8 files, paths), or None."""
    if isinstance(value, tuple):
        return next(filter(None, map(_unrepresentable, value)), None)
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        return "must fit in 64 bits"
    if isinstance(value, str) and ("\0" in value
                                   or value.encode("utf-8", "replace").decode() != value):
        return "must be UTF-8 text without NUL characters"  # a lone surrogate from argv
    return None


def _did_you_mean(close: list[str]) -> str:
    """"did you mean X? " of the first of `close`, or "" when it is empty."""
    return f"did you mean {close[0]}? " if close else ""


def _closest_key(section: str, key: str) -> list[str]:
    """The key of another section of that very name, else the closest key of `section`."""
    elsewhere = [f"{name}.{key}" for name, other in SECTIONS.items()
                 if key in typing.get_type_hints(type(other()))]
    near = difflib.get_close_matches(key, typing.get_type_hints(type(SECTIONS[section]())), n=1)
    return elsewhere or [f"{section}.{k}" for k in near]


def _section(name: str, table, where: str):
    if not isinstance(table, dict):
        raise UserError(f"{where}: [{name}] must be a table of keys")
    cls = type(SECTIONS[name]())
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in hints:
            hint = _did_you_mean(_closest_key(name, key))
            raise UserError(f"{where}: unknown key {name}.{_shown(key)} "
                            f"({hint}known in [{name}]: {', '.join(hints)})")
        converted = _convert(value, hints[key])
        if converted is None:
            raise UserError(f"{where}: {name}.{key} must be {_describe(hints[key])}, "
                            f"got {value!r}")
        problem = _unrepresentable(converted)
        if problem:
            raise UserError(f"{where}: {name}.{key} {problem}, got {value!r}")
        values[key] = converted
    section = cls(**values)
    try:
        section.check()
    except RecipeError as err:
        raise UserError(f"{where}: {name}.{err.key} {err}, got "
                        f"{getattr(section, err.key)!r}") from None
    return section


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML ({err})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid TOML (arrays or tables nested too deeply)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the recipe ({err.strerror})") from None


def _merged(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe's tables with its `base` chain applied underneath."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise UserError(f"{path}: cannot resolve the recipe's path (a symlink loop?)") from None
    if resolved in seen:
        raise UserError(f"{path}: base recipes form a cycle")
    if len(seen) > MAX_BASE_DEPTH:
        raise UserError(f"{path}: more than {MAX_BASE_DEPTH} base recipes in a chain")
    tables = _read_toml(path)
    base = tables.pop("base", None)
    if base is None:
        return tables
    if not isinstance(base, str) or "\0" in base or base.strip() == "":
        raise UserError(f"{path}: base must be a string path to another recipe")
    merged = _merged(path.parent / base, (*seen, resolved))
    for name, table in tables.items():
        if isinstance(table, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **table}
        else:
            merged[name] = table
    return merged


def _apply_override(tables: dict, override: str, source: str = "--set") -> None:
    key, sep, text = override.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"{source} {_shown(override)}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = text  # a bare word such as a run name
    table = tables.setdefault(section, {})
    if not isinstance(table, dict):
        raise UserError(f"{source} {_shown(override)}: [{_shown(section)}] is not a table")
    table[name] = value


def build_recipe(tables: dict, where: str) -> Recipe:
    """Check parsed TOML tables against the dataclasses; `where` names the source in errors."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        hint = _did_you_mean([f"[{s}]" for s in difflib.get_close_matches(unknown[0],
                                                                          list(SECTIONS), n=1)])
        raise UserError(f"{where}: unknown section [{_shown(unknown[0])}] "
                        f"({hint}known: {', '.join(SECTIONS)})")
    recipe = Recipe(**{name: _section(name, tables.get(name, {}), where)
                       for name in SECTIONS})
    problem = _across_sections(recipe.generations, recipe.data)
    if problem:
        raise UserError(f"{where}: {problem}")
    return recipe


def _across_sections(generations: GenerationsConfig, data: DataConfig) -> str | None:
    """What is wrong with keys of several sections taken together, or None."""
    if generations.stop == "saturation" and data.holdout == 0:
        return ("generations.stop = \"saturation\" decides on a holdout: set data.holdout, "
                "e.g. --set data.holdout=0.05")
    return None


def load_recipe(path: str | Path, overrides: list[str] = (), source: str = "--set") -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, and check it all.

    `source` names the overrides' origin in errors: the command-line flag that gave them.
    """
    path = Path(path)
    tables = _merged(path)
    for override in overrides:
        _apply_override(tables, override, source)
    where = f"{path} (with {source})" if overrides else str(path)
    return build_recipe(tables, where)


def toml_value(value) -> str:
    """One value as TOML writes it (strings quoted), as recipe.toml and messages show it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):  # JSON string escapes are TOML's, but for a raw DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return str(value)
