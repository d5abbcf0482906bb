"""fusedit.kernels.triton.adaln_modulate against the float64 reference, forward and backward.

Every call runs under poisoned_allocations (outputs and scratch buffers start as NaN), so an
element a kernel fails to write fails the comparison."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedit.kernels import reference
from fusedit.kernels.testing import (DEVICE, DTYPES, ROW_SHAPES, check_against_reference, poisoned_allocations,
                                     random_like_nonzero)
from fusedit.kernels.triton import adaln_modulate


def make_inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches, _, channels = shape
    return {
        "x": random_like_nonzero(shape, dtype, DEVICE, generator).requires_grad_(),
        "shift": random_like_nonzero((batches, channels), dtype, DEVICE, generator).requires_grad_(),
        "scale": random_like_nonzero((batches, channels), dtype, DEVICE, generator).requires_grad_(),
    }


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape):
    check_against_reference(adaln_modulate, reference.adaln_modulate, dtype, make_inputs(shape, dtype))


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)], ids=["no-batch", "no-tokens"])
def test_empty_batches_and_sequences(shape):
    check_against_reference(adaln_modulate, reference.adaln_modulate, torch.float32, make_inputs(shape, torch.float32))


def test_the_widest_row_is_accepted():
    # MAX_ROW_CHANNELS = 16384 itself runs (16385 is refused: test_triton_errors)
    check_against_reference(adaln_modulate, reference.adaln_modulate, torch.float32,
                            make_inputs((1, 2, 16384), torch.float32))


def test_eps_is_used():
    # a row of constant x has variance 0: normed = 0 only if eps keeps rstd finite, and the
    # result must follow eps the same way the reference does
    inputs = make_inputs((1, 3, 40), torch.float32)
    inputs["x"] = (inputs["x"].detach() * 1e-3).requires_grad_()
    inputs["eps"] = 1e-2
    check_against_reference(adaln_modulate, reference.adaln_modulate, torch.float32, inputs)


@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_eps_zero_with_tokens_that_leave_a_tile_part_empty(tokens):
    # the padding rows of a tile have variance 0: with eps = 0 their rstd is inf, which must
    # not reach d scale's sum over tokens as NaN (eps = 0 is a valid LayerNorm)
    inputs = make_inputs((2, tokens, 40), torch.float32)
    inputs["eps"] = 0.0
    check_against_reference(adaln_modulate, reference.adaln_modulate, torch.float32, inputs)


@pytest.mark.parametrize("channels", [1, 2])
def test_rows_of_one_or_two_channels(channels):
    # LayerNorm maps a row of 1 channel to 0 and one of 2 to about (-1, 1) whatever x holds:
    # d x is exactly 0 for one channel and eps / var-sized for two, a difference of O(1)
    # terms that cancel (the backward's formula in fp32 errs by 2e-2 relative, median over
    # random rows, more where the two values are close), so a relative comparison means
    # nothing there: hypothesis found such a row in test_shape_sweep. Output,
    # d shift and d scale are held to the fp32 tolerance; d x, on rows whose two channels
    # stand apart (rstd ~ 1), to an absolute 1e-5 of the O(1) terms it cancels.
    generator = torch.Generator().manual_seed(3)
    inputs = make_inputs((2, 5, channels), torch.float32)
    if channels == 2:
        offset = 0.1 * torch.randn(2, 5, 1, generator=generator)
        half_gap = 0.5 + torch.rand(2, 5, 1, generator=generator)
        inputs["x"] = (offset + half_gap * torch.tensor([1.0, -1.0])).to(DEVICE)
    x = inputs["x"] = inputs["x"].detach()  # not a leaf that needs a gradient: d x is checked below
    check_against_reference(adaln_modulate, reference.adaln_modulate, torch.float32, inputs)
    x.requires_grad_()
    grad_out = random_like_nonzero((2, 5, channels), torch.float32, DEVICE, generator)
    with poisoned_allocations():
        (grad_x,) = torch.autograd.grad(adaln_modulate(x, inputs["shift"], inputs["scale"]), [x], grad_out)
    (want,) = torch.autograd.grad(reference.adaln_modulate(x.double(), inputs["shift"].double(),
                                                           inputs["scale"].double()), [x], grad_out.double())
    torch.testing.assert_close(grad_x.double(), want.double(), rtol=0, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(
    batches=st.integers(1, 3),
    tokens=st.integers(1, 40),
    channels=st.integers(3, 160),  # 1 and 2: test_rows_of_one_or_two_channels
    dtype=st.sampled_from(DTYPES),
)
def test_shape_sweep(batches, tokens, channels, dtype):
    inputs = make_inputs((batches, tokens, channels), dtype)
    check_against_reference(adaln_modulate, reference.adaln_modulate, dtype, inputs)


def test_non_contiguous_inputs():
    # x a transposed view (channel stride != 1), shift/scale chunks of one adaLN projection
    generator = torch.Generator().manual_seed(1)
    x = random_like_nonzero((2, 48, 9), torch.float32, DEVICE, generator).transpose(1, 2).requires_grad_()
    projection = random_like_nonzero((2, 3 * 48), torch.float32, DEVICE, generator)
    shift, scale, _ = (chunk.requires_grad_() for chunk in projection.chunk(3, dim=1))
    assert not (x.is_contiguous() or shift.is_contiguous())
    inputs = {"x": x, "shift": shift.detach().requires_grad_(), "scale": scale.detach().requires_grad_()}
    assert not inputs["shift"].is_contiguous()
    check_against_reference(adaln_modulate, reference.adaln_modulate, torch.float32, inputs)


def test_expanded_output_gradient():
    # out.sum() sends back a stride-0 gradient
    inputs = make_inputs((2, 5, 24), torch.float32)
    with poisoned_allocations():
        grads = torch.autograd.grad(adaln_modulate(*inputs.values()).sum(), list(inputs.values()))
    expected = torch.autograd.grad(reference.adaln_modulate(*inputs.values()).sum(), list(inputs.values()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parameter_gradients_are_deterministic():
    # d shift / d scale are sums over T: fixed-order partial sums, so bit-identical reruns
    inputs = make_inputs((2, 37, 100), torch.float32)
    grad_out = random_like_nonzero((2, 37, 100), torch.float32, DEVICE)
    first, second = (
        torch.autograd.grad(adaln_modulate(*inputs.values()), [inputs["shift"], inputs["scale"]], grad_out)
        for _ in range(2)
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _GridRecorder:
    """Stands in for a Triton kernel, recording the grid of every launch."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_batch_and_tokens_grow_only_the_grid_axis_without_the_65535_limit(monkeypatch):
    # CUDA grids hold 2**31 - 1 programs on axis 0 but 65535 on axes 1 and 2: the programs
    # that grow with the batch and the tokens (times 3 vector gradients in the reduction) must
    # be on axis 0, and the other axes stay small (the backward's splits, the channel blocks)
    import importlib

    from fusedit.kernels.triton import residual_adaln_modulate

    modulate_module = importlib.import_module("fusedit.kernels.triton.adaln_modulate")
    common_module = importlib.import_module("fusedit.kernels.triton._common")
    grids = {}
    for module, name in ((modulate_module, "_modulate_forward_kernel"), (modulate_module, "_modulate_backward_kernel"),
                         (common_module, "_sum_partials_kernel")):
        monkeypatch.setattr(module, name, _GridRecorder(getattr(module, name), grids.setdefault(name, [])))
    batches = 3
    inputs = make_inputs((batches, 7, 1152), torch.float32)  # 2 rows a forward program: 4 token blocks
    gate, y = (random_like_nonzero(inputs["x"].shape[::2], torch.float32, DEVICE).requires_grad_(),
               random_like_nonzero(inputs["x"].shape, torch.float32, DEVICE).requires_grad_())
    adaln_modulate(*inputs.values()).sum().backward()
    x_new, modulated = residual_adaln_modulate(inputs["x"], gate, y, inputs["shift"], inputs["scale"])
    (x_new.sum() + modulated.sum()).backward()
    assert all(len(launches) == 2 for launches in grids.values()), grids
    # the backward's splits: 2 per batch element in the interpreter, on a GPU enough to fill
    # its SMs (7 here on an H100: one per token), whatever the batch
    splits = 2 if DEVICE == "cpu" else common_module.split_rows(inputs["x"].device, 1, 65535, 1)[0]
    for name, launches in grids.items():
        for grid in launches:
            assert grid[0] >= batches and all(extent <= max(2, splits) for extent in grid[1:]), (name, grid)
    assert grids["_modulate_forward_kernel"] == [(batches * 4,)] * 2


def test_poisoning_catches_an_unwritten_element():
    # the harness itself: a buffer from torch.empty with one element never written must fail
    from fusedit.kernels.testing import assert_close

    want = torch.ones(2, 3, 4)
    with poisoned_allocations():
        got = torch.empty(2, 3, 4)
    got.view(-1)[:-1] = 1.0
    with pytest.raises(AssertionError, match="relative error inf"):
        assert_close(got, want, torch.float32)


def test_poisoning_catches_a_write_past_the_end():
    with pytest.raises(AssertionError, match=r"past the end of 1 of the 2 buffers allocated here: \(4,\) torch.float32"):
        with poisoned_allocations():
            inside, past = torch.empty(2, 3), torch.empty_like(torch.ones(4))
            inside.fill_(1.0)
            torch.as_strided(past, (5,), (1,)).fill_(1.0)  # one element beyond its 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # fake outputs keep 16-bit dtypes
def test_opcheck(dtype):
    inputs = make_inputs((2, 3, 8), dtype)
    torch.library.opcheck(torch.ops.fusedit.adaln_modulate.default, (*inputs.values(), 1e-6))
    x, _, scale = (tensor.detach() for tensor in inputs.values())
    grad_out = random_like_nonzero(x.shape, dtype, DEVICE)
    torch.library.opcheck(torch.ops.fusedit.adaln_modulate_backward.default, (grad_out, x, scale, 1e-6))


def test_compiles_without_graph_breaks():
    inputs = make_inputs((2, 3, 8), torch.float32)

    def modulate_twice(x, shift, scale):
        return adaln_modulate(adaln_modulate(x, shift, scale) * 2.0, shift, scale)

    torch._dynamo.reset()
    compiled = torch.compile(modulate_twice, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs.values())
    grads = torch.autograd.grad(out.sum(), list(inputs.values()))
    eager_grads = torch.autograd.grad(modulate_twice(*inputs.values()).sum(), list(inputs.values()))
    torch.testing.assert_close(out, modulate_twice(*inputs.values()))
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
