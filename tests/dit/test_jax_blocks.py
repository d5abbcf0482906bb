"""The paper's four block designs in the JAX DiT against the PyTorch DiT on the same random,
non-zero weights: forward per design, cross-attention with an external context and a padding
mask (and without labels), guidance with the learned null context, the Pallas kernels on the
masked cross-attention path, and the state-dict conversion both ways for every design."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from fusedit.dit.jax import DiT as JaxDiT  # noqa: E402
from fusedit.dit.jax import from_torch_state_dict, to_torch_state_dict  # noqa: E402
from fusedit.dit.models import BLOCKS, DiT  # noqa: E402
from fusedit.kernels.pallas import get_jax_ops  # noqa: E402
from fusedit.kernels.pallas.testing import FAST_COMPILE  # noqa: E402
from fusedit.kernels.testing import randomize_parameters_, relative_error  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
TINY_JAX = {key: TINY[key] for key in ("depth", "hidden_size", "num_heads")}
CONTEXT_DIM, CONTEXT_LENGTH = 6, 5
# per row: some padding, none, all of it (only the [t, y] tokens stay valid), scattered
CONTEXT_MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)


def extra_arguments(block):
    return dict(context_dim=CONTEXT_DIM) if block == "cross_attn" else {}




def run_compiled(model, method="__call__", **arguments):
    """model.method(**arguments) jit-compiled: tensors and arrays are traced, the rest is static."""
    graph, state = nnx.split(model)
    arrays = {name: jnp.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
              for name, value in arguments.items() if isinstance(value, (torch.Tensor, np.ndarray, jax.Array))}
    static = {name: value for name, value in arguments.items() if name not in arrays}

    def run(state, arrays):
        return getattr(nnx.merge(graph, state), method)(**arrays, **static)

    return np.array(jax.jit(run).lower(state, arrays).compile(FAST_COMPILE)(state, arrays))


@pytest.fixture(scope="module")
def torch_models():
    return {block: randomize_parameters_(DiT(**TINY, block=block, **extra_arguments(block)), seed=index).eval()
            for index, block in enumerate(BLOCKS)}


@pytest.fixture(scope="module")
def jax_models(torch_models):
    """Converted with block and context_dim inferred from the state dicts."""
    return {block: from_torch_state_dict("DiT-S/2", model.state_dict(), input_size=8, **TINY_JAX)
            for block, model in torch_models.items()}


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    context = torch.randn(4, CONTEXT_LENGTH, CONTEXT_DIM, generator=generator)
    return x, torch.tensor([0, 17, 500, 999]), torch.tensor([3, 10, 0, 9]), context  # label 10: the null class


@pytest.mark.parametrize("block", BLOCKS)
def test_forward_matches_torch(torch_models, jax_models, batch, block):
    x, t, y, _ = batch
    model = jax_models[block]
    assert (model.block, model.context_dim) == (block, extra_arguments(block).get("context_dim"))
    with torch.no_grad():
        want = torch_models[block](x, t, y)
    got = run_compiled(model, x=x, t=t, y=y)
    assert got.shape == (4, 8, 8, 8)
    assert relative_error(torch.from_numpy(got), want) < 1e-5


@pytest.mark.parametrize("labels, masked", [(True, True), (False, False)], ids=["labels-masked", "context-only"])
def test_cross_attention_with_context_matches_torch(torch_models, jax_models, batch, labels, masked):
    x, t, y, context = batch
    arguments = dict(x=x, t=t, y=y if labels else None, context=context, context_mask=CONTEXT_MASK if masked else None)
    with torch.no_grad():
        want = torch_models["cross_attn"](**arguments)
        # the test can fail: the context (and its mask) changes the output
        assert relative_error(torch_models["cross_attn"](**{**arguments, "context": context.flip(0)}), want) > 1e-2
    got = run_compiled(jax_models["cross_attn"], **arguments)
    assert relative_error(torch.from_numpy(got), want) < 1e-5


def test_forward_with_cfg_uses_the_null_context(torch_models, jax_models, batch):
    x, t, _, context = batch
    y = torch.tensor([3, 7, 3, 7])  # the unconditional half's labels are forced to the null class
    arguments = dict(x=x, t=t, y=y, cfg_scale=4.0, context=context, context_mask=CONTEXT_MASK)
    with torch.no_grad():
        want = torch_models["cross_attn"].forward_with_cfg(**arguments)
    got = run_compiled(jax_models["cross_attn"], "forward_with_cfg", **arguments)
    assert relative_error(torch.from_numpy(got), want) < 1e-5
    np.testing.assert_array_equal(got[:2, :3], got[2:, :3])  # guided channels: both halves hold the guided eps


def test_pallas_kernels_on_masked_cross_attention(torch_models, batch):
    x, t, y, context = batch
    model = from_torch_state_dict("DiT-S/2", torch_models["cross_attn"].state_dict(), input_size=8, kernels="pallas",
                                  **TINY_JAX)
    with torch.no_grad():
        want = torch_models["cross_attn"](x, t, y, context, CONTEXT_MASK)
    got = run_compiled(model, x=x, t=t, y=y, context=context, context_mask=CONTEXT_MASK)
    assert relative_error(torch.from_numpy(got), want) < 1e-4  # the kernels' online softmax: attention's tolerance


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_fully_padded_context_rows_give_the_projection_bias(torch_models, jax_models, kernels):
    """A query whose every key is padding attends to nothing: the attention gives 0, so the
    layer gives proj(0) = its bias (the model itself always keeps the [t, y] tokens valid)."""
    torch_layer = torch_models["cross_attn"].blocks[1].cross_attn
    jax_layer = jax_models["cross_attn"].blocks[1].cross_attn
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn(4, 16, 32, generator=generator), torch.randn(4, CONTEXT_LENGTH, 32, generator=generator)
    with torch.no_grad():
        want = torch_layer(x, context, CONTEXT_MASK, torch_models["cross_attn"].ops)
    graph, state = nnx.split(jax_layer)
    ops = get_jax_ops(kernels)

    def run(state, x, context, mask):
        return nnx.merge(graph, state)(x, context, mask, ops)

    arguments = (state, *(jnp.asarray(array.numpy()) for array in (x, context, CONTEXT_MASK)))
    got = np.array(jax.jit(run).lower(*arguments).compile(FAST_COMPILE)(*arguments))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[2], np.broadcast_to(jax_layer.proj.bias[...], (16, 32)), rtol=1e-6)
    assert relative_error(torch.from_numpy(got), want) < (1e-5 if kernels == "xla" else 1e-4)


@pytest.mark.parametrize("block", BLOCKS)
def test_state_dict_round_trip_is_exact_and_strict(torch_models, jax_models, block):
    back = to_torch_state_dict(jax_models[block])
    DiT(**TINY, block=block, **extra_arguments(block)).load_state_dict(back, strict=True)
    for key, value in torch_models[block].state_dict().items():
        assert torch.equal(back[key], value), key


def test_conversion_names_a_design_mismatch(torch_models):
    adaln_zero, cross = torch_models["adaln_zero"].state_dict(), torch_models["cross_attn"].state_dict()
    with pytest.raises(ValueError, match="block='adaln' was asked, but the state dict holds a DiT with "
                                         "block='adaln_zero'"):
        from_torch_state_dict("DiT-S/2", adaln_zero, input_size=8, block="adaln", **TINY_JAX)
    with pytest.raises(ValueError, match="context_dim=7 was asked, but .* context_dim=6"):
        from_torch_state_dict("DiT-S/2", cross, input_size=8, context_dim=7, **TINY_JAX)
    with pytest.raises(ValueError, match="context_dim=None was asked"):
        from_torch_state_dict("DiT-S/2", cross, input_size=8, context_dim=None, **TINY_JAX)
    # agreeing keywords are accepted
    model = from_torch_state_dict("DiT-S/2", cross, input_size=8, block="cross_attn", context_dim=6, **TINY_JAX)
    assert (model.block, model.context_dim) == ("cross_attn", 6)
    without_null = {key: value for key, value in cross.items() if key != "null_context"}
    with pytest.raises(ValueError, match="missing keys \\['null_context'\\]"):
        from_torch_state_dict("DiT-S/2", without_null, input_size=8, **TINY_JAX)


@pytest.fixture(scope="module")
def initialized_models():
    """Each design as the JAX DiT initializes itself, all built by one compiled program (eager
    initialization compiles every initializer op of every shape on its own: 3x slower)."""
    def build(block):
        return JaxDiT(**TINY, block=block, **extra_arguments(block), rngs=nnx.Rngs(0))

    graphs = {block: nnx.split(nnx.eval_shape(lambda: build(block)))[0] for block in BLOCKS}
    states = jax.jit(lambda: {block: nnx.state(build(block)) for block in BLOCKS}).lower().compile(FAST_COMPILE)()
    return {block: nnx.merge(graphs[block], states[block]) for block in BLOCKS}


@pytest.mark.parametrize("block", BLOCKS)
def test_initialization_follows_torch(initialized_models, block):
    """Only adaLN-Zero zeroes its blocks' modulation; LayerNorms start as the identity; the null
    context starts small and non-zero; the parameter names and shapes are torch's."""
    model = initialized_models[block]
    first = model.blocks[0]
    if block in ("adaln_zero", "adaln"):
        kernel = np.asarray(first.adaLN_modulation_1.kernel[...])
        assert kernel.shape == (32, (6 if block == "adaln_zero" else 4) * 32)
        assert (kernel == 0).all() == (block == "adaln_zero")
    else:
        np.testing.assert_array_equal(np.asarray(first.norm1.scale[...]), np.ones(32))
        np.testing.assert_array_equal(np.asarray(first.norm2.bias[...]), np.zeros(32))
        # as torch's (1e-6): unit-variance inputs would hide an eps of 1e-5 under the 1e-5 tolerance
        norms = [first.norm1, first.norm2] + ([first.norm_cross] if block == "cross_attn" else [])
        assert [norm.epsilon for norm in norms] == [1e-6] * len(norms)
    if block == "cross_attn":
        null = np.asarray(model.null_context[...])
        assert null.shape == (1, CONTEXT_DIM) and (null != 0).all() and np.abs(null).max() < 0.2
    # the final layer starts at zero (adaLN-Zero's output), as in torch
    for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation_1):
        assert not np.asarray(layer.kernel[...]).any() and not np.asarray(layer.bias[...]).any()
    # the patch conv is xavier on torch's (out, in*p*p) view: fans 4*2*2 and 32
    patch = np.abs(np.asarray(model.x_embedder.proj.kernel[...]))
    bound = np.sqrt(6 / (4 * 2 * 2 + 32))
    assert bound * 0.9 < patch.max() <= bound
    for weight in (model.t_embedder.mlp_0.kernel, model.t_embedder.mlp_2.kernel, model.y_embedder.embedding_table.embedding):
        assert abs(np.asarray(weight[...]).std() - 0.02) < 0.005  # N(0, 0.02), as torch's
    reference = DiT(**TINY, block=block, **extra_arguments(block)).state_dict()
    shapes = {key: tuple(value.shape) for key, value in to_torch_state_dict(model).items()}
    assert shapes == {key: tuple(value.shape) for key, value in reference.items()}


def test_bad_designs_and_inputs_name_the_problem(jax_models):
    with pytest.raises(ValueError, match="unknown block 'film'"):
        JaxDiT(**TINY, block="film")
    with pytest.raises(ValueError, match="context_dim needs block='cross_attn'"):
        JaxDiT(**TINY, block="in_context", context_dim=6)
    x, t, y = jnp.zeros((4, 4, 8, 8)), jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32)
    context = jnp.zeros((4, CONTEXT_LENGTH, CONTEXT_DIM))
    cross = jax_models["cross_attn"]
    with pytest.raises(ValueError, match="this model takes no context"):
        jax_models["in_context"](x, t, y, context=context)
    with pytest.raises(ValueError, match="context_mask marks padding in a context, and no context was given"):
        jax_models["in_context"](x, t, y, context_mask=jnp.zeros((4, CONTEXT_LENGTH), jnp.bool_))
    with pytest.raises(ValueError, match="forward_with_cfg takes a batch of 2N: .*, got 3"):
        jax_models["in_context"].forward_with_cfg(x[:3], t[:3], y[:3], 4.0)
    with pytest.raises(ValueError, match="y \\(class labels\\) is required unless a context is given"):
        cross(x, t)
    with pytest.raises(ValueError, match="context must be \\(N=4, L, context_dim=6\\)"):
        cross(x, t, y, context=context[..., :5])
    with pytest.raises(ValueError, match="context_mask must be bool"):
        cross(x, t, y, context=context, context_mask=jnp.zeros((4, CONTEXT_LENGTH), jnp.int32))
    with pytest.raises(ValueError, match="context_mask must have shape \\(4, None\\)"):
        cross(x, t, y, context=context, context_mask=jnp.zeros((2, CONTEXT_LENGTH), jnp.bool_))


@pytest.mark.parametrize("block", BLOCKS)
def test_an_empty_batch_gives_an_empty_output(jax_models, block):
    # as the PyTorch DiT: reshapes with -1 cannot infer a size from no elements
    x, t = jnp.zeros((0, 4, 8, 8)), jnp.zeros((0,), jnp.int32)
    context = dict(context=jnp.zeros((0, CONTEXT_LENGTH, CONTEXT_DIM)),
                   context_mask=jnp.zeros((0, CONTEXT_LENGTH), bool)) if block == "cross_attn" else {}
    model = jax_models[block]
    assert model(x, t, t, **context).shape == (0, 8, 8, 8)
    assert model.forward_with_cfg(x, t, t, 4.0, **context).shape == (0, 8, 8, 8)
