"""Compile every fusedit Triton kernel for a CUDA architecture on a machine without a GPU.

The CPU test suite runs the kernels in Triton's interpreter, which accepts programs that the
GPU compiler rejects (a `tl.dot` smaller than 16, a shared-memory tile too large) and says
nothing of registers. This script drives the real ops forward and backward at DiT-XL/2 and
odd shapes, but every kernel launch only compiles: Triton's own compiler and the ptxas it
ships turn each kernel, and each autotuning config, into a cubin for the chosen
architecture. It reports per kernel and config the shared memory, registers and spilled
bytes, and the tensor-core instructions its matmuls became (Hopper's `wgmma`, or the older
`mma.sync`), and exits non-zero when a kernel does not compile or a kernel has no config that
fits the architecture's shared memory.

    python tests/kernels/cuda_compile.py --arch 90            # H100; --arch 80 for A100
    python tests/kernels/cuda_compile.py --arch 90 --json out.json

Run it without TRITON_INTERPRET: the kernels must be defined as GPU kernels. It hooks into
Triton's runtime (a driver that reports the target and launches nothing), so it follows
the runtime's internals and is checked against the Triton version the tests install.
"""
import argparse
import collections
import datetime
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("cuda_compile.py compiles GPU kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner, driver, jit  # noqa: E402

# Shared memory one block may use (the opt-in maximum), per architecture.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class CompileOnlyDriver:
    """Stands in for the CUDA driver: reports the target, never launches."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def resource_usage(cubin):
    """(registers, spilled bytes (local memory)) of a cubin, from cuobjdump."""
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return int(usage.get("REG", 0)), int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0))


def dot_precisions(ttir):
    """The input precision of every tt.dot in a kernel's Triton IR, sorted and distinct
    (`ieee` where the IR omits it: the default)."""
    dots = [line for line in ttir.splitlines() if "tt.dot " in line]
    return sorted({(re.findall(r"inputPrecision = (\w+)", line) or ["ieee"])[0] for line in dots})


def global_load_bits(ptx):
    """The widths in bits of a kernel's loads from global memory (ld.global, cp.async),
    sorted and distinct: 16 for one bf16 element at a time, 128 for 16-byte vectors."""
    widths = set()
    for suffix in re.findall(r"ld\.global[\w.:]*?((?:\.v[248])?\.[busf]\d+)\s", ptx):
        vector, bits = re.fullmatch(r"(?:\.v(\d))?\.[busf](\d+)", suffix).groups()
        widths.add(int(vector or 1) * int(bits))
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global[\w.:]*\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)",
                        ptx)
    widths.update(8 * int(size, 0) for size in copies)
    return sorted(widths)


def matrix_instructions(ptx):
    """The tensor-core instructions in a kernel's PTX, sorted and distinct: `wgmma` (Hopper's
    warpgroup matmul, sm_90a) and `mma` (mma.sync, Ampere's, which cannot reach Hopper's full
    tensor-core rate); empty for a kernel without a matmul or whose matmuls run as FMA loops."""
    kinds = {"wgmma": r"\bwgmma\.mma_async\b", "mma": r"\bmma\.sync\b"}
    return sorted(kind for kind, pattern in kinds.items() if re.search(pattern, ptx))


class Recorder:
    """Collects one record per compiled kernel variant; failures are kept, not raised, so one
    run reports every kernel that does not compile."""

    def __init__(self):
        self.records = []
        self.case = ""
        self.config = None  # the autotuning config being compiled, if any

    def compile(self, function, args, kwargs):
        record = {"case": self.case, "kernel": function.__name__, "config": self.config}
        started = time.perf_counter()
        try:
            kernel = jit_run(function, *args, warmup=True, **kwargs)
            registers, spilled = resource_usage(kernel.asm["cubin"])
            record.update(ok=True, shared=kernel.metadata.shared, registers=registers, spilled=spilled,
                          dot_precisions=dot_precisions(kernel.asm["ttir"]),
                          global_load_bits=global_load_bits(kernel.asm["ptx"]),
                          matrix_instructions=matrix_instructions(kernel.asm["ptx"]))
        except Exception as error:  # noqa: BLE001 - every failure is reported at the end
            while error.__cause__ is not None:  # Triton wraps the cause in one error per call level
                error = error.__cause__
            lines = [line.strip() for line in str(error).splitlines() if line.strip(" ^")]
            record.update(ok=False, error=f"{type(error).__name__}: {' | '.join(lines[-2:])[:400]}")
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.records.append(record)


RECORDER = Recorder()
jit_run = jit.JITFunction.run
ALL_CONFIGS = True  # False: only the first and the last config that survive pruning


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    RECORDER.compile(self, args, dict(kwargs, grid=grid))


def _compile_every_config(self, *args, grid=None, warmup=False, **kwargs):
    """Autotuner.run: compile each config that survives the kernel's pruning, through
    whatever lies between (heuristics), instead of timing them."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs)
    for config in configs if ALL_CONFIGS else list(dict.fromkeys([configs[0], configs[-1]])):
        RECORDER.config = (", ".join(f"{k}={v}" for k, v in config.kwargs.items())
                           + f", warps={config.num_warps}, stages={config.num_stages}")
        self.fn.run(*args, grid=(1,), warmup=True, **kwargs, **config.all_kwargs())
    RECORDER.config = self.nargs = None


HOOK_MISMATCH = 4  # exit code: this triton's runtime is not what the hooks below expect


def hook_mismatch():
    """What in this triton's runtime differs from what the hooks rely on, or None."""
    run_parameters = inspect.signature(jit.JITFunction.run).parameters
    needs = {
        "JITFunction.run(*args, grid, warmup, **kwargs)": {"grid", "warmup"} <= set(run_parameters),
        "Autotuner.prune_configs": hasattr(autotuner.Autotuner, "prune_configs"),
        "driver.set_active": hasattr(driver, "set_active"),
        "GPUTarget(backend, arch, warp_size)": len(inspect.signature(GPUTarget).parameters) == 3,
    }
    missing = [name for name, present in needs.items() if not present]
    return f"triton {triton.__version__} lacks {', '.join(missing)}" if missing else None


def install(arch, all_configs=True):
    global ALL_CONFIGS
    ALL_CONFIGS = all_configs
    driver.set_active(CompileOnlyDriver(arch))
    jit.JITFunction.run = _compile_instead_of_launch
    autotuner.Autotuner.run = _compile_every_config
    # The ops' device checks let CPU tensors through only when interpreting; the kernels
    # themselves were defined for the GPU (TRITON_INTERPRET is unset).
    from fusedit.kernels.triton import _common
    _common.INTERPRET = True


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_DIMS = (72, 40, 64, 80, 128, 256, 8)


def run_cases(dtypes=tuple(DTYPES), head_dims=HEAD_DIMS):
    """Each op forward and backward, per dtype, at DiT-XL/2 widths (one batch element: only
    the constexprs and autotuning keys matter) and at odd shapes."""
    from fusedit.kernels import triton as ops

    def tensor(*shape, dtype):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    for short in dtypes:
        dtype = DTYPES[short]
        for tokens, channels in ((256, 1152), (1, 40)):
            RECORDER.case = f"row ops {short} T={tokens} C={channels}"
            x, y = tensor(1, tokens, channels, dtype=dtype), tensor(1, tokens, channels, dtype=dtype)
            shift, scale, gate = (tensor(1, channels, dtype=dtype) for _ in range(3))
            outputs = [ops.adaln_modulate(x, shift, scale), ops.gated_residual(x, gate, y),
                       *ops.residual_adaln_modulate(x, gate, y, shift, scale)]
            sum(output.float().sum() for output in outputs).backward()
        for head_dim in head_dims:
            # self-attention, a padded context, the cross_attn block's 2-token context (the
            # backward's one-key-block variant)
            for query_len, key_len, masked in ((256, 256, False), (256, 77, True), (256, 2, False)):
                RECORDER.case = f"attention {short} D={head_dim} Tq={query_len} Tk={key_len}{' mask' if masked else ''}"
                q = tensor(1, 16, query_len, head_dim, dtype=dtype)
                k, v = tensor(1, 16, key_len, head_dim, dtype=dtype), tensor(1, 16, key_len, head_dim, dtype=dtype)
                mask = torch.zeros(1, key_len, dtype=torch.bool) if masked else None
                ops.attention(q, k, v, key_padding_mask=mask).float().sum().backward()
        RECORDER.case = f"linear_gelu {short} 1152->4608"
        x, weight, bias = tensor(256, 1152, dtype=dtype), tensor(4608, 1152, dtype=dtype), tensor(4608, dtype=dtype)
        ops.linear_gelu(x, weight, bias).float().sum().backward()


def problems(records, arch):
    """Failures, and kernels (per case) none of whose configs fits shared memory."""
    found = [f"{r['case']}: {r['kernel']} [{r['config']}] does not compile: {r['error']}" for r in records if not r["ok"]]
    fitting = collections.defaultdict(bool)
    for r in records:
        fitting[r["case"], r["kernel"]] |= r["ok"] and r["shared"] <= SHARED_MEMORY_LIMIT[arch]
    found += [f"{case}: {kernel}: no config fits {SHARED_MEMORY_LIMIT[arch]} bytes of shared memory"
              for (case, kernel), fits in fitting.items() if not fits]
    return found


def summary_markdown(payload):
    """A table per (dtype, kernel) of a run's JSON: variants, how many spill, the worst, and
    how many of its matmul variants run on wgmma and on mma.sync."""
    groups = collections.defaultdict(list)
    for r in payload["records"]:
        dtype = next(name for name in DTYPES if name in r["case"].split())
        groups[dtype, r["kernel"]].append(r)
    lines = [f"sm_{payload['arch']}, triton {payload['triton']}, torch {payload['torch']}, commit "
             f"{(payload['commit'] or 'unknown')[:10]}, {payload['date']}: compiled without a GPU by "
             "tests/kernels/cuda_compile.py (no timing: registers, spills and shared memory from ptxas, "
             "tensor-core instructions from the PTX).", "",
             "| dtype | kernel | variants | compiled | spill-free | most spilled (bytes) | most registers | "
             "most shared memory (KB) | on wgmma / mma.sync |", "|---|---|---|---|---|---|---|---|---|"]
    for (dtype, kernel), records in sorted(groups.items()):
        ok = [r for r in records if r["ok"]]
        on_wgmma, on_mma = (sum(kind in r["matrix_instructions"] for r in ok) for kind in ("wgmma", "mma"))
        matmuls = f"{on_wgmma} / {on_mma}" if on_wgmma or on_mma else "-"
        lines.append(f"| {dtype} | {kernel} | {len(records)} | {len(ok)} | {sum(not r['spilled'] for r in ok)} | "
                     f"{max((r['spilled'] for r in ok), default='-')} | {max((r['registers'] for r in ok), default='-')} | "
                     f"{max((r['shared'] for r in ok), default=0) / 1024:.0f} | {matmuls} |")
    return "\n".join(lines) + "\n"


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability times 10: 80 = A100, 90 = H100/H200")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES), help="default: all")
    parser.add_argument("--head-dim", nargs="+", type=int, default=list(HEAD_DIMS), metavar="D",
                        help=f"attention head dims (default: {' '.join(map(str, HEAD_DIMS))})")
    parser.add_argument("--configs", choices=("all", "ends"), default="all",
                        help="autotuning configs to compile: all that survive pruning, or only the first "
                             "and the last (the one that always fits; quicker)")
    parser.add_argument("--json", help="write every record (case, kernel, config, shared, registers, spilled) here")
    parser.add_argument("--markdown", help="write a summary table per dtype and kernel here")
    args = parser.parse_args(argv)
    if mismatch := hook_mismatch():
        print(f"cannot hook into Triton's runtime: {mismatch}", file=sys.stderr)
        return HOOK_MISMATCH
    commit = _git_commit()  # now: the code being compiled, whatever is committed meanwhile
    install(args.arch, all_configs=args.configs == "all")
    run_cases(args.dtype, args.head_dim)
    records = RECORDER.records
    payload = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "records": records}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(payload, file, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(summary_markdown(payload))
    for r in records:
        if r["ok"]:
            print(f"{r['case']:<45} {r['kernel']:<28} shared={r['shared']:>6} regs={r['registers']:>3} "
                  f"spilled={r['spilled']:>4} {'+'.join(r['matrix_instructions']) or '-':<5} {r['seconds']:>5.1f} s  "
                  f"{r['config'] or ''}")
    found = problems(records, args.arch)
    print(f"{len(records)} kernel variants compiled for sm_{args.arch} with triton {triton.__version__}; "
          f"{len(found)} problems")
    for line in found:
        print("PROBLEM", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
