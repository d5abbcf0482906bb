"""fusedit's Triton flash attention against reference.attention evaluated in float64:
forward and dq/dk/dv, with every buffer the op allocates NaN-poisoned first.

On the CPU the kernels run in Triton's interpreter with 16 x 16 blocks
(attention.INTERPRETER_BLOCK), so shapes stay tiny but still span several blocks and end
mid-block; on CUDA the same tests add DiT-XL/2-like shapes.
"""
import contextlib
import importlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedit.kernels import reference
from fusedit.kernels.testing import poisoned_allocations as poisoned_buffers
from fusedit.kernels.testing import (
    DTYPES,
    assert_close,
    float64_reference,
    holds_data,
    random_like_nonzero,
    tolerance,
)

# the package re-exports the function under the module's name, so fetch the module itself
attention_module = importlib.import_module("fusedit.kernels.triton.attention")
attention = attention_module.attention

ON_GPU = torch.cuda.is_available()
KERNEL_NAMES = ["_forward_kernel", "_backward_query_kernel", "_backward_key_kernel"]
OWNED_ROWS = {"_forward_kernel": "BLOCK_M", "_backward_query_kernel": "BLOCK_M", "_backward_key_kernel": "BLOCK_N"}
# all of them, read at import: on CUDA tests/conftest.py narrows each kernel to its last config
CUDA_CONFIGS = {name: list(getattr(attention_module, name).configs) for name in KERNEL_NAMES}

# (B, H, Tq, Tk, D): each names what it exercises
SHAPES = {
    "dit-head-72-two-blocks-ragged": (1, 2, 20, 20, 72),
    "head-40": (1, 1, 20, 20, 40),
    "head-64-batch-2": (2, 1, 9, 9, 64),
    "head-80": (1, 1, 18, 18, 80),
    "head-16": (1, 1, 5, 5, 16),
    "head-128": (1, 1, 5, 5, 128),
    "one-query": (1, 1, 1, 7, 72),
    "cross-fewer-queries": (1, 1, 5, 33, 72),
    "cross-fewer-keys": (1, 1, 33, 5, 72),
}
if ON_GPU:
    SHAPES.update({
        "dit-xl-2": (4, 16, 256, 256, 72),
        "gpu-ragged-80": (2, 3, 200, 77, 80),
        "gpu-ragged-40": (1, 4, 300, 129, 40),
        "gpu-head-256": (1, 2, 130, 70, 256),
    })


@contextlib.contextmanager
def poisoned_allocations():
    """fusedit.kernels.testing's poisoned_allocations (every buffer NaN, a guard past its end),
    yielding the list of buffers the op allocated (out, lse; delta, dq, dk, dv)."""
    allocated = []
    allocate = attention_module._allocate

    def allocate_counted(shape, dtype, device):
        allocated.append(allocate(shape, dtype, device))
        if holds_data(allocated[-1]):
            assert allocated[-1].isnan().all(), "the poison did not reach the op's buffers"
        return allocated[-1]

    with poisoned_buffers(), mock.patch.object(attention_module, "_allocate", allocate_counted):
        yield allocated


def make_inputs(shape, dtype, device, seed):
    batch, heads, query_len, key_len, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    q = random_like_nonzero((batch, heads, query_len, head_dim), dtype, device, generator)
    k = random_like_nonzero((batch, heads, key_len, head_dim), dtype, device, generator)
    v = random_like_nonzero((batch, heads, key_len, head_dim), dtype, device, generator)
    grad_out = random_like_nonzero((batch, heads, query_len, head_dim), dtype, device, generator)
    return q, k, v, grad_out


def run_attention(q, k, v, grad_out, key_padding_mask=None):
    """(out, dq, dk, dv) of the triton op on fresh leaves, its buffers poisoned."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_allocations() as allocated:
        out = attention(*leaves, key_padding_mask=key_padding_mask)
        out.backward(grad_out)
    assert len(allocated) == 6, "the op allocated its buffers elsewhere than _allocate"
    return (out.detach(), *(leaf.grad for leaf in leaves))


def run_reference(q, k, v, grad_out, key_padding_mask=None):
    """(out, dq, dk, dv) of reference.attention in float64."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lifted = float64_reference(reference.attention, *leaves, key_padding_mask=key_padding_mask)
    out.backward(grad_out.double())
    return (out.detach(), *(leaf.grad for leaf in lifted))


def assert_matches_reference(got, want, dtype):
    for name, got_tensor, want_tensor in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(got_tensor, want_tensor, dtype, op="attention", what=name)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_float64_reference(shape, dtype, device):
    q, k, v, grad_out = make_inputs(shape, dtype, device, seed=sum(shape))
    got = run_attention(q, k, v, grad_out)
    assert_matches_reference(got, run_reference(q, k, v, grad_out), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_key_padding_mask(dtype, device):
    # batch 0: the first 16 keys padded (a whole key block in the interpreter, so the
    # online softmax starts from rows with nothing attended) plus scattered keys;
    # batch 1: every key padded
    shape = (2, 1, 20, 37, 40)
    q, k, v, grad_out = make_inputs(shape, dtype, device, seed=7)
    key_padding_mask = torch.zeros(2, 37, dtype=torch.bool)
    key_padding_mask[0, :16] = True
    key_padding_mask[0, [20, 21, 33, 36]] = True
    key_padding_mask[1] = True
    key_padding_mask = key_padding_mask.to(device)

    got = run_attention(q, k, v, grad_out, key_padding_mask)
    assert_matches_reference(got, run_reference(q, k, v, grad_out, key_padding_mask), dtype)
    out, grad_q, grad_k, grad_v = got
    # all-padded batch: exactly zero output and gradients (not NaN, not tiny)
    for name, tensor in zip(("out", "dq", "dk", "dv"), got):
        assert torch.equal(tensor[1], torch.zeros_like(tensor[1])), f"{name} of the all-padded batch is not 0"
    padded_keys = key_padding_mask[0]
    assert torch.equal(grad_k[0, :, padded_keys], torch.zeros_like(grad_k[0, :, padded_keys]))
    assert torch.equal(grad_v[0, :, padded_keys], torch.zeros_like(grad_v[0, :, padded_keys]))


def test_a_batch_past_the_grid_limit_runs_in_slices(monkeypatch, device):
    # CUDA caps the grid axis that holds batch * heads at 65535; with the cap at 4 here, 5
    # batch elements of 2 heads run as slices of 2, 2 and 1, each reading its own part of
    # q, k, v and the mask and writing its own part of every output
    monkeypatch.setattr(attention_module, "_MOST_BATCH_HEADS", 4)
    assert attention_module._batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    shape = (5, 2, 9, 20, 40)
    q, k, v, grad_out = make_inputs(shape, torch.float32, device, seed=5)
    key_padding_mask = (torch.arange(20)[None, :] % 5 == torch.arange(5)[:, None]).to(device)
    got = run_attention(q, k, v, grad_out, key_padding_mask)
    assert_matches_reference(got, run_reference(q, k, v, grad_out, key_padding_mask), torch.float32)
    with pytest.raises(ValueError, match="5 heads exceed the 4 that one launch's grid holds"):
        five_heads = torch.randn(1, 5, 3, 16, device=device)
        attention(five_heads, five_heads, five_heads)


def test_padded_key_values_change_nothing(device):
    shape = (1, 1, 9, 20, 16)
    q, k, v, grad_out = make_inputs(shape, torch.float32, device, seed=3)
    key_padding_mask = torch.zeros(1, 20, dtype=torch.bool, device=device)
    key_padding_mask[0, [1, 4, 17, 19]] = True
    before = run_attention(q, k, v, grad_out, key_padding_mask)
    k, v = k.clone(), v.clone()
    k[:, :, key_padding_mask[0]] = 1e4
    v[:, :, key_padding_mask[0]] = -1e4
    after = run_attention(q, k, v, grad_out, key_padding_mask)
    for name, first, second in zip(("out", "dq"), before[:2], after[:2]):
        assert torch.equal(first, second), f"{name} changed with the values of padded keys"


def test_single_key_gives_its_value(device):
    # softmax over one key is 1: out = v and dv = sum of dO over queries, while dq and dk
    # vanish (their float64 reference is 0, so they are bounded instead of compared)
    shape = (2, 1, 18, 1, 72)
    dtype = torch.float32
    q, k, v, grad_out = make_inputs(shape, dtype, device, seed=11)
    got = run_attention(q, k, v, grad_out)
    want = run_reference(q, k, v, grad_out)
    assert_close(got[0], want[0], dtype, op="attention", what="out")
    assert_close(got[3], want[3], dtype, op="attention", what="dv")
    natural_scale = math.sqrt(shape[-1]) * grad_out.abs().max() * v.abs().max() * (q.abs().max() + k.abs().max())
    for name, tensor in (("dq", got[1]), ("dk", got[2])):
        assert torch.isfinite(tensor).all(), f"{name} is not finite"
        assert tensor.abs().max() <= tolerance(dtype, "attention") * natural_scale, f"{name} does not vanish"


def test_broadcast_grad_output(device):
    # out.sum() hands the backward a grad_out whose strides are all 0
    q, k, v, _ = make_inputs((1, 2, 5, 7, 16), torch.float32, device, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poisoned_allocations():
        attention(*leaves).sum().backward()
    want, lifted = float64_reference(reference.attention, *leaves)
    want.sum().backward()
    for name, leaf, want_leaf in zip(("dq", "dk", "dv"), leaves, lifted):
        assert_close(leaf.grad, want_leaf.grad, torch.float32, op="attention", what=name)


@pytest.mark.parametrize("batch, heads, query_len, key_len", [(1, 2, 0, 5), (1, 2, 5, 0), (1, 0, 5, 5), (0, 2, 5, 5)],
                         ids=["no-queries", "no-keys", "no-heads", "no-batch"])
def test_empty_sequences(batch, heads, query_len, key_len, device):
    # like the reference: no queries gives an empty output, no keys gives zeros
    q, k, v, grad_out = make_inputs((batch, heads, query_len, key_len, 16), torch.float32, device, seed=0)
    got = run_attention(q, k, v, grad_out)
    want = run_reference(q, k, v, grad_out)
    for name, got_tensor, want_tensor in zip(("out", "dq", "dk", "dv"), got, want):
        assert got_tensor.shape == want_tensor.shape, name
        assert torch.equal(got_tensor, torch.zeros_like(got_tensor)) and not want_tensor.any(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_qkv_permute_views_are_read_in_place(dtype, device):
    """The DiT's call: q, k, v strided views of one fused qkv projection, and the output
    reshaped back to (B, T, C) without a copy."""
    batch, tokens, heads, head_dim = 1, 18, 2, 40
    generator = torch.Generator().manual_seed(5)
    qkv = random_like_nonzero((batch, tokens, 3 * heads * head_dim), dtype, device, generator).requires_grad_()
    grad_out = random_like_nonzero((batch, tokens, heads * head_dim), dtype, device, generator)

    def attend(op, qkv_tensor):
        q, k, v = qkv_tensor.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        return op(q, k, v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    q_view = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[0]
    assert not q_view.is_contiguous()
    raw_out = attention(*qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4))
    assert raw_out.transpose(1, 2).is_contiguous(), "output should be (B, T, H, D) memory"

    with poisoned_allocations():
        out = attend(attention, qkv)
        out.backward(grad_out)
    want, (qkv64,) = float64_reference(lambda t: attend(reference.attention, t), qkv)
    want.backward(grad_out.double())
    assert_close(out, want, dtype, op="attention", what="out")
    assert_close(qkv.grad, qkv64.grad, dtype, op="attention", what="dqkv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cross_attention_with_a_layout_per_input_and_a_strided_mask(dtype, device):
    """q, k and v each in a layout of its own and the mask a transposed view: q contiguous,
    k a view of a fused kv projection, v with a head-dim stride != 1 (every other test gives
    q, k and v one layout, so a kernel reading one tensor with another's strides passed)."""
    batch, heads, query_len, key_len, head_dim = 3, 2, 19, 23, 40
    generator = torch.Generator().manual_seed(11)
    q = random_like_nonzero((batch, heads, query_len, head_dim), dtype, device, generator).requires_grad_()
    kv = random_like_nonzero((batch, key_len, 2, heads, head_dim), dtype, device, generator).requires_grad_()
    v_stored = random_like_nonzero((batch, heads, head_dim, key_len), dtype, device, generator).requires_grad_()
    grad_out = random_like_nonzero((batch, heads, query_len, head_dim), dtype, device, generator)
    padding = torch.rand(key_len, batch, generator=generator) < 0.4
    padding[:3] = False  # every batch row attends to some keys
    key_padding_mask = padding.to(device).t()

    def attend(op, q, kv, v_stored):
        return op(q, kv.permute(2, 0, 3, 1, 4)[0], v_stored.transpose(-1, -2), key_padding_mask=key_padding_mask)

    k, v = kv.permute(2, 0, 3, 1, 4)[0], v_stored.transpose(-1, -2)
    assert len({q.stride(), k.stride(), v.stride()}) == 3 and v.stride(-1) != 1
    assert not key_padding_mask.is_contiguous()
    with poisoned_allocations():
        out = attend(attention, q, kv, v_stored)
        out.backward(grad_out)
    want, lifted = float64_reference(lambda *tensors: attend(reference.attention, *tensors), q, kv, v_stored)
    want.backward(grad_out.double())
    assert_close(out, want, dtype, op="attention", what="out")
    for name, leaf, leaf64 in zip(("dq", "dkv", "dv"), (q, kv, v_stored), lifted):
        assert_close(leaf.grad, leaf64.grad, dtype, op="attention", what=name)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    query_len=st.integers(1, 24),
    # from 2 keys: with one, dq and dk are exactly 0, which the backward's recomputed scores
    # need not reproduce bit for bit on a GPU (test_single_key_gives_its_value bounds them)
    key_len=st.integers(2, 24),
    head_dim=st.sampled_from([8, 24, 40, 72, 96, 136]),
    dtype=st.sampled_from(DTYPES),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(batch, heads, query_len, key_len, head_dim, dtype, masked, seed):
    shape = (batch, heads, query_len, key_len, head_dim)
    q, k, v, grad_out = make_inputs(shape, dtype, "cuda" if ON_GPU else "cpu", seed)
    key_padding_mask = None
    if masked:
        # random padding, but two keys of each batch element always attended (with one,
        # dq and dk vanish and a relative error means nothing)
        generator = torch.Generator().manual_seed(seed)
        key_padding_mask = torch.rand(batch, key_len, generator=generator) < 0.5
        key_padding_mask[:, :2] = False
        key_padding_mask = key_padding_mask[:, torch.randperm(key_len, generator=generator)].to(q.device)
    got = run_attention(q, k, v, grad_out, key_padding_mask)
    assert_matches_reference(got, run_reference(q, k, v, grad_out, key_padding_mask), dtype)


# Found by random sweeps: with a few keys dS = P (dP - Delta) cancels (two keys: dS_1 = -dS_2),
# so an error in Delta dominates dK. Delta from the output rounded to storage put these at
# 2.5e-3 (fp16) and 1.4e-2, 1.6e-2 (bf16) of max |dK|, over the tolerances.
@pytest.mark.parametrize("dtype, shape, seed", [
    (torch.float16, (1, 1, 3, 2, 72), 13),
    (torch.bfloat16, (1, 1, 6, 2, 8), 32834),
    (torch.bfloat16, (1, 1, 4, 3, 40), 15119),
], ids=["fp16-two-keys", "bf16-two-keys", "bf16-three-keys"])
def test_few_keys_in_low_precision(dtype, shape, seed, device):
    q, k, v, grad_out = make_inputs(shape, dtype, device, seed)
    assert_matches_reference(run_attention(q, k, v, grad_out), run_reference(q, k, v, grad_out), dtype)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has one config; autotuning needs a GPU")
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_every_cuda_config(kernel_name, device):
    shape = (2, 4, 256, 200, 72)
    q, k, v, grad_out = make_inputs(shape, torch.float16, device, seed=9)
    key_padding_mask = torch.zeros(2, 200, dtype=torch.bool, device=device)
    key_padding_mask[1, 150:] = True
    want = run_reference(q, k, v, grad_out, key_padding_mask)
    for config in CUDA_CONFIGS[kernel_name]:
        if not attention_module._compiles_here(config, OWNED_ROWS[kernel_name]):
            continue  # triton 3.0 on Hopper: compiling it would abort the process (see attention.py)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(getattr(attention_module, kernel_name), "configs", [config])
            got = run_attention(q, k, v, grad_out, key_padding_mask)
        try:
            assert_matches_reference(got, want, torch.float16)
        except AssertionError as error:
            raise AssertionError(f"{kernel_name} with {config}: {error}") from error


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one at a time: it cannot show run-to-run races")
def test_backward_is_deterministic(device):
    q, k, v, grad_out = make_inputs((2, 4, 256, 256, 72), torch.bfloat16, device, seed=1)
    first, second = run_attention(q, k, v, grad_out), run_attention(q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_torch_compile_fullgraph(device):
    shape = (1, 1, 5, 7, 16)
    q, k, v, grad_out = make_inputs(shape, torch.float32, device, seed=2)
    key_padding_mask = torch.tensor([[False, True, False, False, True, False, False]], device=device)
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="eager")
    for mask in (None, key_padding_mask):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with poisoned_allocations():
            compiled(*leaves, key_padding_mask=mask).backward(grad_out)
        eager = run_attention(q, k, v, grad_out, mask)
        for name, got, want in zip(("dq", "dk", "dv"), (leaf.grad for leaf in leaves), eager[1:]):
            assert torch.equal(got, want), f"compiled {name} differs from eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # fake outputs keep 16-bit dtypes
def test_opcheck_forward_and_backward_ops(dtype, device):
    q, k, v, grad_out = make_inputs((1, 2, 5, 7, 40), dtype, device, seed=6)
    key_padding_mask = torch.tensor([[False, True, False, False, True, False, False]], device=device)
    for mask in (None, key_padding_mask):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]  # so the autograd registration is checked
        torch.library.opcheck(attention_module._attention_op, (*leaves, mask))
        out, lse = attention_module._attention_op(q, k, v, mask)
        torch.library.opcheck(attention_module._attention_backward_op, (grad_out, q, k, v, mask, out, lse))


def _bad_inputs(device):
    def tensor(*shape, dtype=torch.float32):
        return torch.ones(shape, dtype=dtype, device=device)

    good = dict(q=tensor(1, 2, 5, 16), k=tensor(1, 2, 7, 16), v=tensor(1, 2, 7, 16))
    return {
        "q-3d": (dict(good, q=tensor(2, 5, 16)), r"q must have shape \(\*, \*, \*, \*\), got \(2, 5, 16\)"),
        "k-other-heads": (dict(good, k=tensor(1, 3, 7, 16)), r"k must have shape \(1, 2, \*, 16\)"),
        "k-other-head-dim": (dict(good, k=tensor(1, 2, 7, 8)), r"k must have shape \(1, 2, \*, 16\)"),
        "v-other-length": (dict(good, v=tensor(1, 2, 6, 16)), r"v must have shape \(1, 2, 7, 16\)"),
        "head-dim-over-256": (
            dict(q=tensor(1, 1, 2, 264), k=tensor(1, 1, 2, 264), v=tensor(1, 1, 2, 264)),
            r"head dim 264 is outside the supported 1..256",
        ),
        "head-dim-257": (
            dict(q=tensor(1, 1, 2, 257), k=tensor(1, 1, 2, 257), v=tensor(1, 1, 2, 257)),
            r"head dim 257 is outside the supported 1..256",
        ),
        "mask-on-meta": (
            dict(good, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool, device="meta")),
            r"key_padding_mask is on meta but q is on",
        ),
        "head-dim-0": (
            dict(q=tensor(1, 1, 2, 0), k=tensor(1, 1, 2, 0), v=tensor(1, 1, 2, 0)),
            r"head dim 0 is outside the supported 1..256",
        ),
        "int-dtype": (dict(good, v=tensor(1, 2, 7, 16, dtype=torch.int32)), r"v has dtype torch.int32"),
        "mixed-dtypes": (dict(good, k=tensor(1, 2, 7, 16, dtype=torch.float16)), r"k is torch.float16 but q is"),
        "float-mask": (dict(good, key_padding_mask=tensor(1, 7)), r"key_padding_mask must be a bool tensor"),
        "mask-wrong-length": (
            dict(good, key_padding_mask=tensor(1, 5, dtype=torch.bool)),
            r"key_padding_mask must have shape \(1, 7\), got \(1, 5\)",
        ),
        "mask-per-head": (
            dict(good, key_padding_mask=tensor(1, 2, 7, dtype=torch.bool)),
            r"key_padding_mask must have shape \(1, 7\)",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
def test_bad_inputs_raise_clear_errors(case, device):
    arguments, message = _bad_inputs(device)[case]
    with pytest.raises((ValueError, TypeError), match=message):
        attention(**arguments)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device to put one input elsewhere")
def test_inputs_on_two_devices_raise(device):
    q = torch.ones(1, 1, 4, 16, device=device)
    with pytest.raises(ValueError, match="k is on cpu but q is on cuda"):
        attention(q, q.cpu(), q)
    with pytest.raises(ValueError, match="key_padding_mask is on cpu but q is on cuda"):
        attention(q, q, q, torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "head_dim, tiles",
    [(8, (16, 0)), (16, (16, 0)), (40, (32, 16)), (64, (64, 0)), (72, (64, 16)), (80, (64, 16)),
     (96, (64, 32)), (136, (128, 16)), (200, (128, 128)), (256, (256, 0))],
)
def test_head_dim_tiles_cover_without_128_wide_padding(head_dim, tiles):
    main, rest = attention_module.head_dim_tiles(head_dim)
    assert (main, rest) == tiles
    assert main + rest >= head_dim


@pytest.mark.parametrize("old_triton, arch, dropped", [(True, 90, True), (True, 80, False), (False, 90, False)],
                         ids=["triton-3.0-hopper", "triton-3.0-ampere", "newer-triton-hopper"])
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_configs_triton_3_0_cannot_compile_for_hopper_are_pruned(monkeypatch, kernel_name, old_triton, arch, dropped):
    import triton

    monkeypatch.setattr(attention_module, "_HOPPER_NEEDS_128_ROWS_FOR_8_WARPS", old_triton)
    monkeypatch.setattr(attention_module, "_target_arch", lambda: arch)
    configs = {"_forward_kernel": attention_module._FORWARD_CONFIGS}.get(kernel_name, attention_module._BACKWARD_CONFIGS)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs]
    owned = OWNED_ROWS[kernel_name]
    # D = 64: every config's accumulators fit, so only the compiler's limits prune
    kept = attention_module._prune_for_head_dim(configs, {}, owned, 1, MAIN_WIDTH=64, REST_WIDTH=0)
    aborting = [c for c in configs[:-1] if c.num_warps == 8 and c.kwargs[owned] < 128]
    assert aborting, "the configs no longer hold one triton 3.0 aborts on: this test checks nothing"
    assert (kept == [c for c in configs if c not in aborting]) if dropped else (kept == configs)


def test_autocast_computes_in_the_autocast_dtype(device):
    # like F.scaled_dot_product_attention: fp32 inputs under bf16 autocast give a bf16 output
    generator = torch.Generator(device=device).manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=generator, device=device) for _ in range(3))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = attention(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert got.dtype == want.dtype == torch.bfloat16


def test_alignment_is_the_vector_width_every_row_stride_allows():
    """ALIGN, which the kernels hand the compiler as a fact about the strides, must be one."""
    qkv = torch.empty(2, 5, 3, 4, 72, dtype=torch.bfloat16)  # the DiT's (B, T, 3, H, D) projection
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert attention_module._alignment(q, k, v) == 8  # 16 bytes of bf16: D = 72 is 8 x 9
    assert attention_module._alignment(q.float().contiguous()) == 4  # 16 bytes of fp32
    assert attention_module._alignment(torch.empty(1, 2, 3, 36, dtype=torch.bfloat16)) == 4
    assert attention_module._alignment(torch.empty(1, 1, 3, 73, dtype=torch.bfloat16)[..., :72]) == 1
    assert attention_module._alignment(torch.ones(1, dtype=torch.float16).expand(2, 3, 4, 72)) == 8  # all strides 0
