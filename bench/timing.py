"""Timing and peak memory, measured the same way for every backend.

Warm-up calls run first and are not timed (they absorb compilation, autotuning, CUDA-graph
capture and allocator growth). On CUDA each repetition is bracketed by CUDA events, so the
figure is device time and the host may queue work ahead; elsewhere a wall clock runs
around each call, after a synchronize. The median of the repetitions is the figure
reported, with min and max beside it. `call(index)` receives the repetition index so
callers can rotate through several input sets.
"""
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def synchronize(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, device, warmup, repeats):
    """Timing of `call(index)` over `repeats` timed calls after `warmup` untimed ones.

    device: a torch device (CUDA events on CUDA), or None for a call that blocks by itself
    (such as a JAX call that waits for its result), timed by the wall clock alone.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for index in range(warmup):
        call(index)
    synchronize(device)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    seconds = []
    if on_cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for index, (start, end) in enumerate(events):
            start.record()
            call(warmup + index)
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for index in range(repeats):
            started = time.perf_counter()
            call(warmup + index)  # off CUDA a call returns when its work is done
            seconds.append(time.perf_counter() - started)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)


# ---- peak memory --------------------------------------------------------------------

_CLEAR_REFS = "/proc/self/clear_refs"


def memory_kind(device):
    """What peak_memory_bytes reports on this device, for the tables' footnotes."""
    if torch.device(device).type == "cuda":
        return "CUDA max allocated"
    if os.path.exists(_CLEAR_REFS):
        return "peak RSS of the process"
    return "peak RSS of the process since it started (not resettable here)"


def reset_peak_memory(device):
    """Start a new peak: CUDA's allocator statistics, or Linux's peak RSS (VmHWM)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Writing 5 resets the process's peak resident set size (Linux 4.0+).
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_bytes(device):
    """Bytes at the peak since reset_peak_memory: max allocated on CUDA, peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB
