"""fusedit.bench: what each way of running a DiT buys, measured.

    run_benchmark(models=["DiT-XL/2"], backends=None, dtype="bf16", batch_size=64, ...)
        one record per (config, backend): Gflops, params, forward / training / sampling
        throughput, MFU, peak memory, fp32 parity with the reference;
    run_kernel_benchmark(models=["DiT-XL/2"], ops=None, backends=None, ...)
        one record per (op, pass, backend): time, GB/s, Tflop/s, fraction of the roofline;
    target_checks(kernel_records)
        each triton row held to its speed target (fusedit.bench.targets): met or missed.

Both return lists of plain dicts whose fields fusedit/bench/schema.json lists; the
`fusedit bench` command (fusedit.bench.cli) prints them and writes JSON, markdown and plots
through fusedit.bench.report.
"""
from .kernels import KERNEL_BACKENDS, OPS, PASSES, KernelSettings, default_kernel_settings, run_kernel_benchmark
from .models import BACKENDS, STATUSES, Settings, default_settings, run_benchmark
from .report import (SCHEMA_VERSION, kernels_markdown, models_markdown, plot_kernels, plot_models, print_kernels,
                     print_models, write_json)
from .targets import target_checks

__all__ = ["run_benchmark", "run_kernel_benchmark", "target_checks", "BACKENDS", "KERNEL_BACKENDS", "OPS", "PASSES", "STATUSES",
           "Settings", "KernelSettings", "default_settings", "default_kernel_settings", "SCHEMA_VERSION",
           "write_json", "models_markdown", "kernels_markdown", "plot_models", "plot_kernels", "print_models",
           "print_kernels"]
