"""Showing benchmark records: a rich table on the terminal, a progress bar while running,
JSON (one record per row, fields listed in fusedit/bench/schema.json), the markdown table
the README shows, and a matplotlib plot. Files are written whole or not at all."""
import contextlib
import json
import math
import os
import re

from fusedit.files import check_output_file, write_atomically

from .targets import target_checks

SCHEMA_VERSION = 5  # 2: the file says whether the run finished ("complete"); 3: kernel files hold "targets";
# 4: kernel records hold context_tokens (the cross_attention op); 5: copy rows, and copy_ms/copy_ratio in targets
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")
ENVIRONMENT_FIELDS = ("device", "device_type", "torch_version", "cuda_version", "triton_version", "jax_version",
                      "python_version", "git_commit", "git_dirty", "date")


# ---- progress -------------------------------------------------------------------------

class _SilentProgress:
    def describe(self, text):
        pass

    def advance(self):
        pass


class _RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def describe(self, text):
        self.progress.update(self.task, description=text)

    def advance(self):
        self.progress.advance(self.task)


@contextlib.contextmanager
def progress_bar(total, enabled):
    """A rich progress bar on stderr (so stdout keeps only the tables), or nothing."""
    if not enabled:
        yield _SilentProgress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield _RichProgress(progress, progress.add_task("starting", total=total))


# ---- formatting ------------------------------------------------------------------------

def _number(value, digits=1):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if value >= 1 else f"{value:.3g}"


def _gflops(value):
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.01 else f"{value:.3g}"


def _percent(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def _gigabytes(value):
    return "-" if value is None else f"{value / 1e9:.2f}"


def _error(value):
    return "-" if value is None else f"{value:.1e}"


def _spread(median, low, high, unit):
    if median is None:
        return "-"
    return f"{_number(median, 2)} {unit} ({_number(low, 2)}-{_number(high, 2)})" if low != high else \
        f"{_number(median, 2)} {unit}"


def _milliseconds(value):
    return "-" if value is None else f"{_number(value, 2)} ms"


def _status(record):
    return record["status"] if not record["reason"] else f"{record['status']}: {record['reason']}"


def _config_label(record):
    return f"{record['model']} {record['image_size']}px {record['dtype']} b{record['batch_size']}"


def _group(records, key):
    groups = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


# ---- model runs ------------------------------------------------------------------------

MODEL_COLUMNS = ("backend", "forward img/s", "forward MFU", "train img/s", "train MFU", "sampling img/s",
                 "peak memory (GB) fwd / train", "parity out / grad", "status")


def _rate(images_per_s, median, low, high, unit, separator):
    """Throughput with the median call time and its spread under it."""
    if images_per_s is None:
        return "-"
    return f"{_number(images_per_s)}{separator}{_spread(median, low, high, unit)}"


def _model_cells(record, separator="\n"):
    return (
        record["backend"] + (f" ({record['compile_mode']})" if record["compile_mode"] else ""),
        _rate(record["forward_images_per_s"], record["forward_ms"], record["forward_ms_min"], record["forward_ms_max"],
              "ms", separator),
        _percent(record["forward_mfu"]),
        _rate(record["train_images_per_s"], record["train_ms"], record["train_ms_min"], record["train_ms_max"],
              "ms", separator),
        _percent(record["train_mfu"]),
        _rate(record["sample_images_per_s"], record["sample_seconds"], record["sample_seconds_min"],
              record["sample_seconds_max"], "s", separator),
        f"{_gigabytes(record['forward_peak_memory_bytes'])} / {_gigabytes(record['train_peak_memory_bytes'])}",
        f"{_error(record['parity_output_rel_error'])} / {_error(record['parity_grad_rel_error'])}",
        _status(record),
    )


def _count(number, noun):
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _model_caption(rows):
    first = rows[0]
    sampled = next((r for r in rows if r["sample_steps"]), None)
    sampling = (f"sampling: {sampled['sample_steps']} DDPM steps, CFG {sampled['cfg_scale']:g}, "
                f"{_count(sampled['sample_batch_size'], 'image')} per loop, median of {sampled['sample_repeats']}"
                if sampled else "sampling: not run")
    return (f"{first['model']} at {first['image_size']}x{first['image_size']}: {_gflops(first['gflops_per_image'])} Gflops/image, "
            f"{first['params'] / 1e6:.1f} M params, batch {first['batch_size']}, {first['dtype']}; {sampling}")


def _memory_kinds(records):
    """What the memory column measures: one phrase, or one per backend where the measured rows
    differ."""
    kinds = {}
    for record in records:
        measured = record.get("forward_peak_memory_bytes") is not None or record.get("train_peak_memory_bytes") is not None
        if record.get("memory_kind") and measured:
            kinds.setdefault(record["memory_kind"], []).append(record["backend"])
    if len(kinds) <= 1:
        return next(iter(kinds), "not measured")
    return "; ".join(f"{kind} ({', '.join(dict.fromkeys(backends))})" for kind, backends in kinds.items())


def _footnotes(records):
    first = records[0]
    lines = [f"MFU: 2 flops per multiply-add (forward 2 x Gflops, training step 6 x Gflops per image) over "
             f"{_number(first['peak_tflops'])} Tflop/s ({first['peak_source']}).",
             f"Times: median of {_count(first['repeats'], 'run')} after {_count(first['warmup'], 'warm-up run')}, (min-max). "
             f"Peak memory: {_memory_kinds(records)}.",
             "Parity: max |x - ref| / max |ref| against `reference` in fp32 on the same weights and inputs, "
             "output / parameter gradients (max over tensors)."]
    for record in records:
        lines += [f"{record['backend']}: {note}" for note in record["notes"]]
    lines.append("Throughput cells: images/s, then the median time per call (min-max).")
    return lines


def _environment_line(record):
    commit = (record["git_commit"] or "unknown")[:10] + (" (uncommitted changes)" if record["git_dirty"] else "")
    versions = ", ".join(f"{name} {record[name + '_version']}" for name in ("torch", "triton", "jax")
                         if record[name + "_version"])
    cuda = f", CUDA {record['cuda_version']}" if record["cuda_version"] and record["device_type"] == "cuda" else ""
    return f"{record['device']}; {versions}{cuda}; commit {commit}; {record['date']}"


def print_models(records, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    seen = {}
    for record in records:
        seen.setdefault((record["model"], record["image_size"]), record)
    gflops = Table(title="Gflops per image (the paper's counting: 1 multiply-add = 1 flop; all 12 configs: fusedit flops)")
    for column in ("model", "image", "tokens", "params (M)", "Gflops", "paper"):
        gflops.add_column(column, justify="left" if column == "model" else "right")
    for record in seen.values():
        gflops.add_row(record["model"], str(record["image_size"]), str(record["tokens"]), f"{record['params'] / 1e6:.2f}",
                       _gflops(record["gflops_per_image"]), _gflops(record["paper_gflops"]))
    console.print(gflops)
    _print_sections(console, records, _model_caption, MODEL_COLUMNS, ("backend", "status"), _model_cells, _footnotes)


def _rich_table(title, columns, rows, left_columns, caption=None):
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for column in columns:
        table.add_column(column, overflow="fold", justify="left" if column in left_columns else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _print_sections(console, records, caption, columns, left_columns, cells, footnotes, extra_table=None):
    """One rich table per config (caption(rows) above, the environment below), then its
    footnotes, then the table extra_table(rows) gives as (title, columns, rows), if any."""
    for rows in _group(records, _config_label).values():
        console.print(_rich_table(caption(rows), columns, [cells(r) for r in rows], left_columns,
                                  caption=_environment_line(rows[0])))
        for line in footnotes(rows):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        extra = extra_table(rows) if extra_table else None
        if extra:
            console.print(_rich_table(*extra, left_columns=extra[1]))


def _markdown_sections(records, caption, columns, cells, footnotes, extra_table=None):
    """One markdown section per config, naming the device that produced it."""
    lines = []
    for rows in _group(records, _config_label).values():
        lines += [f"**{caption(rows)}**", "", f"Measured on {_environment_line(rows[0])}.", ""]
        lines += _markdown_table(columns, [cells(r) for r in rows])
        lines += [""] + [f"- {line}" for line in footnotes(rows)] + [""]
        extra = extra_table(rows) if extra_table else None
        if extra:
            title, extra_columns, extra_rows = extra
            lines += [f"*{title}*", ""] + _markdown_table(extra_columns, extra_rows) + [""]
    return "\n".join(lines)


def models_markdown(records):
    """The README's table: one section per config, naming the device that produced it."""
    return _markdown_sections(records, _model_caption, MODEL_COLUMNS, lambda r: _model_cells(r, "<br>"), _footnotes)


def _markdown_table(columns, rows):
    def escape(cell):
        return str(cell).replace("|", "\\|")

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return out + ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]


# ---- kernel runs ---------------------------------------------------------------------------

KERNEL_COLUMNS = ("op", "pass", "backend", "time (min-max)", "GB/s", "Tflop/s", "bound", "% of roofline",
                  "error vs eager", "status")


def _kernel_cells(record):
    return (
        record["op"] + (f" ({record['context_tokens']} keys)" if record["context_tokens"] else ""), record["pass"],
        record["backend"] + (f" ({record['compile_mode']})" if record["compile_mode"] else ""),
        _spread(record["ms"], record["ms_min"], record["ms_max"], "ms"),
        _number(record["achieved_gb_per_s"]), _number(record["achieved_tflops"]),
        record["bound"] or "-", _percent(record["roofline_fraction"]), _error(record["rel_error_vs_eager"]),
        _status(record),
    )


def _kernel_caption(records):
    first = records[0]
    return (f"fused ops at {first['model']} {first['image_size']}px shapes: batch {first['batch_size']}, "
            f"{first['tokens']} tokens, {first['hidden_size']} channels, {first['num_heads']} heads of "
            f"{first['head_dim']}, {first['dtype']}")


def _kernel_footnotes(records):
    first = records[0]
    lines = [f"Roofline: max(bytes / {_number(first['bandwidth_gb_per_s'])} GB/s measured copy bandwidth, "
             f"matmul flops / {_number(first['peak_tflops'])} Tflop/s ({first['peak_source']})); bytes and flops "
             "are lower bounds (each tensor the math needs moved once, matmul flops at 2 per multiply-add).",
             f"Times: median of {_count(first['repeats'], 'run')} after {_count(first['warmup'], 'warm-up run')}, (min-max), "
             "inputs rotated through enough copies to miss the cache"
             + ("; device time, the host queueing each group of calls while the GPU is held in a spin kernel, "
                "so launch overhead is not counted." if first["device_type"] == "cuda" else ".")]
    if any(record["backend"] == "copy" for record in records):
        lines.append("copy: one tensor copy that reads and writes the pass's bytes (half each), timed the same way: "
                     "what a kernel of that size can reach, beside the large copy the bandwidth is measured with.")
    for record in records:
        lines += [f"{record['op']} {record['pass']} {record['backend']}: {note}" for note in record["notes"]]
    return lines


TARGET_COLUMNS = ("op", "pass", "target", "triton", "baseline", "baseline / triton", "same-size copy / triton",
                  "verdict")


def _target_table(records):
    """The triton rows held to their speed targets (fusedit.bench.targets), or None."""
    checks = target_checks(records)
    if not checks:
        return None

    def verdict(check):
        if check["met"] is None:
            return f"no verdict ({check['reason']})"
        return "met" if check["met"] else "missed"

    rows = [(check["op"], check["pass"], check["target"], _milliseconds(check["triton_ms"]),
             f"{check['baseline'] or '-'}: {_milliseconds(check['baseline_ms'])}",
             "-" if check["ratio"] is None else f"{check['ratio']:.2f}",
             "-" if check["copy_ratio"] is None else f"{check['copy_ratio']:.2f}", verdict(check))
            for check in checks]
    return "speed targets of the triton kernels (baseline: the time that just meets the target)", TARGET_COLUMNS, rows


def print_kernels(records, console=None):
    from rich.console import Console

    _print_sections(console or Console(), records, _kernel_caption, KERNEL_COLUMNS,
                    ("op", "pass", "backend", "status", "bound"), _kernel_cells, _kernel_footnotes, _target_table)


def kernels_markdown(records):
    return _markdown_sections(records, _kernel_caption, KERNEL_COLUMNS, _kernel_cells, _kernel_footnotes,
                              _target_table)


# ---- the schema ----------------------------------------------------------------------------

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.json")
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list}


def load_schema():
    with open(SCHEMA_PATH) as handle:
        return json.load(handle)


def check_records(records, kind):
    """Raise a ValueError naming the first record field that differs from schema.json's
    `kind` ("models" or "kernels"): a missing or extra field, a null where none may be,
    or a value of the wrong JSON type."""
    fields = load_schema()[kind]
    for index, record in enumerate(records):
        missing, extra = sorted(set(fields) - set(record)), sorted(set(record) - set(fields))
        if missing or extra:
            raise ValueError(f"record {index}: fields missing {missing}, not in the schema {extra}")
        for name, spec in fields.items():
            value = record[name]
            if value is None:
                if not spec["nullable"]:
                    raise ValueError(f"record {index}: {name} is null")
            elif isinstance(value, bool) != (spec["type"] == "boolean") or not isinstance(value, _JSON_TYPES[spec["type"]]):
                raise ValueError(f"record {index}: {name}={value!r} is not a JSON {spec['type']}")


# ---- files ------------------------------------------------------------------------------------

def check_output_path(option, path, formats=None):
    """Fail before a long run, not after it: the path must take a new file (fusedit.files.
    check_output_file), the format be known."""
    if check_output_file(option, path) is None:
        return None
    if formats is not None:
        suffix = os.path.splitext(path)[1].lstrip(".").lower()
        if suffix not in formats:
            raise ValueError(f"{option} {path}: unknown image format {suffix!r}; use one of {', '.join(formats)}")
    return path


def results_name(records, kind):
    """<device>_<UTC date and time>_<kind>, the stem of a committed results file, e.g.
    nvidia-h100-80gb-hbm3_2025-06-01T1200_models."""
    first = records[0] if records else {"device": "unknown", "date": "undated"}
    device = re.sub(r"[^a-z0-9]+", "-", first["device"].lower()).strip("-")
    return f"{device}_{first['date'][:16].replace(':', '')}_{kind}"


def _finite(value):
    """JSON has no inf or NaN: such a number (a parity error on a NaN output) becomes null,
    and the record's notes say why."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_json(path, kind, records, settings, complete=True):
    """{"schema_version", "kind": "models"|"kernels", "complete", "settings", "environment",
    "records"}, and for kernels "targets" (fusedit.bench.targets); complete is false in the
    files a run rewrites after each row, until it ends."""
    environment = {field: records[0][field] for field in ENVIRONMENT_FIELDS} if records else None
    payload = {"schema_version": SCHEMA_VERSION, "kind": kind, "complete": complete, "settings": settings,
               "environment": environment, "records": records}
    if kind == "kernels":
        payload["targets"] = target_checks(records)
    payload = _finite(payload)

    def write(target):
        with open(target, "w") as handle:
            json.dump(payload, handle, indent=2, allow_nan=False)
            handle.write("\n")

    write_atomically(path, write)


def _bars(axis, groups, series, values, ylabel, title):
    """Grouped bars: one group per label in `groups`, one bar per series."""
    width = 0.8 / max(1, len(series))
    for index, name in enumerate(series):
        heights = [values.get((group, name)) or 0.0 for group in groups]
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, heights, width, label=name)
    axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    if series:
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=axis.transAxes)


def _save(figure, path):
    figure.tight_layout()
    write_atomically(path, lambda target: figure.savefig(target, dpi=130, format=os.path.splitext(path)[1].lstrip(".")))


def _speed_records(records, keys):
    """The rows a plot shows: timed, and not in an interpreter (whose time is no speed figure)."""
    return [r for r in records if r["status"] != "interpreter" and any(r.get(key) for key in keys)]


def plot_models(path, records):
    """Forward and training throughput per config and backend, and Gflops per image vs
    throughput per backend (the paper's scaling view, with speed on the y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, device = list(_group(records, _config_label)), records[0]["device"] if records else None
    records = _speed_records(records, ("forward_images_per_s", "train_images_per_s"))
    backends = list(dict.fromkeys(r["backend"] for r in records))
    forward = {(_config_label(r), r["backend"]): r["forward_images_per_s"] for r in records}
    train = {(_config_label(r), r["backend"]): r["train_images_per_s"] for r in records}
    figure, axes = plt.subplots(1, 3, figsize=(17, 5))
    _bars(axes[0], configs, backends, forward, "images / s", "forward throughput")
    _bars(axes[1], configs, backends, train, "images / s", "training-step throughput")
    scaling = axes[2]
    # One line per backend and setting (dtype, batch, image size): a line joins configs only.
    settings = list(dict.fromkeys((r["dtype"], r["batch_size"], r["image_size"]) for r in records))
    for backend in backends:
        for setting in settings:
            for key, marker in (("forward_images_per_s", "o"), ("train_images_per_s", "s")):
                points = sorted((r["gflops_per_image"], r[key], r["model"]) for r in records
                                if r["backend"] == backend and (r["dtype"], r["batch_size"], r["image_size"]) == setting
                                and r[key])
                if points:
                    label = f"{backend} {'forward' if marker == 'o' else 'train'}"
                    if len(settings) > 1:
                        label += " {} b{} {}px".format(*setting)
                    scaling.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
                    for gflops, rate, model in points:
                        scaling.annotate(model, (gflops, rate), fontsize=6, xytext=(3, 3), textcoords="offset points")
    scaling.set_xscale("log")
    scaling.set_yscale("log")
    scaling.set_xlabel("Gflops per image")
    scaling.set_ylabel("images / s")
    scaling.set_title("Gflops vs throughput", fontsize=10)
    if scaling.lines:
        scaling.legend(fontsize=7)
    else:
        scaling.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=scaling.transAxes)
    if device:
        figure.suptitle(f"fusedit bench on {device}", fontsize=11)
    _save(figure, path)
    plt.close(figure)


def plot_kernels(path, records):
    """Fraction of its roofline each backend reaches, per op and pass (and config, if several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(_group(records, _config_label)) > 1

    def group(record):
        return f"{record['op']}\n{record['pass']}" + (f"\n{_config_label(record)}" if several else "")

    groups = list(dict.fromkeys(group(r) for r in records))
    timed = _speed_records(records, ("roofline_fraction",))
    backends = list(dict.fromkeys(r["backend"] for r in timed))
    values = {(group(r), r["backend"]): r["roofline_fraction"] for r in timed}
    figure, axis = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 5))
    _bars(axis, groups, backends, values, "fraction of roofline", "fused ops: roofline time / measured time")
    if records:
        figure.suptitle(f"{_kernel_caption(records)} on {records[0]['device']}" if not several
                        else f"fused ops on {records[0]['device']}", fontsize=9)
    _save(figure, path)
    plt.close(figure)
