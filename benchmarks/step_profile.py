"""torch.profiler over a few training steps: where a step's time goes, by phase and by op.

`fasttt.engine.train_epoch` names the phases of a step with `record_function` ranges
(fasttt.augment, fasttt.teacher: the cache lookup or the online teacher's forward,
fasttt.forward_loss, fasttt.metrics, fasttt.backward, fasttt.optimizer; the first four as
one, fasttt.step_graph, where run.compile_mode = "whole-step" compiles them as a graph).
`step_profiler` records a few steps after a warm-up one; `save_profile` writes the op
table (sorted by self GPU time on a GPU, else self CPU time) and a gzipped Chrome trace
(chrome://tracing, ui.perfetto.dev), and returns the summary: wall and loader wait per
step, each phase's host and GPU kernel time per step, all GPU kernels' time per step
(what the phases leave out shows beside it), the top ops. `phase_table` prints the
phases of several profiles side by side.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import torch
from rich.table import Table
from torch.autograd import DeviceType

PHASE = "fasttt."  # the prefix of the engine's ranges
TOP_OPS = 15  # in the summary
TABLE_ROWS = 30  # in <row>.txt
# A task of the autograd engine: on a GPU the backward runs on the engine's own thread.
BACKWARD_TASK = "autograd::engine::evaluate_function"


def step_profiler(device: torch.device, steps: int) -> torch.profiler.profile:
    """A profiler of `steps` steps after one warm-up step: CPU, CUDA on a GPU, no shapes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities, record_shapes=False,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1))


def phases(events, steps: int) -> dict:
    """Each fasttt.* range per step: host ms inside it, GPU kernel ms it launched, calls."""
    ranges = sorted((e for e in events if e.name.startswith(PHASE)
                     and e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    totals = {}
    for event in ranges:
        total = totals.setdefault(event.name, [0.0, 0.0, 0])
        total[0] += event.cpu_time_total
        total[1] += event.device_time_total
        total[2] += 1
    # On a GPU the autograd engine runs the backward on its own thread, outside the
    # ranges' trees: its tasks' kernels count for the range they began in.
    starts, threads = [e.time_range.start for e in ranges], {e.thread for e in ranges}
    for event in events:
        if (event.name.startswith(BACKWARD_TASK) and event.cpu_parent is None
                and event.thread not in threads):
            i = bisect.bisect_right(starts, event.time_range.start) - 1
            if i >= 0 and event.time_range.start <= ranges[i].time_range.end:
                totals[ranges[i].name][1] += event.device_time_total
    return {name: {"host_ms_per_step": _ms(host, steps), "device_ms_per_step": _ms(device, steps),
                   "calls_per_step": calls / steps}
            for name, (host, device, calls) in totals.items()}


def kernel_ms(events, steps: int) -> float:
    """Every GPU kernel's and copy's time per step, whichever range launched it (if any)."""
    return _ms(sum(e.device_time_total for e in events
                   if e.device_type != DeviceType.CPU and not e.is_user_annotation), steps)


def top_ops(averages, sort: str, steps: int) -> list[dict]:
    """The host-side ops with the most self time per step, their kernels' time counted in
    (the ranges, ProfilerStep* and the kernels' own rows left out, so none counts twice)."""
    ops = sorted((a for a in averages
                  if not a.is_user_annotation and a.device_type == DeviceType.CPU),
                 key=lambda a: getattr(a, sort), reverse=True)
    return [{"name": a.key, "self_cpu_ms_per_step": _ms(a.self_cpu_time_total, steps),
             "self_device_ms_per_step": _ms(a.self_device_time_total, steps),
             "calls_per_step": a.count / steps} for a in ops[:TOP_OPS]]


def save_profile(profiler: torch.profiler.profile, directory: Path, name: str, steps: int,
                 timing, device: torch.device) -> dict:
    """Write <name>.txt, <name>.trace.json.gz and <name>.json under `directory`; the summary.

    `timing` (images, seconds, waited) covers exactly the profiled steps.
    """
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages, events = profiler.key_averages(), profiler.events()
    directory.mkdir(parents=True, exist_ok=True)
    table = averages.table(sort_by=sort, row_limit=TABLE_ROWS)
    (directory / f"{name}.txt").write_text(table + "\n")
    profiler.export_chrome_trace(str(directory / f"{name}.trace.json.gz"))  # gzipped by name
    summary = {"steps": steps, "device": device.type, "sorted_by": sort,
               "wall_ms_per_step": _ms(1e6 * timing.seconds, steps),
               "loader_wait_ms_per_step": _ms(1e6 * timing.waited, steps),
               "phases": phases(events, steps),
               # on a GPU: what the phases' kernels leave out (a backward credited to no range)
               "kernel_ms_per_step": kernel_ms(events, steps),
               "top_ops": top_ops(averages, sort, steps),
               "files": [f"{name}.txt", f"{name}.trace.json.gz", f"{name}.json"]}
    (directory / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def phase_table(title: str, profiles: dict[str, dict]) -> Table:
    """Milliseconds per step of each phase (rows) in each profile (columns)."""
    gpu = any(p["device"] == "cuda" for p in profiles.values())
    table = Table(title=f"{title}: ms per step, host{' / GPU kernels' if gpu else ''}")
    table.add_column("phase")
    for column in profiles:
        table.add_column(column, justify="right")
    for name in dict.fromkeys(n for p in profiles.values() for n in p["phases"]):
        table.add_row(name, *(_cell(p["phases"].get(name), gpu) for p in profiles.values()))
    totals = (("kernel_ms_per_step", "GPU kernels, all"),) if gpu else ()
    for key, label in (*totals, ("wall_ms_per_step", "step (wall, profiled)"),
                       ("loader_wait_ms_per_step", "waiting for the batch"),
                       ("timed_ms_per_step", "step (wall, timed rows)")):
        table.add_row(label, *(f"{p[key]:.1f}" if key in p else "" for p in profiles.values()))
    return table


def _cell(phase: dict | None, gpu: bool) -> str:
    if phase is None:
        return ""
    host = f"{phase['host_ms_per_step']:.1f}"
    return f"{host} / {phase['device_ms_per_step']:.1f}" if gpu else host


def _ms(microseconds: float, steps: int) -> float:
    return round(microseconds / 1000 / steps, 3)
