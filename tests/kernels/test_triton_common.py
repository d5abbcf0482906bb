"""The helpers shared by the triton ops: row tiling, the split of a reduction over rows, and
the deterministic sum of its per-program partials (checked here directly, at widths past one
column block, which the ops' own tests at tiny channel counts never reach)."""
import pytest
import torch

from fusedit.kernels.testing import DEVICE
from fusedit.kernels.triton._common import (BACKWARD_TILE_ELEMENTS, FORWARD_TILE_ELEMENTS, row_tiling,
                                            split_rows, sum_partials)


@pytest.mark.parametrize("tile_elements", [FORWARD_TILE_ELEMENTS, BACKWARD_TILE_ELEMENTS])
@pytest.mark.parametrize("channels", [1, 3, 72, 1152, 4096, 16384])
@pytest.mark.parametrize("tokens", [1, 5, 256, 4096])
def test_row_tiling(channels, tokens, tile_elements):
    block_channels, rows, num_warps = row_tiling(channels, tokens, tile_elements)
    assert block_channels >= channels and block_channels & (block_channels - 1) == 0  # tl.arange needs a power of 2
    assert rows >= 1 and rows & (rows - 1) == 0
    assert rows < 2 * tokens  # never a tile of mostly missing rows
    assert rows * block_channels <= max(tile_elements, block_channels)  # a tile's worth of registers
    assert num_warps in (1, 2, 4, 8, 16)
    if rows * block_channels == tile_elements:
        assert num_warps == 8


def test_split_rows_gives_the_interpreter_two_splits_per_group():
    # the CPU interpreter must take the multi-split path so the tests cover sum_partials
    assert split_rows(torch.device("cpu"), 3, 10, 1) == (2, 5)
    assert split_rows(torch.device("cpu"), 3, 10, 4) == (2, 8)  # rows_per_split a multiple of the step
    assert split_rows(torch.device("cpu"), 2, 1, 4) == (1, 4)
    assert split_rows(torch.device("cpu"), 0, 0, 1) == (1, 1)  # an empty batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups, splits, width", [((), 1, 1), ((2,), 3, 7), ((2, 3), 2, 1500), ((1,), 5, 2049)])
def test_sum_partials_matches_a_float64_sum(groups, splits, width, dtype):
    partials = torch.randn(*groups, splits, width, device=DEVICE)
    got = sum_partials(partials, dtype)
    want = partials.double().sum(dim=-2)
    assert got.shape == want.shape and got.dtype == dtype
    assert not got.isnan().any()
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance)
    assert torch.equal(sum_partials(partials, dtype), got)  # a fixed order: bit-identical on every run


def test_sum_partials_of_nothing():
    assert sum_partials(torch.randn(0, 2, 8, device=DEVICE), torch.float32).shape == (0, 8)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device to differ from the current one")
def test_every_op_launches_on_its_inputs_device():
    # Triton launches on the current device; each op's launches go inside on_device(input)
    from fusedit.kernels import reference
    from fusedit.kernels import triton as ops

    generator = torch.Generator().manual_seed(0)
    shapes = {"x": (2, 5, 72), "y": (2, 5, 72), "gate": (2, 72), "shift": (2, 72), "scale": (2, 72),
              "q": (2, 2, 5, 40), "k": (2, 2, 7, 40), "v": (2, 2, 7, 40), "weight": (96, 72), "bias": (96,)}
    cpu = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    calls = {"adaln_modulate": ("x", "shift", "scale"), "gated_residual": ("x", "gate", "y"),
             "residual_adaln_modulate": ("x", "gate", "y", "shift", "scale"), "attention": ("q", "k", "v"),
             "linear_gelu": ("x", "weight", "bias")}
    with torch.cuda.device(0):
        for op, names in calls.items():
            inputs = [cpu[name].to("cuda:1").requires_grad_() for name in names]
            outputs = getattr(ops, op)(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            sum(output.sum() for output in outputs).backward()
            want = getattr(reference, op)(*[cpu[name].double() for name in names])
            want = want if isinstance(want, tuple) else (want,)
            for got, expected in zip(outputs, want):
                torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-4, msg=op)
            assert all(tensor.grad.device == torch.device("cuda:1") and torch.isfinite(tensor.grad).all()
                       for tensor in inputs), op
