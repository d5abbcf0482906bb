"""`fusedit bench`: what each way of running a DiT buys, per model config.

    fusedit bench                      whole-model rows: Gflops, images/s, MFU, memory, parity
    fusedit bench kernels              per fused op: time, GB/s, Tflop/s, fraction of roofline
    fusedit bench --json OUT/bench.json --markdown OUT/bench.md --plot OUT/bench.png

With no arguments: DiT-XL/2 at 256x256, bf16, batch 64, every backend on a GPU; DiT-S/2,
fp32, batch 2 on a CPU (a couple of minutes on a laptop).
"""
import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import asdict

from fusedit.dit.models import BLOCKS
from fusedit.files import check_output_folder, write_text

from .configs import as_list, check_device, default_device, with_block
from .devices import DTYPES
from .kernels import KERNEL_BACKENDS, OPS, PASSES, default_kernel_run, resolve_kernel_settings, run_kernel_benchmark
from .models import BACKENDS, default_run, resolve_settings, run_benchmark
from .report import (PLOT_FORMATS, check_output_path, kernels_markdown, models_markdown,
                     plot_kernels, plot_models, print_kernels, print_models, results_name, write_json)

# Options whose default depends on the device (or on `models` vs `kernels`) are left out of
# the namespace unless given, so --help shows no misleading "(default: None)".
UNSET = argparse.SUPPRESS
MODEL_ONLY = ("sample_steps", "sample_batch_size", "sample_repeats", "cfg_scale", "parity_batch_size", "no_train",
              "no_sample", "no_parity")
KERNELS_ONLY = ("op", "pass_name")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _list_item(flag, noun, convert=str):
    """The type of a list option's items. A list option takes every word up to the next flag,
    so `fusedit bench --dtype fp32 kernels` reads `kernels` as a dtype: say where it goes."""
    def item(text):
        if text in ("models", "kernels"):
            raise argparse.ArgumentTypeError(f"`{text}` goes before {flag} (fusedit bench {text} {flag} ...): "
                                             f"after it, it reads as {noun}")
        return convert(text)

    return item


def add_arguments(parser):
    parser.add_argument("what", nargs="?", choices=("models", "kernels"), default="models",
                        help="models: whole-DiT rows per backend; kernels: per-op microbenchmarks")
    parser.add_argument("--model", nargs="+", type=_list_item("--model", "a model name"), metavar="NAME",
                        default=UNSET,
                        help="model configs, e.g. DiT-XL/2 DiT-B/4 (default: DiT-XL/2 on GPU, DiT-S/2 on CPU)")
    parser.add_argument("--block", choices=BLOCKS, default="adaln_zero",
                        help="the block design of every model (the paper's Figure 5)")
    parser.add_argument("--backend", nargs="+", type=_list_item("--backend", "a backend"), metavar="NAME",
                        default=UNSET,
                        help=f"backends to compare (default: all). models: {', '.join(BACKENDS)}; "
                             f"kernels: {', '.join(KERNEL_BACKENDS)}. On CPU the compiled ones (compile, triton-compile) run "
                             "only when named")
    parser.add_argument("--dtype", nargs="+", type=_list_item("--dtype", "a dtype"), choices=tuple(DTYPES),
                        default=UNSET,
                        help="dtypes of weights and activations (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch-size", nargs="+", type=_list_item("--batch-size", "a batch size", _positive_int),
                        metavar="N", default=UNSET,
                        help="batch sizes (default: 64 on GPU, 2 on CPU; kernels: 32 on GPU)")
    parser.add_argument("--image-size", nargs="+", type=_list_item("--image-size", "an image size", _positive_int),
                        metavar="PIXELS", default=[256],
                        help="image sides in pixels, multiples of 8 (latents are side/8)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=UNSET, help="default: cuda when available")
    parser.add_argument("--warmup", type=_non_negative_int, metavar="N", default=UNSET,
                        help="untimed calls before timing (default: 5 on GPU, 1 on CPU; kernels 10 / 2)")
    parser.add_argument("--repeats", type=_positive_int, metavar="N", default=UNSET,
                        help="timed calls; the median is reported with min and max (default: 20 on GPU, 3 on CPU; "
                             "kernels 50 / 5)")
    parser.add_argument("--compile-mode", metavar="MODE", default=UNSET,
                        help="torch.compile mode of the compile backends (default: max-autotune on GPU, "
                             "max-autotune-no-cudagraphs for kernels, default on CPU)")
    parser.add_argument("--measure-peak", action="store_true", default=UNSET,
                        help="MFU against a measured large matmul instead of the table of known devices "
                             "(unknown devices are always measured)")
    parser.add_argument("--time-interpreter", action="store_true", default=UNSET,
                        help="time the triton backend even in Triton's CPU interpreter (not a speed figure)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", metavar="PATH", default=UNSET,
                        help="write every record as JSON (fields: fusedit/bench/schema.json)")
    parser.add_argument("--markdown", metavar="PATH", default=UNSET, help="write the tables as markdown (the README's)")
    parser.add_argument("--plot", metavar="PATH", default=UNSET, help=f"write a plot ({', '.join(PLOT_FORMATS)})")
    parser.add_argument("--save-results", metavar="DIR", default=UNSET,
                        help="also write DIR/<device>_<UTC date and time>_<models|kernels>.json and .md, the files "
                             "committed under bench/results/")

    models = parser.add_argument_group("model runs only")
    models.add_argument("--sample-steps", type=_positive_int, metavar="N", default=UNSET,
                        help="DDPM steps of the timed sampling loop (default: 250 on GPU, 5 on CPU)")
    models.add_argument("--sample-batch-size", type=_positive_int, metavar="N", default=UNSET,
                        help="images per sampling loop (default: half the batch on GPU, so the guided batch is "
                             "the batch; 1 on CPU)")
    models.add_argument("--sample-repeats", type=_positive_int, metavar="N", default=UNSET,
                        help="timed sampling loops (default: 1)")
    models.add_argument("--cfg-scale", type=float, metavar="SCALE", default=UNSET,
                        help="classifier-free guidance scale of the sampling loop (default: 4.0)")
    models.add_argument("--parity-batch-size", type=_positive_int, metavar="N", default=UNSET,
                        help="batch of the fp32 parity check (default: 2)")
    models.add_argument("--no-train", action="store_true", default=UNSET, help="skip the training-step rows")
    models.add_argument("--no-sample", action="store_true", default=UNSET, help="skip the sampling loop")
    models.add_argument("--no-parity", action="store_true", default=UNSET, help="skip the fp32 parity check")

    kernels = parser.add_argument_group("`bench kernels` only")
    kernels.add_argument("--op", nargs="+", type=_list_item("--op", "an op"), metavar="NAME", default=UNSET,
                         help=f"ops (default: all): {', '.join(OPS)}; cross_attention, the attention over the "
                              "2 context tokens, needs --block cross_attn")
    kernels.add_argument("--pass", nargs="+", dest="pass_name", type=_list_item("--pass", "a pass"), choices=PASSES,
                         default=UNSET,
                         help="passes (default: both)")


def _flag(name):
    return "--" + {"pass_name": "pass"}.get(name, name).replace("_", "-")


def _reject(args, names, what):
    given = [_flag(name) for name in names if hasattr(args, name)]
    if given:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to {what} only")


def _common_options(args):
    options = {}
    for name in ("warmup", "repeats", "compile_mode"):
        if hasattr(args, name):
            options[name] = getattr(args, name)
    options["seed"] = args.seed
    if hasattr(args, "time_interpreter"):
        options["time_interpreter"] = True
    if hasattr(args, "measure_peak"):
        options["measure_peak"] = True
    return options


def _grid(args, defaults):
    models = getattr(args, "model", defaults["models"])
    if args.block != "adaln_zero":
        models = [with_block(model, args.block) for model in as_list(models)]
    # lists whether given or defaulted, so the JSON's settings read the same either way
    return {"models": as_list(models), "dtype": as_list(getattr(args, "dtype", defaults["dtype"])),
            "batch_size": as_list(getattr(args, "batch_size", defaults["batch_size"])), "image_size": args.image_size}


def _results_stem(folder, records, kind):
    """A fresh path stem under --save-results: never overwrite an earlier result."""
    stem = os.path.join(folder, results_name(records, kind))
    candidate, count = stem, 1
    while os.path.exists(candidate + ".json") or os.path.exists(candidate + ".md"):
        count += 1
        candidate = f"{stem}-{count}"
    return candidate


def _kernel_run(args, device, options):
    """(run(on_record) -> records, the settings the JSON records)."""
    _reject(args, MODEL_ONLY, "model runs (`fusedit bench` without `kernels`)")
    grid = _grid(args, default_kernel_run(device))
    settings = resolve_kernel_settings(device, **options)

    def run(on_record):
        return run_kernel_benchmark(backends=getattr(args, "backend", None), ops=getattr(args, "op", None),
                                    passes=getattr(args, "pass_name", None), device=device, progress=True,
                                    on_record=on_record, **grid, **options)

    return run, {**asdict(settings), **grid, "ops": getattr(args, "op", None), "passes": getattr(args, "pass_name", None)}


def _model_run(args, device, options):
    _reject(args, KERNELS_ONLY, "`fusedit bench kernels`")
    for name in ("sample_steps", "sample_batch_size", "sample_repeats", "cfg_scale", "parity_batch_size"):
        if hasattr(args, name):
            options[name] = getattr(args, name)
    for flag, option in (("no_train", "train"), ("no_sample", "sample"), ("no_parity", "parity")):
        if hasattr(args, flag):
            options[option] = False
    grid = _grid(args, default_run(device))
    settings = resolve_settings(device, **options)

    def run(on_record):
        return run_benchmark(backends=getattr(args, "backend", None), device=device, progress=True,
                             on_record=on_record, **grid, **options)

    return run, {**asdict(settings), **grid}


class _Terminated(KeyboardInterrupt):
    """A SIGTERM, handled as Ctrl-C is."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A time limit's SIGTERM (`timeout 300 fusedit bench ...`) stops the run as Ctrl-C does:
    the message says where the results are, and no temporary file is left half-written. Yields
    a check that raises if a SIGTERM came and has not stopped the run yet: the handler does not
    raise inside an import (an exception in a native module's initialisation can crash the
    process), and Python drops an exception raised in a garbage-collector callback, so the run
    also stops at the next finished measurement. (Python runs the handler between bytecodes:
    a SIGTERM during a long compile or device wait acts when that returns.) Only the main
    thread may set handlers; elsewhere the check does nothing."""
    terminated = []

    def stop_if_terminated():
        if terminated:
            raise _Terminated

    if threading.current_thread() is not threading.main_thread():
        yield stop_if_terminated
        return

    def terminate(signum, frame):
        terminated.append(signum)
        if not _in_import(frame):
            raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield stop_if_terminated
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _in_import(frame):
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def main(args):
    started = time.perf_counter()
    device = check_device(getattr(args, "device", None) or default_device())
    json_path, markdown_path, plot_path = (getattr(args, name, None) for name in ("json", "markdown", "plot"))
    results = getattr(args, "save_results", None)
    check_output_path("--json", json_path)
    check_output_path("--markdown", markdown_path)
    check_output_path("--plot", plot_path, PLOT_FORMATS)
    if results is not None:
        if not os.path.isdir(results):
            raise FileNotFoundError(f"--save-results {results}: no such folder" +
                                    (" (it is a file; give a folder)" if os.path.exists(results) else ""))
        check_output_folder("--save-results", results)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 220)  # a log file gets the whole table
    if args.what == "kernels":
        run, settings = _kernel_run(args, device, _common_options(args))
        print_table, markdown, plot = print_kernels, kernels_markdown, plot_kernels
    else:
        run, settings = _model_run(args, device, _common_options(args))
        print_table, markdown, plot = print_models, models_markdown, plot_models
    settings["backends"] = getattr(args, "backend", None)
    json_paths, markdown_paths = [json_path], [markdown_path]

    def write_files(records, complete):
        """JSON, markdown and plot, rewritten (atomically) after every row, and the first two
        after each measurement within a row: a run stopped by a time limit or Ctrl-C keeps what
        it measured there, marked "complete": false."""
        if results is not None and len(json_paths) == 1:  # the stem is chosen once, at the first write
            stem = _results_stem(results, records, args.what)
            json_paths.append(stem + ".json")
            markdown_paths.append(stem + ".md")
        for path in filter(None, json_paths):
            write_json(path, args.what, records, settings, complete=complete)
        for path in filter(None, markdown_paths):
            write_text(path, markdown(records))
        if plot_path is not None and not (records and records[-1]["status"] == "incomplete"):
            plot(plot_path, records)  # after whole rows only: a plot is slow to draw, and a partial row is in the JSON

    try:
        with _sigterm_as_interrupt() as stop_if_terminated:
            def on_record(records):
                write_files(records, complete=False)
                stop_if_terminated()

            records = run(on_record=on_record)
            stop_if_terminated()
    except KeyboardInterrupt as stop:
        kept = ", ".join(filter(None, json_paths + markdown_paths)) or "no file (no --json/--markdown)"
        print(f"interrupted; what was measured so far is in {kept}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT)
    print_table(records, console)
    write_files(records, complete=True)
    for path in filter(None, json_paths + markdown_paths + [plot_path]):
        print(f"wrote {path}")
    print(f"benchmarked in {time.perf_counter() - started:.0f} s")
    errors = [record for record in records if record["status"] == "error"]
    if errors:
        print(f"{len(errors)} row(s) ended in an error; see their status above", file=sys.stderr)
        return 1
    return 0
