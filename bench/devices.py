"""What the hardware could do at best: the peaks that MFU and the kernel rooflines divide by.

Peak matmul throughput comes from a small table of known accelerators (dense, i.e. no 2:4
sparsity, in Tflop/s counting 2 flops per multiply-add, from NVIDIA's datasheets) or from
timing one large matmul (`measure_matmul_tflops`). fp32 entries are the plain fp32 peak, not
TF32: fusedit leaves TF32 off (torch's default for matmuls), which the fp32 parity needs.

Memory bandwidth for the rooflines is measured, never read from a table: one large
device-to-device copy (`measure_copy_bandwidth`) is what a memory-bound kernel can hope for.
The datasheet figure is kept in the table for reference only.
"""
import platform
import re
from dataclasses import dataclass

import torch

from .timing import time_calls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class KnownDevice:
    name: str
    tflops: dict  # dtype name ("fp32", "bf16", "fp16") -> dense peak, Tflop/s
    datasheet_tb_per_s: float


def _entry(name, fp32, half, tb_per_s):
    return KnownDevice(name, {"fp32": fp32, "bf16": half, "fp16": half}, tb_per_s)


# (words that must all be words of torch.cuda.get_device_name(), lower case) -> entry. Whole
# words, so a GH200 is not taken for an H200 (it is measured). First match wins, so the more
# specific names come first (NVL/PCIe before the SXM default: an H100 SXM reports itself as
# "NVIDIA H100 80GB HBM3").
KNOWN_DEVICES = (
    (("h200", "nvl"), _entry("NVIDIA H200 NVL", 60.0, 835.5, 4.8)),
    (("h200",), _entry("NVIDIA H200 SXM", 67.0, 989.5, 4.8)),
    (("h100", "nvl"), _entry("NVIDIA H100 NVL", 60.0, 835.5, 3.9)),
    (("h100", "pcie"), _entry("NVIDIA H100 PCIe", 51.2, 756.5, 2.0)),
    (("h100",), _entry("NVIDIA H100 SXM", 67.0, 989.5, 3.35)),
    (("a100", "pcie", "80gb"), _entry("NVIDIA A100 PCIe 80GB", 19.5, 312.0, 1.935)),
    (("a100", "80gb"), _entry("NVIDIA A100 SXM 80GB", 19.5, 312.0, 2.039)),
    (("a100",), _entry("NVIDIA A100 40GB", 19.5, 312.0, 1.555)),
    (("l40s",), _entry("NVIDIA L40S", 91.6, 362.0, 0.864)),
    (("l40",), _entry("NVIDIA L40", 90.5, 181.0, 0.864)),
    (("l4",), _entry("NVIDIA L4", 30.3, 121.0, 0.3)),
)


@dataclass(frozen=True)
class Peak:
    """A peak and where it came from; tflops is None when unknown."""
    tflops: float | None
    source: str


def device_name(device):
    """The accelerator's marketing name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def known_device(name):
    """The KNOWN_DEVICES entry for a device name, or None."""
    words_of_name = set(re.split(r"[^a-z0-9]+", name.lower()))
    for words, entry in KNOWN_DEVICES:
        if words_of_name >= set(words):
            return entry
    return None


def matmul_peak(device, dtype_name, measure=None):
    """The peak matmul Tflop/s for MFU: measure=True times a large matmul, False reads the
    table only, None reads the table and measures when the device is not in it."""
    device = torch.device(device)
    entry = known_device(device_name(device)) if device.type == "cuda" else None
    if entry is not None and not measure:
        return Peak(entry.tflops[dtype_name], f"table: {entry.name}, {dtype_name} dense")
    if measure is False:
        return Peak(None, "unknown device: pass --measure-peak")
    size = matmul_size(device, dtype_name)
    tflops = measure_matmul_tflops(device, dtype_name, size)
    return Peak(tflops, f"measured: {size}^3 {dtype_name} matmul")


def _operands(device, dtype_name, size):
    return [torch.randn(size, size, device=device).to(DTYPES[dtype_name]) for _ in range(2)]


def matmul_size(device, dtype_name, seconds=0.05, largest=8192):
    """The side of the matmul that measures the peak: doubled from 256 until one takes
    `seconds` (or reaches `largest`), so a dtype a CPU runs slowly still measures quickly
    while a GPU gets a matmul large enough to fill it."""
    size = 256
    while size < largest:
        left, right = _operands(device, dtype_name, size)
        if time_calls(lambda _: torch.mm(left, right), device, warmup=1, repeats=1).min_s >= seconds:
            break
        size *= 2
    return size


def measure_matmul_tflops(device, dtype_name, size, repeats=5):
    """Tflop/s of the fastest of `repeats` (size x size) @ (size x size) matmuls, 2 flops per
    multiply-add: a peak is the best the device reaches, so the fastest run estimates it."""
    left, right = _operands(device, dtype_name, size)
    timing = time_calls(lambda _: torch.mm(left, right), device, warmup=2, repeats=repeats)
    return 2.0 * size ** 3 / timing.min_s / 1e12


def measure_copy_bandwidth(device, megabytes=None, repeats=10):
    """GB/s of the fastest of `repeats` large device-to-device copies, counting the bytes read
    plus the bytes written: 1 GiB on CUDA (far beyond any L2), 256 MiB on CPU (beyond a
    last-level cache)."""
    device = torch.device(device)
    if megabytes is None:
        megabytes = 1024 if device.type == "cuda" else 256
    count = megabytes * 2 ** 20 // 4
    source = torch.randn(count, device=device)
    target = torch.empty_like(source)
    timing = time_calls(lambda _: target.copy_(source), device, warmup=2, repeats=repeats)
    return 2.0 * source.numel() * source.element_size() / timing.min_s / 1e9


def cache_bytes(device):
    """Bytes an input set must exceed to be evicted between calls: the L2 on CUDA, a
    generous last-level cache on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    return 64 * 2 ** 20
