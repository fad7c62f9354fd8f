"""One prepared command for a GPU machine: does fasttt run there, and how fast.

    source .gpukit/activate && python benchmarks/gpu_check.py
        [--part imagenet|decode|cifar|densenet|checks] [--out bench_out/gpu_check]
        [--work bench_out/gpu_check_work] [--archive bench_out/gpu_check.tar.gz]
    python benchmarks/gpu_check.py --tiny        # the same steps in seconds, on any CPU

Runs each step as its own process group with a time limit (STEP_LIMITS; --part runs the
ImageNet speeds, the ImageNet decode splits, the CIFAR ResNets' speeds, DenseNet's or the
checks, each at most 9 minutes), keeps going when one fails or times out, and writes its
results under --out (the synthetic betons, GBs, and the demo's run go to --work, so a
remote machine's --out stays small):
`logs/<step>.log`, each benchmark's JSON, and `gpu_check.json` (the environment line, the
commit and date, each step's exit status and seconds, and every figure), rewritten after
every step so that a run stopped from outside still leaves what it measured. Steps, the
speed first:

1. environment: GPU, driver, torch, CUDA, CPU cores (printed as one line);
2. `benchmarks/epochs_per_hour.py` for `imagenet_r18_d06_fast` on a synthetic ImageNet-like
   beton (20,000 JPEGs of about 400x350), decoded by FFCV on the CPU and then, on the same
   betons, by nvJPEG (`data.decode = "gpu"`), then on betons stored as FFCV's own ImageNet
   ones are (side 400, 10 % JPEG, the rest raw: like for like with FFCV's published
   figures); then (--part decode) both decoders at once, split by sample index
   (`data.gpu_decode_percent = 60`), and FFCV's policy under nvJPEG (its JPEGs on the
   device, its raw samples on FFCV's path); and for `cifar100_resnet56_d06`,
   `cifar100_resnet110_d06` and `cifar100_densenet100_d06` on one synthetic 50,000-image
   32x32 beton: loader ceiling,
   patriarch, cached and online student, cache build, and on a GPU the patriarch and
   cached student compiled as a run compiles them (CUDA graphs), with the compile time
   (ResNet-18 compiled by inductor in the CPU-decode step, and ResNet-56 again with its
   whole step as one graph, COMPILED); then 6 steps of the
   patriarch and of the cached student, eager and compiled, under torch.profiler
   (`profiles/<recipe>/`: op tables, gzipped Chrome traces, summaries), whose phase
   breakdown (host and GPU kernel ms per step in each `fasttt.*` range of the training
   step, every kernel's ms per 1024 images) goes into gpu_check.json under "phases" and
   is printed, with the kernel ms per 1024 images eager against compiled;
3. the embedded demo end to end through `accelerate launch --mixed_precision bf16`;
4. device tests: the tests of the code a GPU runs (a tiny run on the GPU, killed and
   resumed; loaders, augmentation, losses, views and the teacher cache, a tiny run with a
   cached student);
5. the compile test (`tests/test_compile.py`, a run compiled with CUDA graphs against the
   eager one), with a budget of its own: inductor compiles for real on a GPU. A step that
   times out prints the last lines it reached.

`--archive FILE` packs everything --out holds into one .tar.gz for machines from which
only a few files come back; the Chrome traces, when over TRACES_INLINE_MB together, go
to FILE's sibling `<name>.traces.tar.gz` instead. `--tiny` shrinks every step (a few
hundred images, two steps per row, one epoch) so CI proves the script itself on a CPU;
the figures it gives then mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from step_profile import phase_table  # benchmarks/step_profile.py

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TESTS = ["tests/test_devices.py", "tests/test_data.py", "tests/test_jpeg.py",
                "tests/test_augment.py", "tests/test_losses.py", "tests/test_views.py",
                "tests/test_cache.py", "tests/test_train.py"]
COMPILE_TESTS = ["tests/test_compile.py"]  # CUDA graphs, compiled for real: a budget of its own
# seconds per step. A remote call's 10 minutes must leave time to send the results back:
# run it in its parts (README, Speed), each at most 9 minutes.
STEP_LIMITS = {"imagenet": 230, "imagenet_gpu_decode": 120, "imagenet_ffcv_policy": 150,
               "imagenet_split_decode": 230, "imagenet_ffcv_policy_gpu_decode": 150,
               "cifar": 150, "cifar_whole_step": 150, "cifar_resnet110": 190,
               "cifar_densenet100": 190, "demo": 90, "tests": 100, "compile": 90}
PARTS = {"imagenet": ("imagenet", "imagenet_gpu_decode", "imagenet_ffcv_policy"),
         "decode": ("imagenet_split_decode", "imagenet_ffcv_policy_gpu_decode"),
         "cifar": ("cifar", "cifar_whole_step", "cifar_resnet110"),
         "densenet": ("cifar_densenet100",), "checks": ("demo", "tests", "compile")}
TINY_LIMIT = 300
TRACES_INLINE_MB = 4  # Chrome traces larger than this together get an archive of their own
GPU_DECODE = ['data.decode="gpu"']  # the same betons and recipe, decoded by nvJPEG
# both decoders at once, split by sample index: nvJPEG 60 of each 100 samples, FFCV's 16
# threads the rest (unmeasured: the split that keeps both busy is what this step finds out)
SPLIT_DECODE = [*GPU_DECODE, "data.gpu_decode_percent=60"]
# (recipe, synthetic images, --set values, how photos are stored (benchmarks/synthetic.py),
# the synthetic data's folder under --work/data: steps naming one folder share its betons)
FULL = {"imagenet": ("imagenet_r18_d06_fast", 20_000, [], "fasttt", "photos"),
        "imagenet_gpu_decode": ("imagenet_r18_d06_fast", 20_000, GPU_DECODE, "fasttt", "photos"),
        "imagenet_ffcv_policy": ("imagenet_r18_d06_fast", 20_000, [], "ffcv", "photos_ffcv"),
        "imagenet_split_decode": ("imagenet_r18_d06_fast", 20_000, SPLIT_DECODE, "fasttt",
                                  "photos"),
        # FFCV's policy under nvJPEG: its JPEGs on the device, its raw samples from FFCV
        "imagenet_ffcv_policy_gpu_decode": ("imagenet_r18_d06_fast", 20_000, GPU_DECODE, "ffcv",
                                            "photos_ffcv"),
        "cifar": ("cifar100_resnet56_d06", 50_000, [], "fasttt", "cifar"),
        "cifar_whole_step": ("cifar100_resnet56_d06", 50_000, [], "fasttt", "cifar"),
        "cifar_resnet110": ("cifar100_resnet110_d06", 50_000, [], "fasttt", "cifar"),
        "cifar_densenet100": ("cifar100_densenet100_d06", 50_000, [], "fasttt", "cifar")}
# epochs_per_hour's --compiled per step, "auto" where not named: ResNet-18 compiled by
# inductor (channels_last and bf16, as its recipe; no CUDA graphs: a photo step's decode and
# crops stay outside), once, in the step that decodes on the CPU; the CIFAR steps as their
# runs decide (the model in CUDA graphs on a GPU), and ResNet-56 again with its whole step
# in one graph (run.compile_mode = "whole-step", which no run picks until measured here).
# --tiny leaves it "auto": inductor's C++ on a CPU.
COMPILED = {"imagenet": "default", "cifar_whole_step": "whole-step"}
TINY_SETS = ["data.num_workers=1", "optim.batch_size=16", "cache.batch_size=32"]
TINY = {name: (recipe, 64, [*TINY_SETS, *sets], policy, data)
        for name, (recipe, _, sets, policy, data) in FULL.items()}
ROWS = ("loader", "patriarch_step", "patriarch_step_compiled", "student_step_cache",
        "student_step_cache_compiled", "student_step_online", "cache_build")  # of
# epochs_per_hour's JSON, in the summary table ("-" where a step had no compiled rows)
# of each profile summary in epochs_per_hour's JSON: the phase breakdown and its context
PHASE_KEYS = ("device", "steps", "wall_ms_per_step", "loader_wait_ms_per_step",
              "timed_ms_per_step", "kernel_ms_per_step", "kernel_ms_per_1024_images", "phases")
DEMO_TINY = ["schedule.epochs=1", "schedule.peak_epoch=1", "generations.students=1",
             "data.train_limit=256", "data.num_workers=1", "run.log_with=[]"]


def environment() -> dict:
    """The machine in facts: GPU, driver, torch, CUDA, CPU cores, Python."""
    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(),
             "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        facts["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        facts["driver"] = None
    return facts


def describe(facts: dict) -> str:
    """The environment as one line."""
    gpus = ", ".join(facts["gpus"]) or "no GPU"
    return (f"{gpus} (driver {facts['driver']}) | torch {facts['torch']} CUDA {facts['cuda']} "
            f"| {facts['cpu_cores']} CPU cores | Python {facts['python']}")


def commit() -> str | None:
    """The checked-out commit, when this is a git checkout."""
    try:  # a copied working tree may have no .git, a bare machine no git
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                               text=True)
    except OSError:
        return None
    return found.stdout.strip() or None


def step(name: str, command: list[str], out: Path, timeout: float, console: Console) -> dict:
    """Run one step's command with its output in logs/<name>.log; its status and seconds.

    The step runs in a process group of its own, killed whole at its time limit (or when
    this script is stopped): pytest's workers and accelerate's training process go with it.
    """
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"{datetime.datetime.now():%H:%M:%S} {name}: {' '.join(command)}")
    start = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:  # also when this script is stopped meanwhile
            kill_group(process)
    seconds = time.perf_counter() - start
    console.print(f"  {name}: {'ok' if status == 0 else f'FAILED ({status})'} in "
                  f"{seconds:.0f} s, log {log}")
    if status == "timeout":
        console.print(f"  {name} reached, at {timeout:.0f} s:\n    "
                      + "\n    ".join(last_lines(log, 6)))
    return {"status": status, "seconds": seconds, "log": str(log.relative_to(out))}


def kill_group(process: subprocess.Popen) -> None:
    """Kill what is left of a step's process group (its leader may have ended) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def last_lines(log: Path, count: int) -> list[str]:
    """The last `count` non-empty lines of a log, each cut to 150 characters."""
    lines = [line[:150] for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-count:] or ["(nothing)"]


def archive(out: Path, work: Path, target: Path, console: Console) -> list[Path]:
    """Pack `out` (less `work`) into `target`; large traces into a sibling. The archives."""
    traces = sorted(out.rglob("*.trace.json.gz"))
    apart = sum(t.stat().st_size for t in traces) > TRACES_INLINE_MB * 2**20
    target.parent.mkdir(parents=True, exist_ok=True)
    written = [target]
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and not path.is_relative_to(work) and path != target and not (
                    apart and path in traces):
                tar.add(path, arcname=path.relative_to(out))
    if apart:
        written.append(target.with_name(target.name.removesuffix(".tar.gz") + ".traces.tar.gz"))
        with tarfile.open(written[-1], "w:gz") as tar:
            for path in traces:
                tar.add(path, arcname=path.relative_to(out))
    for path in written:
        console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    return written


def demo_results(run_dir: Path) -> list[float] | None:
    """The demo's last-epoch val top-1 per generation, from its report."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return [100 - g["last_top1_error"] for g in summary["generations"]]


def main(argv: list[str] | None = None) -> int:
    """Every step in turn; the table; gpu_check.json. Exit 1 when a step failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long steps, any CPU")
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_check"),
                        help="logs, JSON and profiles: what a remote run sends back")
    parser.add_argument("--work", type=Path, default=Path("bench_out/gpu_check_work"),
                        help="the synthetic betons (GBs) and the demo's run directory")
    parser.add_argument("--archive", type=Path,
                        help="also pack everything --out holds into this .tar.gz")
    parser.add_argument("--skip", action="append", default=[], choices=list(STEP_LIMITS))
    parser.add_argument("--part", action="append", default=[], choices=list(PARTS),
                        help="run only the ImageNet speeds, the CIFAR ResNets' speeds, "
                        "DenseNet's or the checks (demo, tests, compile): each part fits a "
                        "10-minute remote call")
    parser.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS",
                        help="another time limit for a step, e.g. compile=300")
    args = parser.parse_args(argv)
    if args.part:
        chosen = {name for part in args.part for name in PARTS[part]}
        args.skip += [name for name in STEP_LIMITS if name not in chosen]
    limits = dict.fromkeys(STEP_LIMITS, TINY_LIMIT) if args.tiny else dict(STEP_LIMITS)
    for setting in args.limit:
        name, _, seconds = setting.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--limit {setting}: expected STEP=SECONDS, STEP one of "
                         f"{', '.join(limits)}")
        limits[name] = float(seconds)
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Wide when captured (a remote machine's log): rich would cut its tables to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    facts = environment()
    console.print(f"environment: {describe(facts)}")
    result = {"commit": commit(), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "tiny": args.tiny, "environment": facts,
        "environment_line": describe(facts), "steps": {}, "epochs_per_hour": {}, "phases": {}}
    # A stop from outside (the remote call's limit, Ctrl-C) ends the running step's group
    # and still leaves the table, gpu_check.json and the archive of what was measured.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for name, command in steps(args, work):
            result["steps"][name] = step(name, command, out, limits[name], console)
            collect(name, out, work, result)
            write_result(out, result)
    except KeyboardInterrupt:
        console.print("stopped: the table and gpu_check.json hold the steps that finished")
        result["stopped"] = True
    summarize(result, args.tiny, console)
    write_result(out, result)
    console.print(f"wrote {out / 'gpu_check.json'}")
    if args.archive:
        archive(out, work, args.archive.resolve(), console)
    return 0 if all(o["status"] == 0 for o in result["steps"].values()) else 1


def steps(args: argparse.Namespace, work: Path):
    """(name, command) of each step not skipped, the speed steps first."""
    python = [sys.executable]
    for name, (recipe, images, sets, policy, data) in (TINY if args.tiny else FULL).items():
        if name in args.skip:
            continue
        timing = (["--steps", "2", "--warmup", "1", "--repeats", "1", "--profile-steps", "2"]
                  if args.tiny else [])
        yield name, [
            *python, "benchmarks/epochs_per_hour.py", f"recipes/{recipe}.toml",
            "--synthetic", str(images), "--photo-policy", policy, "--data-dir",
            str(work / "data" / data),
            "--out", str(args.out.resolve() / f"epochs_per_hour_{name}.json"),
            "--profile", str(args.out.resolve() / "profiles" / name), *timing,
            "--compiled", "auto" if args.tiny else COMPILED.get(name, "auto"),
            *(a for s in sets for a in ("--set", s))]
    if "demo" not in args.skip:
        sets = DEMO_TINY if args.tiny else []
        yield "demo", [
            *python, "-m", "accelerate.commands.launch", "--num_processes", "1",
            "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
            "fasttt/train.py", "recipes/digits_d06.toml", "--runs-dir", str(work / "runs"),
            "--set", f'data.beton_dir="{work / "data" / "digits"}"',
            *(a for s in sets for a in ("--set", s))]
    # the project's addopts ask for pytest-xdist, which a bare GPU machine may lack
    # by module, so each module's shared runs train once
    workers = ["-n", "4", "--dist", "loadscope"] if importlib.util.find_spec("xdist") else []
    pytest = [*python, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider",
              "--durations=10"]
    if "tests" not in args.skip:
        # the two-rank cache build hides CUDA (gloo on the CPU): nothing of the GPU's
        yield "tests", [*pytest, "-q", "-k", "not two_ranks", *workers,
                        *(["tests/test_losses.py"] if args.tiny else DEVICE_TESTS)]
    if "compile" not in args.skip:  # -v: a timeout's log shows which tests it reached
        yield "compile", [*pytest, "-v", *COMPILE_TESTS]


def collect(name: str, out: Path, work: Path, result: dict) -> None:
    """Read a finished step's figures into `result`."""
    json_out = out / f"epochs_per_hour_{name}.json"
    if name in FULL and json_out.is_file():
        figures = result["epochs_per_hour"][name] = json.loads(json_out.read_text())
        for row, summary in figures.get("profile", {}).items():
            result["phases"][f"{name} {row}"] = {k: summary[k] for k in PHASE_KEYS}
    if name == "demo":
        result["demo_val_top1"] = demo_results(work / "runs" / "digits_d06")


def write_result(out: Path, result: dict) -> None:
    """gpu_check.json, replaced whole."""
    (out / "gpu_check.json.tmp").write_text(json.dumps(result, indent=2) + "\n")
    os.replace(out / "gpu_check.json.tmp", out / "gpu_check.json")


def summarize(result: dict, tiny: bool, console: Console) -> None:
    """Print the steps, the speeds and the phase breakdown measured so far."""
    facts = result["environment"]
    table = Table(title=f"gpu_check{' --tiny' if tiny else ''}: {describe(facts)}")
    for column in ("step", "status", "seconds"):
        table.add_column(column, justify="right")
    for name, outcome in result["steps"].items():
        table.add_row(name, str(outcome["status"]), f"{outcome['seconds']:.0f}")
    console.print(table)
    speeds = Table(title="images/s (and the fraction of the loader's ceiling)")
    speeds.add_column("recipe")
    for row in ROWS:
        speeds.add_column(row, justify="right")
    for name, figures in result["epochs_per_hour"].items():
        rows = figures["rows"]
        speeds.add_row(name, *(f"{rows[r]['images_per_s']:,.0f} ({rows[r]['vs_loader']:.2f})"
                               if r in rows else "-" for r in ROWS))
    console.print(speeds)
    for name, figures in result["epochs_per_hour"].items():
        compiling = figures.get("compile", {})
        if compiling.get("mode"):
            console.print(f"{name}: torch.compile ({compiling['mode']}) compiled "
                          f"{compiling['graphs']} graphs in {compiling['seconds']:.0f} s")
    for line in compiled_kernels(result["phases"]):
        console.print(line)
    if result["phases"]:
        console.print(phase_table("where a step's time goes (profiles/)", result["phases"]))
        for name, profile in result["phases"].items():
            if profile["device"] == "cuda" and not profile["phases"].get(
                    "fasttt.backward", {}).get("device_ms_per_step"):
                console.print(f"{name}: no GPU kernel was credited to fasttt.backward; "
                              "compare the phases with 'GPU kernels, all'")
    if result.get("demo_val_top1"):
        console.print("demo, last-epoch val top-1 per generation: "
                      + ", ".join(f"{v:.2f}%" for v in result["demo_val_top1"]))


def compiled_kernels(phases: dict[str, dict]) -> list[str]:
    """A line per profiled row that ran eager and compiled on a GPU: kernel ms per 1024
    images of each, the model's own time before and after torch.compile."""
    lines = []
    for name, eager in phases.items():
        compiled = phases.get(f"{name}_compiled")
        per_1024 = "kernel_ms_per_1024_images"
        if compiled and eager["device"] == "cuda" and compiled[per_1024]:
            before, after = eager[per_1024], compiled[per_1024]
            lines.append(f"{name}: GPU kernels per 1024 images, eager {before:.1f} ms, "
                         f"compiled {after:.1f} ms ({before / after:.2f}x)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
