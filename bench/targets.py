"""The fused kernels' speed targets, read off the rows of `fusedit bench kernels`.

Per config, op and pass, the triton row is held to its target:

    adaln_modulate, gated_residual,   memory-bound: achieved GB/s (lower-bound bytes over the
    residual_adaln_modulate           median time) >= 85% of the measured copy bandwidth
    attention, cross_attention        at least as fast as the fastest SDPA backend that ran
    linear_gelu                       at least as fast as the eager op: a cuBLAS matmul
                                      followed by a separate GELU

Each check gives the baseline time, the time that just meets the target (the op's bytes at
85% of the copy bandwidth, or the baseline row's median), and ratio = baseline time /
triton's median: >= 1 meets the target. A memory-bound op's check also gives its `copy`
row's median (one copy of the same bytes) and copy_ratio = that / triton's median: how close
the kernel comes to a copy of its own size, which launch and ramp-up slow more than the
large copy the bandwidth is measured with (no verdict rests on it). A check has no verdict
(met is None, and the reason says why) when the triton row or every baseline row went
untimed; an interpreter row never gets one.
"""
COPY_BANDWIDTH_FRACTION = 0.85
MEMORY_BOUND_OPS = ("adaln_modulate", "gated_residual", "residual_adaln_modulate")
ATTENTION_OPS = ("attention", "cross_attention")  # the ops the SDPA backends and xformers also run
_CONFIG_FIELDS = ("model", "image_size", "dtype", "batch_size")


def _timed(record):
    return record["status"] == "ok" and record["ms"] is not None


def _baseline(rows, triton_row):
    """(the target in words, the baseline's name, its time in ms or None when untimed)."""
    op = triton_row["op"]
    if op in MEMORY_BOUND_OPS:
        bandwidth = triton_row["bandwidth_gb_per_s"]
        name = f"{COPY_BANDWIDTH_FRACTION:.0%} of a {bandwidth:.4g} GB/s copy"
        milliseconds = triton_row["bytes"] / (COPY_BANDWIDTH_FRACTION * bandwidth * 1e6) if _timed(triton_row) else None
        return f">= {COPY_BANDWIDTH_FRACTION:.0%} of the measured copy bandwidth", name, milliseconds
    if op in ATTENTION_OPS:
        target, is_baseline = "as fast as the fastest SDPA backend", lambda backend: backend.startswith("sdpa-")
    else:
        target, is_baseline = "as fast as eager: a matmul (cuBLAS on CUDA), then GELU", lambda backend: backend == "eager"
    timed = [r for r in rows if is_baseline(r["backend"]) and _timed(r)]
    if not timed:
        return target, None, None
    best = min(timed, key=lambda r: r["ms"])
    return target, best["backend"], best["ms"]


def target_checks(records):
    """One check per triton row of `records` (kernel records): the config's fields, op, pass,
    target (in words), triton_ms, baseline, baseline_ms, ratio, met, reason, copy_ms and copy_ratio."""
    groups = {}
    for record in records:
        key = tuple(record[field] for field in _CONFIG_FIELDS) + (record["op"], record["pass"])
        groups.setdefault(key, []).append(record)
    checks = []
    for rows in groups.values():
        for triton_row in (r for r in rows if r["backend"] == "triton"):
            target, baseline, baseline_ms = _baseline(rows, triton_row)
            copies = [r["ms"] for r in rows if r["backend"] == "copy" and _timed(r)]
            check = {**{field: triton_row[field] for field in _CONFIG_FIELDS}, "op": triton_row["op"],
                     "pass": triton_row["pass"], "target": target, "triton_ms": triton_row["ms"],
                     "baseline": baseline, "baseline_ms": baseline_ms, "ratio": None, "met": None, "reason": None,
                     "copy_ms": copies[0] if copies else None, "copy_ratio": None}
            if not _timed(triton_row):
                check["triton_ms"] = None  # an interpreter row timed on request is no speed figure
                check["reason"] = f"triton row {triton_row['status']}: {triton_row['reason'] or 'not timed'}"
            elif baseline_ms is None:
                check["reason"] = "no baseline row was timed"
            else:
                check["ratio"] = baseline_ms / triton_row["ms"]
                check["met"] = check["ratio"] >= 1.0
            if check["triton_ms"] is not None and check["copy_ms"] is not None:
                check["copy_ratio"] = check["copy_ms"] / triton_row["ms"]
            checks.append(check)
    return checks
