"""fusedit.bench.devices and timing: the peak table's lookup, measured peaks, timing order
statistics and the peak-memory reset."""
import contextlib
import functools
import mmap
import time

import pytest
import torch

from fusedit.bench import devices, timing
from fusedit.bench.timing import Timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name, entry", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("NVIDIA L40", "NVIDIA L40"),
    ("NVIDIA L4", "NVIDIA L4"),
])
def test_known_devices_match_the_right_entry(name, entry):
    assert devices.known_device(name).name == entry


def test_unknown_devices_have_no_entry():
    assert devices.known_device("NVIDIA GeForce GTX 1080") is None
    assert devices.known_device("AMD EPYC 7B13") is None
    # whole words only: a GH200 is not an H200 (its peak is measured instead)
    assert devices.known_device("NVIDIA GH200 480GB") is None


def test_table_peaks_are_dense_and_ordered():
    h100 = devices.known_device("NVIDIA H100 80GB HBM3")
    assert h100.tflops["bf16"] == h100.tflops["fp16"] == pytest.approx(989.5)
    assert h100.tflops["fp32"] < h100.tflops["bf16"]


def test_peak_on_an_unknown_device_is_measured_or_reported_unknown():
    if DEVICE == "cuda":
        pytest.skip("the CPU has no table entry; a GPU may")
    unknown = devices.matmul_peak("cpu", "fp32", measure=False)
    assert unknown.tflops is None and "--measure-peak" in unknown.source
    measured = devices.matmul_peak("cpu", "fp32")
    assert measured.tflops > 0 and measured.source.startswith("measured")


def test_copy_bandwidth_is_positive():
    assert devices.measure_copy_bandwidth(DEVICE, megabytes=8, repeats=2) > 0


def test_time_calls_counts_warmup_and_orders_statistics():
    seen = []
    result = timing.time_calls(seen.append, DEVICE, warmup=2, repeats=5)
    assert seen == list(range(7))  # indices continue through the timed calls, for rotating inputs
    assert result.repeats == 5 and 0 <= result.min_s <= result.median_s <= result.max_s
    with pytest.raises(ValueError, match="repeats"):
        timing.time_calls(seen.append, DEVICE, warmup=0, repeats=0)


def test_peak_memory_resets_and_sees_a_large_allocation():
    size = 64 * 2 ** 20
    if "not resettable" in timing.memory_kind(DEVICE):
        pytest.skip("this system cannot reset the peak RSS")
    timing.reset_peak_memory(DEVICE)
    before = timing.peak_memory_bytes(DEVICE)
    if DEVICE == "cuda":
        block = torch.ones(size // 4, device=DEVICE)
        del block
    else:
        # Fresh pages from the OS, resident once written: an allocator could instead hand back
        # memory the process already holds, which the resident-set peak rightly ignores.
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    assert timing.peak_memory_bytes(DEVICE) - before >= size * 0.9
    timing.reset_peak_memory(DEVICE)
    assert timing.peak_memory_bytes(DEVICE) - before < size * 0.5


@pytest.mark.skipif(DEVICE != "cpu" or "not resettable" in timing.memory_kind("cpu"), reason="the CPU's resettable RSS peak")
def test_the_rss_peak_leaves_out_heap_memory_freed_before_the_reset():
    # 64 KB tensors come from the malloc heap, which glibc keeps after they are freed: an
    # earlier benchmark row's memory that the next row's peak must not count
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc: freed heap memory may stay resident")
    size = 200 * 2 ** 20
    timing.reset_peak_memory("cpu")
    before = timing.peak_memory_bytes("cpu")
    blocks = [torch.ones(16 * 1024) for _ in range(size // (64 * 1024))]
    assert timing.peak_memory_bytes("cpu") - before >= size * 0.9
    del blocks
    timing.reset_peak_memory("cpu")
    assert timing.peak_memory_bytes("cpu") - before < size * 0.25


class _FakeClock:
    """perf_counter advances only when a call says how long it took."""
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_time_calls_reports_the_median_of_the_timed_calls_only(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    durations = [100.0, 1.0, 3.0, 8.0]  # one slow warm-up call (a compile), then three timed calls

    def call(index):
        clock.now += durations[index]

    result = timing.time_calls(call, "cpu", warmup=1, repeats=3)
    assert (result.median_s, result.min_s, result.max_s, result.repeats) == (3.0, 1.0, 8.0, 3)


@pytest.mark.parametrize("name, entry", [("NVIDIA H200 NVL", "NVIDIA H200 NVL"), ("NVIDIA L40", "NVIDIA L40")])
def test_more_specific_names_match_first(name, entry):
    assert devices.known_device(name).name == entry


def test_measured_peak_counts_two_flops_per_multiply_add_at_the_fastest_run(monkeypatch):
    monkeypatch.setattr(devices, "time_calls", lambda *args, **kwargs: Timing(2.0, 1.0, 3.0, 5))
    assert devices.measure_matmul_tflops("cpu", "fp32", 256) == pytest.approx(2 * 256 ** 3 / 1.0 / 1e12)


def test_copy_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    monkeypatch.setattr(devices, "time_calls", lambda *args, **kwargs: Timing(2e-3, 1e-3, 3e-3, 10))
    assert devices.measure_copy_bandwidth("cpu", megabytes=1) == pytest.approx(2 * 2 ** 20 / 1e-3 / 1e9)


def test_measure_peak_true_measures_even_a_known_device(monkeypatch):
    monkeypatch.setattr(devices, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(devices, "matmul_size", lambda device, dtype_name: 4096)
    monkeypatch.setattr(devices, "measure_matmul_tflops", lambda device, dtype_name, size: 123.0)
    assert devices.matmul_peak("cuda", "bf16", measure=None).tflops == 989.5
    assert devices.matmul_peak("cuda", "bf16", measure=False).tflops == 989.5
    measured = devices.matmul_peak("cuda", "bf16", measure=True)
    assert measured.tflops == 123.0 and measured.source.startswith("measured")


# NVIDIA's datasheet figures, dense: (fp32, bf16 = fp16) Tflop/s
DATASHEET_TFLOPS = {
    "NVIDIA H200 NVL": (60.0, 835.5), "NVIDIA H200 SXM": (67.0, 989.5), "NVIDIA H100 NVL": (60.0, 835.5),
    "NVIDIA H100 PCIe": (51.2, 756.5), "NVIDIA H100 SXM": (67.0, 989.5), "NVIDIA A100 PCIe 80GB": (19.5, 312.0),
    "NVIDIA A100 SXM 80GB": (19.5, 312.0), "NVIDIA A100 40GB": (19.5, 312.0), "NVIDIA L40S": (91.6, 362.0),
    "NVIDIA L40": (90.5, 181.0), "NVIDIA L4": (30.3, 121.0),
}


@pytest.mark.parametrize("entry", [entry for _, entry in devices.KNOWN_DEVICES], ids=lambda entry: entry.name)
def test_table_peaks_are_the_datasheets(entry):
    fp32, half = DATASHEET_TFLOPS[entry.name]
    assert (entry.tflops["fp32"], entry.tflops["bf16"], entry.tflops["fp16"]) == (fp32, half, half)


def test_every_datasheet_figure_has_its_table_entry():
    assert sorted(entry.name for _, entry in devices.KNOWN_DEVICES) == sorted(DATASHEET_TFLOPS)


class _FakeCudaEvents:
    """torch.cuda's Event and synchronize: each event pair took 2 ms, which can only be read
    once the device was synchronized after the events were recorded."""
    def __init__(self):
        self.synchronized = True
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self):
                fake.synchronized = False

            def elapsed_time(self, end):
                if not fake.synchronized:
                    raise RuntimeError("elapsed_time before the events completed")
                return 2.0  # milliseconds, as CUDA reports them

        self.Event = Event

    def synchronize(self, device=None):
        self.synchronized = True


def test_time_calls_on_cuda_reads_the_events_after_a_synchronize(monkeypatch):
    fake = _FakeCudaEvents()
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    seen = []
    result = timing.time_calls(seen.append, "cuda", warmup=1, repeats=3)
    assert seen == [0, 1, 2, 3]
    assert (result.median_s, result.min_s, result.max_s, result.repeats) == (0.002, 0.002, 0.002, 3)


class _SimulatedGpu:
    """A host clock and one CUDA stream: work runs in the order it was queued, each piece no
    earlier than the host queued it; an event completes when the stream reaches it."""
    SPIN_RATE = 1.5e9  # torch.cuda._sleep's cycles per second

    def __init__(self, monkeypatch, host_s, gpu_s, waits=False):
        self.host, self.stream, self.spins = 0.0, 0.0, []
        self.host_s, self.gpu_s, self.waits = host_s, gpu_s, waits
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = fake.stream = max(fake.stream, fake.host)

            def query(self):
                return fake.host >= self.at

            def synchronize(self):
                fake.host = max(fake.host, self.at)

            def elapsed_time(self, end):
                return (end.at - self.at) * 1e3

        for name, value in (("Event", Event), ("synchronize", self.synchronize), ("_sleep", self.spin),
                            ("current_device", lambda: 0), ("device", lambda device: contextlib.nullcontext())):
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(timing, "time", self)
        # the spin rate measured on this fake, in a cache of its own: a real GPU's stays as it was
        monkeypatch.setattr(timing, "_spin_cycles_per_second", functools.cache(timing._spin_cycles_per_second.__wrapped__))

    def perf_counter(self):
        return self.host

    def run(self, seconds):
        self.stream = max(self.stream, self.host) + seconds

    def spin(self, cycles):
        self.spins.append(cycles / self.SPIN_RATE)
        self.run(cycles / self.SPIN_RATE)

    def synchronize(self, device=None):
        self.host = max(self.host, self.stream)

    def call(self, index):
        """An op whose launch takes the host `host_s` and whose kernel takes the GPU `gpu_s`."""
        self.host += self.host_s
        self.run(self.gpu_s)
        if self.waits:  # an op that reads a result back (an .item(), say)
            self.synchronize()


def test_queued_ahead_times_the_device_where_plain_events_time_the_launches(monkeypatch):
    # an adaLN-modulate at DiT-XL/2 shapes: 13 us on an H100's HBM, 50 us to launch from Python
    gpu = _SimulatedGpu(monkeypatch, host_s=50e-6, gpu_s=13e-6)
    plain = timing.time_calls(gpu.call, "cuda", warmup=2, repeats=25)
    assert plain.median_s == pytest.approx(50e-6)  # the GPU idles, waiting for each launch
    queued = timing.time_calls(gpu.call, "cuda", warmup=2, repeats=25, queue_ahead=True)
    assert (queued.median_s, queued.min_s, queued.max_s) == pytest.approx((13e-6, 13e-6, 13e-6))
    assert len(gpu.spins) == 2 + 3  # measuring the spin rate (once), then one hold per group of 10 calls
    assert gpu.spins[1] == pytest.approx(20e6 / gpu.SPIN_RATE)


def test_a_hold_too_short_for_the_host_is_lengthened(monkeypatch):
    gpu = _SimulatedGpu(monkeypatch, host_s=50e-6, gpu_s=13e-6)
    launches = iter([1e-6] + [200e-6] * 100)  # the call the hold is sized from launched 200 times faster than the rest

    def call(index):
        gpu.host_s = next(launches)
        gpu.call(index)

    queued = timing.time_calls(call, "cuda", warmup=0, repeats=10, queue_ahead=True)
    assert queued.median_s == pytest.approx(13e-6)
    assert len(gpu.spins) == 2 + 2  # the spin rate, the short hold, then a longer one
    assert gpu.spins[3] == pytest.approx(4 * gpu.spins[2])


def test_a_call_that_waits_for_the_gpu_is_timed_without_endless_holds(monkeypatch):
    gpu = _SimulatedGpu(monkeypatch, host_s=50e-6, gpu_s=13e-6, waits=True)
    queued = timing.time_calls(gpu.call, "cuda", warmup=1, repeats=30, queue_ahead=True)
    assert queued.median_s == pytest.approx(63e-6)  # its own launch and kernel, one after the other
    assert max(gpu.spins) == pytest.approx(timing.MAX_HOLD_S)
    assert len(gpu.spins) <= 2 + 6  # the first group's holds, growing to the longest; none after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times a real GPU's queue")
def test_queued_ahead_leaves_the_host_out_of_a_real_gpu_time():
    x = torch.zeros(1, device="cuda")

    def slow_to_launch(index):
        time.sleep(2e-3)
        x.add_(1)

    assert timing.time_calls(slow_to_launch, "cuda", warmup=1, repeats=12).median_s > 1.5e-3
    assert timing.time_calls(slow_to_launch, "cuda", warmup=1, repeats=12, queue_ahead=True).median_s < 0.5e-3


def test_peak_rss_is_read_from_vmhwm_in_kibibytes(monkeypatch):
    import io

    status = "Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t  1234 kB\nVmRSS:\t  1000 kB\n"
    monkeypatch.setattr(timing, "open", lambda path, *args: io.StringIO(status), raising=False)
    assert timing.peak_memory_bytes("cpu") == 1234 * 1024


def test_matmul_size_doubles_until_one_matmul_takes_long_enough(monkeypatch):
    monkeypatch.setattr(devices, "_operands", lambda device, dtype_name, size: (None, None))
    for largest, size in ((8192, 1024), (512, 512)):
        seconds = iter([0.01, 0.02, 0.06, 0.2])  # the 256, 512, 1024 and 2048 matmuls
        monkeypatch.setattr(devices, "time_calls", lambda *args, **kwargs: Timing(0.0, next(seconds), 1.0, 1))
        assert devices.matmul_size("cpu", "fp32", seconds=0.05, largest=largest) == size
