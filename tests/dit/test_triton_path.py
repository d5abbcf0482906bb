"""The DiT on kernels="triton" against kernels="reference": outputs, parameter gradients,
a few optimizer steps, and every block design (on CPU through Triton's interpreter)."""
import pytest
import torch

from fusedit.dit.models import BLOCKS, DiT
from fusedit.kernels import tf32_matmuls
from fusedit.kernels.testing import randomize_parameters_, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # tests/conftest.py sets TRITON_INTERPRET without CUDA

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3, num_classes=10)
# Whole-model tolerance in fp32: the per-op bounds (1e-5, attention 1e-4) compound over layers.
MODEL_TOLERANCE = 2e-4


@pytest.fixture(autouse=True)
def fp32_convolutions():
    """On a GPU cuDNN runs fp32 convolutions in TF32 by default: the patch embedding's weight
    gradient, from upstream gradients that differ by rounding between the two op sets, would
    then differ by up to ~1e-3 of an element's product, past MODEL_TOLERANCE."""
    with tf32_matmuls(False):
        yield


def randomized(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_parameters_(DiT(**{**TINY, **kwargs}), seed).to(DEVICE)


def batch(size=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (size,), generator=generator)
    y = torch.randint(0, 11, (size,), generator=generator)
    target = torch.randn(size, 8, 8, 8, generator=generator)
    return [v.to(DEVICE) for v in (x, t, y, target)]


def loss_and_grads(model, x, t, y, target, **kwargs):
    model.zero_grad()
    out = model(x, t, y, **kwargs)
    loss = ((out - target) ** 2).mean()
    loss.backward()
    # parameters the call does not use (e.g. the null context when nothing is dropped) have no grad
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_forward_and_parameter_gradients_match_reference():
    model = randomized().eval()
    x, t, y, target = batch()
    want_out, want_grads = loss_and_grads(model, x, t, y, target)
    got_out, got_grads = loss_and_grads(model.set_kernels("triton"), x, t, y, target)
    assert model.kernels == "triton"
    assert relative_error(got_out, want_out) < MODEL_TOLERANCE
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert relative_error(got_grads[name], grad) < MODEL_TOLERANCE, name


def test_optimizer_steps_give_the_same_losses():
    losses = {}
    for kernels in ("reference", "triton"):
        model = randomized(seed=3, kernels=kernels).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
        x, t, y, target = batch(seed=4)
        losses[kernels] = []
        for _ in range(3):
            optimizer.zero_grad()
            out = model(x, t, y, force_drop_ids=torch.zeros_like(y))  # no random label dropout
            loss = ((out - target) ** 2).mean()
            loss.backward()
            optimizer.step()
            losses[kernels].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-4)
    assert losses["reference"][-1] < losses["reference"][0]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b != "adaln_zero"])
def test_every_block_design_matches_reference(block):
    kwargs = {"context_dim": 5} if block == "cross_attn" else {}
    model = randomized(seed=5, block=block, depth=1, **kwargs).eval()
    x, t, y, target = batch(seed=6)
    extra = {}
    if block == "cross_attn":
        extra = dict(context=torch.randn(2, 4, 5, device=DEVICE),
                     context_mask=torch.tensor([[False, False, True, True], [False, True, True, True]], device=DEVICE))
    want_out, want_grads = loss_and_grads(model, x, t, y, target, **extra)
    got_out, got_grads = loss_and_grads(model.set_kernels("triton"), x, t, y, target, **extra)
    assert relative_error(got_out, want_out) < MODEL_TOLERANCE
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert relative_error(got_grads[name], grad) < MODEL_TOLERANCE, name


def test_compiles_with_fullgraph_on_triton_kernels():
    # fullgraph=True raises on any graph break, so this passing means torch.compile traced
    # the whole model with our custom ops in it (forward and the autograd graph).
    model = randomized(seed=7, depth=1, kernels="triton").eval()
    x, t, y, target = batch(seed=8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got_out, got_grads = loss_and_grads(compiled, x, t, y, target)
    want_out, want_grads = loss_and_grads(model.set_kernels("reference"), x, t, y, target)
    assert relative_error(got_out, want_out) < MODEL_TOLERANCE
    assert relative_error(got_grads["blocks.0.attn.qkv.weight"], want_grads["blocks.0.attn.qkv.weight"]) < MODEL_TOLERANCE


def test_autocast_bf16_matches_reference():
    # Under autocast the residual stream is fp32 while shift/scale/gate come out of Linears in
    # bf16; the triton ops promote (norm, residual) or cast to bf16 (matmuls) as eager does.
    model = randomized(seed=9, depth=1).eval()
    x, t, y, target = batch(seed=10)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want_out, want_grads = loss_and_grads(model, x, t, y, target)
        got_out, got_grads = loss_and_grads(model.set_kernels("triton"), x, t, y, target)
    assert got_out.dtype == want_out.dtype
    assert relative_error(got_out, want_out) < 3e-2
    assert relative_error(got_grads["blocks.0.mlp.fc1.weight"], want_grads["blocks.0.mlp.fc1.weight"]) < 3e-2
