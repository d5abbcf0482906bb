"""The JAX DiT against the PyTorch DiT on the same (random, non-zero) weights: forward,
forward_with_cfg, the Pallas switch, the state-dict conversion both ways, and every config."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from fusedit.dit.jax import DiT_models, create_model, from_torch_state_dict, to_torch_state_dict  # noqa: E402
from fusedit.dit.jax.convert import to_jax_layout, torch_key  # noqa: E402
from fusedit.dit.models import DiT, MODEL_SIZES  # noqa: E402
from fusedit.kernels.pallas.testing import FAST_COMPILE  # noqa: E402
from fusedit.kernels.testing import randomize_parameters_, relative_error  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
TINY_JAX = {key: TINY[key] for key in ("depth", "hidden_size", "num_heads")}




def compiled_forward(model, method="__call__", **kwargs):
    graph, state = nnx.split(model)

    def run(state, *arrays):
        return getattr(nnx.merge(graph, state), method)(*arrays, **kwargs)

    def call(*arrays):
        arrays = [jnp.asarray(array) for array in arrays]
        return np.array(jax.jit(run).lower(state, *arrays).compile(FAST_COMPILE)(state, *arrays))

    return call


@pytest.fixture(scope="module")
def torch_model():
    return randomize_parameters_(DiT(**TINY)).eval()


@pytest.fixture(scope="module")
def jax_model(torch_model):
    return from_torch_state_dict("DiT-S/2", torch_model.state_dict(), input_size=8, **TINY_JAX)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    return x, torch.tensor([0, 17, 500, 999]), torch.tensor([3, 10, 0, 9])  # label 10: the null class


def test_forward_matches_torch(torch_model, jax_model, batch):
    x, t, y = batch
    with torch.no_grad():
        want = torch_model(x, t, y)
    got = compiled_forward(jax_model)(x.numpy(), t.numpy(), y.numpy())
    assert got.shape == (4, 8, 8, 8)
    assert relative_error(torch.from_numpy(got), want) < 1e-5


@pytest.mark.parametrize("guide_all_channels", [False, True])
def test_forward_with_cfg_matches_torch(torch_model, jax_model, batch, guide_all_channels):
    x, t, _ = batch
    y = torch.tensor([3, 7, 10, 10])
    with torch.no_grad():
        want = torch_model.forward_with_cfg(x, t, y, 4.0, guide_all_channels=guide_all_channels)
    got = compiled_forward(jax_model, "forward_with_cfg", guide_all_channels=guide_all_channels)(
        x.numpy(), t.numpy(), y.numpy(), np.float32(4.0))
    assert relative_error(torch.from_numpy(got), want) < 1e-5
    # guidance must have changed the guided channels only: the halves agree there
    guided = 4 if guide_all_channels else 3
    np.testing.assert_array_equal(got[:2, :guided], got[2:, :guided])


def test_forward_with_cfg_of_a_one_channel_model_matches_torch(batch):
    """Digits models have 1 channel: guidance covers it, never the learned variance after it."""
    pixels = randomize_parameters_(DiT(**{**TINY, "in_channels": 1})).eval()
    model = from_torch_state_dict("DiT-S/2", pixels.state_dict(), input_size=8, **TINY_JAX)
    x, t, _ = batch
    x, y = x[:, :1], torch.tensor([3, 7, 10, 10])
    with torch.no_grad():
        want = pixels.forward_with_cfg(x, t, y, 4.0)
    got = compiled_forward(model, "forward_with_cfg")(x.numpy(), t.numpy(), y.numpy(), np.float32(4.0))
    assert got.shape == (4, 2, 8, 8) and relative_error(torch.from_numpy(got), want) < 1e-5


def test_pallas_kernels_match_torch(torch_model, batch):
    model = from_torch_state_dict("DiT-S/2", torch_model.state_dict(), input_size=8, kernels="pallas", **TINY_JAX)
    assert model.kernels == "pallas"
    x, t, y = batch
    with torch.no_grad():
        want = torch_model(x, t, y)
    got = compiled_forward(model)(x.numpy(), t.numpy(), y.numpy())
    assert relative_error(torch.from_numpy(got), want) < 1e-4  # the kernels' online softmax: attention's tolerance


def test_state_dict_round_trip_is_exact_and_strict(torch_model, jax_model):
    back = to_torch_state_dict(jax_model)
    fresh = DiT(**TINY)
    fresh.load_state_dict(back, strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(back[key], value), key
    # a DDP / torch.compile prefix is tolerated
    prefixed = {f"module.{key}": value for key, value in torch_model.state_dict().items()}
    again = from_torch_state_dict("DiT-S/2", prefixed, input_size=8, **TINY_JAX)
    assert torch.equal(to_torch_state_dict(again)["blocks.1.attn.qkv.weight"], back["blocks.1.attn.qkv.weight"])


def test_layouts():
    torch_weight = np.arange(6.0).reshape(3, 2)  # Linear (out=3, in=2)
    np.testing.assert_array_equal(to_jax_layout("blocks.0.mlp.fc1.weight", torch_weight), torch_weight.T)
    conv = np.arange(2 * 3 * 4 * 4.0).reshape(2, 3, 4, 4)  # OIHW
    np.testing.assert_array_equal(to_jax_layout("x_embedder.proj.weight", conv)[1, 2, 0, 1], conv[1, 0, 1, 2])


@pytest.mark.parametrize("name", list(DiT_models))
def test_every_config_has_the_torch_parameters(name):
    """Each of the 12 configs (one block here: the blocks are identical; the depths come from
    the MODEL_SIZES table torch uses too) has exactly the torch DiT's parameters, JAX layout."""
    size, patch = name[4:].split("/")
    _, width, heads = MODEL_SIZES[size]
    with torch.device("meta"):
        reference = DiT(input_size=32, patch_size=int(patch), hidden_size=width, depth=1, num_heads=heads)
    abstract = nnx.eval_shape(lambda: create_model(name, input_size=32, depth=1, rngs=nnx.Rngs(0)))
    assert (abstract.hidden_size, abstract.num_heads, abstract.patch_size) == (width, heads, int(patch))
    shapes = {torch_key(path): value.shape for path, value in nnx.to_flat_state(nnx.state(abstract))}
    wanted = {key: to_jax_layout(key, np.empty(value.shape, np.uint8)).shape
              for key, value in reference.state_dict().items()}
    assert shapes == wanted


def test_conversion_errors_name_the_problem(torch_model):
    state = torch_model.state_dict()
    with pytest.raises(ValueError, match="unknown model config"):
        from_torch_state_dict("DiT-M/2", state)
    with pytest.raises(ValueError, match="missing keys \\['blocks.1.attn.proj.bias'\\]"):
        from_torch_state_dict("DiT-S/2", {k: v for k, v in state.items() if k != "blocks.1.attn.proj.bias"},
                              input_size=8, **TINY_JAX)
    with pytest.raises(ValueError, match="unexpected keys \\['blocks.0.cross_attn.q.weight'\\]"):
        from_torch_state_dict("DiT-S/2", {**state, "blocks.0.cross_attn.q.weight": torch.zeros(64, 64)},
                              input_size=8, **TINY_JAX)
    with pytest.raises(ValueError, match="pos_embed: shape \\(1, 16, 64\\) does not fit"):
        from_torch_state_dict("DiT-S/2", state, input_size=16, **TINY_JAX)
    with pytest.raises(ValueError, match="no 'x_embedder.proj.weight'"):
        from_torch_state_dict("DiT-S/2", {"weight": torch.zeros(1)})


def test_input_errors_name_the_problem(jax_model):
    x, t, y = jnp.zeros((2, 4, 8, 8)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="3 channels"):
        jax_model(x[:, :3], t, y)
    with pytest.raises(ValueError, match="does not match the model's input_size=8"):
        jax_model(jnp.zeros((2, 4, 16, 16)), t, y)
    with pytest.raises(ValueError, match="t must have shape \\(2,\\)"):
        jax_model(x, t[:1], y)
    with pytest.raises(ValueError, match="labels must lie in 0..10"):
        jax_model(x, t, jnp.asarray([0, 11]))
    with pytest.raises(ValueError, match="integer class labels"):
        jax_model(x, t, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="unknown JAX kernels"):
        jax_model.set_kernels("triton")
