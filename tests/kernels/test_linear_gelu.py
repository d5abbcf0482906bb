"""fusedit.kernels.triton.linear_gelu against the float64 reference, forward and backward.

Every call runs under poisoned_allocations (outputs, the saved pre-activation and scratch
buffers start as NaN), so an element a kernel fails to write fails the comparison."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedit.kernels import reference
from fusedit.kernels.testing import (DEVICE, DTYPES, assert_close, autotuned_kernels, check_against_reference,
                                     one_config_per_autotuned_kernel, poisoned_allocations, random_like_nonzero)
from fusedit.kernels.triton import linear_gelu

ON_GPU = torch.cuda.is_available()
# all of them, read at import: on CUDA tests/conftest.py narrows the kernel to its last config
MATMUL_KERNEL = autotuned_kernels()["linear_gelu._linear_gelu_kernel"]
CUDA_CONFIGS = list(MATMUL_KERNEL.configs)
# (x shape, N): one token; rows and K not multiples of the tile (the interpreter's tiles are
# 32 x 32 x 32), K = 72 and N = 40 not powers of two; K a multiple of the K tile; 2-D and 4-D x;
# two columns whose d bias is a small sum of cancelling terms (ill-conditioned: it failed fp16
# while z was saved in 16 bits, see linear_gelu.py).
SHAPES = [((1, 1, 8), 16), ((2, 5, 72), 40), ((33, 64), 96), ((2, 2, 3, 24), 8), ((28, 77), 2)]
if ON_GPU:
    SHAPES += [((4, 256, 1152), 4608), ((3, 37, 384), 1536)]


def make_inputs(x_shape, columns, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    depth = x_shape[-1]
    # weights scaled like nn.Linear's so pre-activations span GELU's curved region
    return {
        "x": random_like_nonzero(x_shape, dtype, DEVICE, generator).requires_grad_(),
        "weight": (random_like_nonzero((columns, depth), torch.float32, DEVICE, generator) / depth**0.5)
        .to(dtype).requires_grad_(),
        "bias": random_like_nonzero((columns,), dtype, DEVICE, generator).requires_grad_(),
    }


@pytest.mark.parametrize("x_shape, columns", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, x_shape, columns):
    check_against_reference(linear_gelu, reference.linear_gelu, dtype, make_inputs(x_shape, columns, dtype))


@pytest.mark.parametrize("x_shape, columns", [((0, 8), 4), ((2, 0, 8), 4), ((3, 0), 4), ((3, 8), 0)],
                         ids=["no-rows", "no-tokens", "no-depth", "no-columns"])
def test_empty_dimensions(x_shape, columns):
    # as F.linear: no depth gives gelu(bias) and a d bias; any other empty dimension empties
    check_against_reference(linear_gelu, reference.linear_gelu, torch.float32, make_inputs(x_shape, columns, torch.float32))


@settings(max_examples=5, deadline=None)
@given(
    rows=st.integers(1, 40),
    depth=st.integers(1, 80),
    columns=st.integers(1, 80),
    dtype=st.sampled_from(DTYPES),
)
def test_shape_sweep(rows, depth, columns, dtype):
    check_against_reference(linear_gelu, reference.linear_gelu, dtype, make_inputs((rows, depth), columns, dtype))


def test_large_pre_activations():
    # |z| up to ~60: GELU's tails, where a naive tanh/exp form overflows or cancels
    inputs = make_inputs((2, 3, 16), 24, torch.float32)
    inputs["bias"] = (torch.linspace(-60, 60, 24, device=DEVICE)).requires_grad_()
    check_against_reference(linear_gelu, reference.linear_gelu, torch.float32, inputs)


def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(1)
    x = random_like_nonzero((2, 24, 5), torch.float32, DEVICE, generator).transpose(1, 2).requires_grad_()
    weight = random_like_nonzero((24, 40), torch.float32, DEVICE, generator).t().requires_grad_()
    bias = random_like_nonzero((80,), torch.float32, DEVICE, generator)[::2].requires_grad_()
    assert not (x.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    check_against_reference(linear_gelu, reference.linear_gelu, torch.float32, {"x": x, "weight": weight, "bias": bias})


def test_pre_activation_saved_only_when_a_gradient_will_be_needed():
    inputs = make_inputs((2, 5, 16), 24, torch.float32)
    op = torch.ops.fusedit.linear_gelu.default
    with torch.no_grad():
        assert linear_gelu(*inputs.values()).shape == (2, 5, 24)
    out, preactivation = op(*inputs.values(), False)
    assert preactivation.numel() == 0
    out, preactivation = op(*inputs.values(), True)
    assert preactivation.shape == out.shape
    assert_close(preactivation, torch.nn.functional.linear(*inputs.values()), torch.float32, what="z")


def test_the_wrapper_saves_the_pre_activation_exactly_when_some_input_needs_a_gradient(monkeypatch):
    # saving when nothing needs it wastes an (M, N) fp32 buffer (every sampling step);
    # not saving when one input does makes the backward recompute the matmul
    module = importlib.import_module("fusedit.kernels.triton.linear_gelu")
    decisions, forward = [], module.linear_gelu_forward

    def spy(x, weight, bias, save_preactivation):
        decisions.append(save_preactivation)
        return forward(x, weight, bias, save_preactivation)

    monkeypatch.setattr(module, "linear_gelu_forward", spy)
    inputs = {name: tensor.detach() for name, tensor in make_inputs((2, 5, 16), 24, torch.float32).items()}
    with torch.no_grad():
        linear_gelu(*(tensor.requires_grad_() for tensor in inputs.values()))
    expected = [False]
    for needing in [(), ("x",), ("weight",), ("bias",)]:
        linear_gelu(*(tensor.detach().requires_grad_(name in needing) for name, tensor in inputs.items()))
        expected.append(bool(needing))
    assert decisions == expected


def test_backward_recomputes_a_pre_activation_that_was_not_saved():
    # the op called directly with save_preactivation=False still differentiates correctly
    def linear_gelu_unsaved(x, weight, bias):
        return torch.ops.fusedit.linear_gelu.default(x, weight, bias, False)[0]

    inputs = make_inputs((3, 16), 8, torch.float32)
    check_against_reference(linear_gelu_unsaved, reference.linear_gelu, torch.float32, inputs)


def test_bias_gradient_is_deterministic():
    inputs = make_inputs((70, 24), 40, torch.float32)
    grad_out = random_like_nonzero((70, 40), torch.float32, DEVICE)
    first, second = (torch.autograd.grad(linear_gelu(*inputs.values()), inputs["bias"], grad_out) for _ in range(2))
    assert torch.equal(first[0], second[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # z stays fp32 for 16-bit inputs
def test_opcheck(dtype):
    inputs = make_inputs((2, 3, 8), 12, dtype)
    for save_preactivation in (True, False):
        torch.library.opcheck(torch.ops.fusedit.linear_gelu.default, (*inputs.values(), save_preactivation))
    grad_out = random_like_nonzero((2, 3, 12), dtype, DEVICE)
    preactivation = random_like_nonzero((2, 3, 12), torch.float32, DEVICE)
    torch.library.opcheck(torch.ops.fusedit.gelu_tanh_backward.default, (grad_out, preactivation))


def test_compiles_without_graph_breaks():
    inputs = make_inputs((2, 3, 8), 12, torch.float32)

    def mlp_input(x, weight, bias):
        return linear_gelu(x, weight, bias) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(mlp_input, fullgraph=True, backend="aot_eager")
    with poisoned_allocations():
        out = compiled(*inputs.values())
        grads = torch.autograd.grad(out.sum(), list(inputs.values()))
    eager_grads = torch.autograd.grad(mlp_input(*inputs.values()).sum(), list(inputs.values()))
    torch.testing.assert_close(out, mlp_input(*inputs.values()))
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_autotuned_kernels_are_all_found():
    """tests/conftest.py narrows these on CUDA; a kernel it missed would autotune in every test."""
    assert set(autotuned_kernels()) == {"linear_gelu._linear_gelu_kernel", "attention._forward_kernel",
                                        "attention._backward_query_kernel", "attention._backward_key_kernel"}


def test_one_config_per_autotuned_kernel_narrows_and_restores(monkeypatch):
    first, last = CUDA_CONFIGS[0], CUDA_CONFIGS[-1]
    monkeypatch.setattr(MATMUL_KERNEL, "configs", [first, last])
    with one_config_per_autotuned_kernel():
        assert MATMUL_KERNEL.configs == [last]
        assert all(len(kernel.configs) == 1 for kernel in autotuned_kernels().values())
    assert MATMUL_KERNEL.configs == [first, last]


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has one config; autotuning needs a GPU")
def test_every_cuda_config():
    inputs = make_inputs((2, 256, 1152), 4608, torch.bfloat16, seed=5)
    for config in CUDA_CONFIGS:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(MATMUL_KERNEL, "configs", [config])
            try:
                check_against_reference(linear_gelu, reference.linear_gelu, torch.bfloat16, inputs)
            except AssertionError as error:
                raise AssertionError(f"linear_gelu with {config}: {error}") from error


@pytest.mark.parametrize("wanted", ["x", "weight"])
def test_only_the_inputs_that_need_a_gradient_get_one(wanted):
    generator = torch.Generator().manual_seed(1)  # a CPU one: random_like_nonzero draws on the CPU
    x = random_like_nonzero((2, 3, 8), torch.float32, DEVICE, generator)
    weight = random_like_nonzero((6, 8), torch.float32, DEVICE, generator)
    bias = random_like_nonzero((6,), torch.float32, DEVICE, generator)
    inputs = {"x": x, "weight": weight}
    inputs[wanted].requires_grad_()
    linear_gelu(x, weight, bias).sum().backward()
    x_want = x.detach().requires_grad_(wanted == "x")
    weight_want = weight.detach().requires_grad_(wanted == "weight")
    reference.linear_gelu(x_want, weight_want, bias).sum().backward()
    want = {"x": x_want.grad, "weight": weight_want.grad}
    assert inputs[wanted].grad is not None
    assert_close(inputs[wanted].grad, want[wanted], torch.float32)


def test_autocast_computes_in_the_autocast_dtype():
    generator = torch.Generator().manual_seed(2)
    x = random_like_nonzero((2, 3, 8), torch.float32, DEVICE, generator)
    weight = random_like_nonzero((6, 8), torch.float32, DEVICE, generator)
    bias = random_like_nonzero((6,), torch.float32, DEVICE, generator)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        got = linear_gelu(x, weight, bias)
        want = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
    assert got.dtype == want.dtype == torch.bfloat16
