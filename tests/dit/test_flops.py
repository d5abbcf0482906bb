"""Gflops counted by fvcore on the real model match the paper's Table 4 within 0.5%; without
fvcore, torch's FlopCounterMode gives the same count."""
import json
import re
import sys

import pytest

from fusedit.dit.flops import PAPER_GFLOPS, _build_cheaply, count_gflops, flop_counter, flops_table, paper_gflops
from fusedit.dit.models import DiT

TORCH_COUNTER = "torch FlopCounterMode"


def test_all_twelve_configs_match_the_paper_at_256():
    rows = flops_table()
    assert sorted(row["model"] for row in rows) == sorted(PAPER_GFLOPS[256])
    for row in rows:
        assert row["paper_gflops"] == PAPER_GFLOPS[256][row["model"]]
        assert row["diff_percent"] == pytest.approx(100 * (row["gflops"] - row["paper_gflops"]) / row["paper_gflops"])
        assert abs(row["diff_percent"]) < 0.5, row
        assert row["latent_size"] == 32 and row["tokens"] == (32 // int(row["model"].split("/")[1])) ** 2


def test_xl2_at_512_matches_the_paper():
    (row,) = flops_table(["DiT-XL/2"], image_size=512)
    assert row["tokens"] == 1024 and abs(row["gflops"] - 524.60) / 524.60 < 0.005


@pytest.mark.parametrize("name, image_size, block, want", [
    ("DiT-XL/2", 256, "adaln_zero", 118.64), ("DiT-S/8", 256, "adaln_zero", 0.36), ("DiT-XL/2", 512, "adaln_zero", 524.60),
    ("DiT-XL/2", 256, "cross_attn", 137.62), ("DiT-S/2", 256, "cross_attn", None), ("DiT-XL/2", 512, "in_context", None),
    ("DiT-S/2", 512, "adaln_zero", None),
])
def test_paper_figures_only_where_the_paper_gives_them(name, image_size, block, want):
    # Figure 5 gives the block designs for DiT-XL/2 at 256x256 only
    assert paper_gflops(name, image_size, block) == want


def test_attention_multiply_adds_count_both_matmuls():
    # q@k^T: Tq*Tk*D, p@v: Tq*Tk*Dv; a value head dim unlike the query's tells them apart
    from fusedit.dit.flops import _attention_multiply_adds

    assert _attention_multiply_adds((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 6)) == 2 * 3 * 4 * 5 * (8 + 6)


def test_attention_matmuls_are_counted_for_every_op_set():
    # 2 * T^2 * C multiply-adds per block for q@k^T and p@v: the sdpa op set must count them too.
    model = DiT(input_size=8, patch_size=1, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()
    reference = count_gflops(model)
    assert count_gflops(model.set_kernels("sdpa")) == pytest.approx(reference, rel=1e-12)
    no_attention = reference - 2 * 64 * 64 * 32 / 1e9
    assert no_attention > 0 and reference > no_attention


@pytest.mark.parametrize("name, block", [("DiT-S/2", "adaln_zero"), ("DiT-S/8", "in_context"),
                                         ("DiT-B/4", "cross_attn"), ("DiT-S/4", "adaln")])
def test_torch_counter_matches_fvcore(name, block):
    # They differ only by fvcore's count of the unpatchify einsum, a permutation it scores as
    # half its elements: 8 channels x 32 x 32 / 2 (1e-7 of DiT-XL/2, 1e-5 of DiT-S/8).
    pytest.importorskip("fvcore")
    model = _build_cheaply(name, input_size=32, block=block)
    fvcore_count = count_gflops(model, counter="fvcore") * 1e9
    assert count_gflops(model, counter=TORCH_COUNTER) * 1e9 + 8 * 32 * 32 // 2 == pytest.approx(fvcore_count, rel=1e-12)


def test_both_counters_give_the_hand_count_of_a_tiny_dit():
    # One block over T = 64 tokens of width 32 (patch 1, 4 -> 8 channels, 4 heads), batch 1.
    tokens, width = 64, 32
    model = DiT(input_size=8, patch_size=1, hidden_size=width, depth=1, num_heads=4, num_classes=10).eval()
    multiply_adds = (
        tokens * width * 4                                    # patch embedding (conv, 1x1 over 4 channels)
        + 256 * width + width * width                         # timestep MLP
        + width * 6 * width                                   # the block's adaLN modulation
        + tokens * width * 3 * width                          # qkv
        + 2 * tokens * tokens * width                         # q@k^T and p@v
        + tokens * width * width                              # attention projection
        + 2 * tokens * width * 4 * width                      # fc1, fc2
        + 2 * tokens * width * 4                              # two LayerNorms, 4 flops per element
        + width * 2 * width + tokens * width * 4 + tokens * width * 8)  # final layer: adaLN, LayerNorm, linear
    unpatchify = tokens * 8 // 2  # fvcore scores the permutation einsum as half its elements
    for kernels in ("reference", "sdpa"):
        model.set_kernels(kernels)
        assert count_gflops(model, counter=TORCH_COUNTER) * 1e9 == pytest.approx(multiply_adds, rel=1e-12)
        if flop_counter() == "fvcore":
            assert count_gflops(model, counter="fvcore") * 1e9 == pytest.approx(multiply_adds + unpatchify, rel=1e-12)


def test_without_fvcore_the_torch_counter_runs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)  # import fvcore.nn now raises ImportError
    monkeypatch.setitem(sys.modules, "fvcore", None)
    assert flop_counter() == TORCH_COUNTER
    (row,) = flops_table(["DiT-S/8"])
    assert abs(row["diff_percent"]) < 0.5
    from fusedit.cli import main

    assert main(["flops", "--model", "DiT-S/8"]) == 0
    assert TORCH_COUNTER in capsys.readouterr().out


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    from fusedit.cli import main

    path = tmp_path / "flops.json"
    assert main(["flops", "--model", "DiT-S/8", "DiT-B/8", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "DiT-S/8" in printed and "0.36" in printed
    rows = json.loads(path.read_text())
    assert {row["model"] for row in rows} == {"DiT-S/8", "DiT-B/8"}
    assert set(rows[0]) == {"model", "block", "image_size", "latent_size", "tokens", "gflops", "params", "paper_gflops", "diff_percent"}
    assert [row["model"] for row in flops_table("DiT-S/8", 64)] == ["DiT-S/8"]  # one name, not its letters


def test_cli_refuses_a_json_path_it_cannot_write_before_counting(tmp_path, capsys, monkeypatch):
    from fusedit.cli import main
    import fusedit.dit.flops as flops

    monkeypatch.setattr(flops, "flops_table", lambda *args: pytest.fail("counted before checking --json"))
    (tmp_path / "afile").write_text("")
    for path, message in ((tmp_path, "is a folder; give a file name"),
                          (tmp_path / "afile" / "flops.json", f"{tmp_path / 'afile'} is a file, so no folder can be made in it")):
        with pytest.raises(SystemExit):
            main(["flops", "--model", "DiT-S/8", "--json", str(path)])
        assert f"--json {path}" in (error := capsys.readouterr().err) and message in error, error


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


@pytest.mark.parametrize("models, image_size, message", [
    (None, 0, "image size must be a positive integer, got 0"),
    (None, -8, "image size must be a positive integer, got -8"),
    (None, 260, "image size 260 is not divisible by 8 (the VAE's downsampling)"),
    (["DiT-S/2", "DiT-S/8"], 80, "10x10 latents, not divisible by DiT-S/8's patch size 8"),
    (["DiT-XS/2"], 256, "unknown model config 'DiT-XS/2'"),
])
def test_bad_configs_are_refused_before_counting(models, image_size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        flops_table(models, image_size)
