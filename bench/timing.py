"""Timing and peak memory, measured the same way for every backend.

Warm-up calls run first and are not timed (they absorb compilation, autotuning, CUDA-graph
capture and allocator growth). On CUDA each repetition is bracketed by CUDA events, so the
figure is device time and the host may queue work ahead; elsewhere a wall clock runs
around each call, after a synchronize. The median of the repetitions is the figure
reported, with min and max beside it. `call(index)` receives the repetition index so
callers can rotate through several input sets.

A call whose GPU work is shorter than the host's time to launch it (one op at DiT shapes:
an adaLN-modulate moves 38 MB, 13 us on an H100, while dispatching it through autograd and
Triton's launcher costs tens of microseconds) leaves the GPU idle between its events, so
plain events time the host. `queue_ahead=True` (the kernel microbenchmarks) holds the GPU in
a spin kernel while the host queues a group of calls, so the calls run back to back and each
event pair spans the device's work alone; a group whose hold ended before the host finished
queueing is timed again behind a longer hold. Model rows keep plain events: a training step's
launch overhead is part of the throughput its user gets.
"""
import ctypes
import functools
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


def time_calls(call, device, warmup, repeats, queue_ahead=False):
    """Timing of `call(index)` over `repeats` timed calls after `warmup` untimed ones.

    device: a torch device (CUDA events on CUDA), or None for a call that blocks by itself
    (such as a JAX call that waits for its result), timed by the wall clock alone.
    queue_ahead: on CUDA, time the device's work without the host's launch overhead (above).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for index in range(warmup):
        call(index)
    synchronize(device)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    seconds = []
    if on_cuda:
        with torch.cuda.device(device):  # events and the hold on the benchmark's device, not the current one
            indices = range(warmup, warmup + repeats)
            seconds = _queued_ahead(call, indices) if queue_ahead else _elapsed(_queue_between_events(call, indices))
    else:
        for index in range(repeats):
            started = time.perf_counter()
            call(warmup + index)  # off CUDA a call returns when its work is done
            seconds.append(time.perf_counter() - started)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)


def _queue_between_events(call, indices):
    """Each call queued between a pair of CUDA events; nothing waits for the GPU."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in indices]
    for index, (start, end) in zip(indices, events):
        start.record()
        call(index)
        end.record()
    return events


def _elapsed(events):
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


# Calls queued behind one hold: a few hundred launches at most for an op's forward and
# backward, well inside the CUDA launch queue (about a thousand), which would otherwise
# block the host until the hold ends.
QUEUED_CALLS = 10
MAX_HOLD_S = 1.0


def _queued_ahead(call, indices):
    # The host's time to queue one call, from one more untimed call (on the last warm-up's inputs).
    started = time.perf_counter()
    call(indices[0] - 1)
    host_s = time.perf_counter() - started
    torch.cuda.synchronize()
    seconds = []
    for first in range(0, len(indices), QUEUED_CALLS):
        group = indices[first:first + QUEUED_CALLS]
        hold_s = min(MAX_HOLD_S, 2 * host_s * len(group) + 1e-3)
        while True:
            times, held = _held_event_times(call, group, hold_s)
            if held or hold_s >= MAX_HOLD_S:
                break
            hold_s = min(MAX_HOLD_S, 4 * hold_s)
        seconds += times
        if not held:  # even the longest hold ran out: the call waits for the GPU itself, which no hold helps
            return seconds + _elapsed(_queue_between_events(call, indices[first + QUEUED_CALLS:]))
    return seconds


def _held_event_times(call, indices, hold_s):
    """Event times of the calls queued behind a spin of `hold_s`, and whether the spin was
    still running when the last call had been queued (no call waited on the host)."""
    torch.cuda._sleep(int(hold_s * _spin_cycles_per_second(torch.cuda.current_device())))
    hold_ended = torch.cuda.Event()
    hold_ended.record()
    events = _queue_between_events(call, indices)
    held = not hold_ended.query()
    return _elapsed(events), held


@functools.cache
def _spin_cycles_per_second(device_index):
    """The rate of torch.cuda._sleep's clock (the SM clock), measured once per device."""
    torch.cuda._sleep(1000)  # loads the spin kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000  # about 10 ms at the 1.5-2 GHz of current GPUs
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


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
    """Start a new peak: CUDA's allocator statistics, or Linux's peak RSS (VmHWM). The RSS
    peak restarts from the current RSS, so the heap memory freed since (an earlier row's
    training step, say) is first handed back to the system, where glibc allows."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _return_freed_heap()
    try:
        # Writing 5 resets the process's peak resident set size (Linux 4.0+).
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _return_freed_heap():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the peak may then include it
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
