"""The per-op microbenchmarks of `fusedit bench kernels`, through pytest-benchmark:

    pytest bench/ --benchmark-only

Outside the default test run (pytest.ini's testpaths is tests/). Each case is one fused
op, pass and backend at the default kernel config's shapes (DiT-XL/2, batch 32, bf16 on a
GPU; DiT-S/2, batch 2, fp32 on a CPU), with the same inputs, rotation and first call as
`fusedit bench kernels` (a copy case: one copy of the pass's bytes, as its copy row); a
synchronize closes every timed call. Cases that cannot run here
are skipped with the reason: on a CPU the triton backend (the interpreter is not a speed
figure) and compile (minutes of C++ build), everywhere an SDPA backend or xformers that
does not take these inputs.
"""
import itertools

import pytest
import torch

from fusedit.bench.devices import DTYPES
from fusedit.bench.kernels import (KERNEL_BACKENDS, OP_CASES, OPS, PASSES, Unavailable, backend_function,
                                   backend_times, config_has, copy_buffers, default_kernel_run,
                                   default_kernel_settings, first_call, input_set_count, make_input_sets, pass_cost,
                                   run_pass, shapes_for)
from fusedit.bench.timing import synchronize

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUN = default_kernel_run(DEVICE)
SETTINGS = default_kernel_settings(DEVICE)
SHAPES = shapes_for(RUN["models"][0], RUN["image_size"], RUN["batch_size"])
CASES = [(op, pass_name, backend) for op in OPS for pass_name in PASSES for backend in KERNEL_BACKENDS
         if backend_times(op, backend) and config_has(op, SHAPES)]
COMPILED = {}  # one torch.compile per op, shared by its passes


@pytest.mark.parametrize("op, pass_name, backend", CASES, ids=["-".join(case) for case in CASES])
def test_kernel(benchmark, op, pass_name, backend):
    if DEVICE == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter is not a speed figure")
    if DEVICE == "cpu" and backend == "compile":
        pytest.skip("torch.compile's C++ build takes minutes on CPU")
    case, dtype = OP_CASES[op], DTYPES[RUN["dtype"]]
    rotation = itertools.count()
    if backend == "copy":  # one copy of the pass's bytes
        sets, destinations = copy_buffers(case, SHAPES, pass_name, dtype, DEVICE, SETTINGS.seed)

        def call():
            index = next(rotation) % len(sets)
            destinations[index].copy_(sets[index])
            synchronize(DEVICE)
    else:
        try:
            function = backend_function(op, backend, SETTINGS, COMPILED)
            sets = make_input_sets(case, SHAPES, dtype, DEVICE, input_set_count(case, SHAPES, dtype, DEVICE),
                                   SETTINGS.seed)
            first_call(case, backend, function, *sets[0], pass_name, DEVICE)
        except Unavailable as why:
            pytest.skip(str(why))

        def call():
            run_pass(case, function, *sets[next(rotation) % len(sets)], pass_name)
            synchronize(DEVICE)

    nbytes, flops = pass_cost(case, SHAPES, pass_name, torch.empty((), dtype=dtype).element_size())
    benchmark.extra_info.update(bytes=nbytes, flops=flops, input_sets=len(sets), shapes=str(SHAPES), dtype=RUN["dtype"])
    benchmark(call)
