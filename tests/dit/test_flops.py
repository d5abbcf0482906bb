"""Gflops counted by fvcore on the real model match the paper's Table 4 within 0.5%."""
import json

import pytest

from fusedit.dit.flops import PAPER_GFLOPS, count_gflops, flops_table
from fusedit.dit.models import DiT


def test_all_twelve_configs_match_the_paper_at_256():
    rows = flops_table()
    assert sorted(row["model"] for row in rows) == sorted(PAPER_GFLOPS[256])
    for row in rows:
        assert row["paper_gflops"] == PAPER_GFLOPS[256][row["model"]]
        assert abs(row["diff_percent"]) < 0.5, row
        assert row["latent_size"] == 32 and row["tokens"] == (32 // int(row["model"].split("/")[1])) ** 2


def test_xl2_at_512_matches_the_paper():
    (row,) = flops_table(["DiT-XL/2"], image_size=512)
    assert row["tokens"] == 1024 and abs(row["gflops"] - 524.60) / 524.60 < 0.005


def test_attention_matmuls_are_counted_for_every_op_set():
    # 2 * T^2 * C multiply-adds per block for q@k^T and p@v: the sdpa op set must count them too.
    model = DiT(input_size=8, patch_size=1, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()
    reference = count_gflops(model)
    assert count_gflops(model.set_kernels("sdpa")) == pytest.approx(reference, rel=1e-12)
    no_attention = reference - 2 * 64 * 64 * 32 / 1e9
    assert no_attention > 0 and reference > no_attention


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    from fusedit.cli import main

    path = tmp_path / "flops.json"
    assert main(["flops", "--model", "DiT-S/8", "DiT-B/8", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "DiT-S/8" in printed and "0.36" in printed
    rows = json.loads(path.read_text())
    assert {row["model"] for row in rows} == {"DiT-S/8", "DiT-B/8"}
    assert set(rows[0]) == {"model", "block", "image_size", "latent_size", "tokens", "gflops", "params", "paper_gflops", "diff_percent"}


@pytest.mark.parametrize("argv, message", [
    (["flops", "--model", "DiT-Q/2"], "unknown model config"),
    (["flops", "--image-size", "250"], "not divisible"),
])
def test_cli_bad_arguments(argv, message, capsys):
    from fusedit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
