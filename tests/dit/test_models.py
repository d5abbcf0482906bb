"""The DiT against an independent eager implementation, the published state-dict layout,
parameter counts, initialisation, CFG, label dropout, dtypes and bad inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusedit.dit import DiT, DiT_models, create_model
from fusedit.dit.models import LabelEmbedder, config_patch_size, sincos_pos_embed
from fusedit.kernels.testing import randomize_parameters_, relative_error

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3, num_classes=10)

PARAMS = {  # published parameter counts at 256px (32x32 latents), pos_embed included
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
}




def independent_dit_forward(sd, x, t, y, patch, heads, eps=1e-6):
    """The DiT forward written from the paper's description over a bare state dict."""
    n, _, side, _ = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    # float32, as published: at t ~ 1000 the angle's rounding is part of the numerics
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t.float()[:, None] * freqs[None]
    temb = torch.cat([angles.cos(), angles.sin()], dim=1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    cond = temb + sd["y_embedder.embedding_table.weight"][y]
    width = h.shape[-1]

    def norm_mod(z, shift, scale):
        mean = z.mean(-1, keepdim=True)
        var = ((z - mean) ** 2).mean(-1, keepdim=True)
        return (z - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]

    index = 0
    while f"blocks.{index}.attn.qkv.weight" in sd:
        p = f"blocks.{index}."
        mods = F.linear(F.silu(cond), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        s1, c1, g1, s2, c2, g2 = [mods[:, i * width:(i + 1) * width] for i in range(6)]
        a = norm_mod(h, s1, c1)
        qkv = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = (qkv[..., i * width:(i + 1) * width].reshape(n, -1, heads, width // heads).transpose(1, 2) for i in range(3))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1) @ v
        attn = F.linear(attn.transpose(1, 2).reshape(n, -1, width), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = h + g1[:, None] * attn
        m = norm_mod(h, s2, c2)
        hidden = F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        hidden = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
        h = h + g2[:, None] * F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        index += 1
    mods = F.linear(F.silu(cond), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    out = F.linear(norm_mod(h, mods[:, :width], mods[:, width:]), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    grid = side // patch
    channels = out.shape[-1] // (patch * patch)
    image = torch.zeros(n, channels, side, side)
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        patch_values = out[:, token].reshape(n, patch, patch, channels)  # (p_row, p_col, channel)
        image[:, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = patch_values.permute(0, 3, 1, 2)
    return image


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_independent_implementation(learn_sigma, batch):
    torch.manual_seed(1)
    model = randomize_parameters_(DiT(**TINY, learn_sigma=learn_sigma)).eval()
    x = torch.randn(batch, 4, 8, 8)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 11, (batch,))  # 10 is the null class
    want = independent_dit_forward(model.state_dict(), x, t, y, patch=2, heads=3)
    got = model(x, t, y)
    assert got.shape == (batch, 8 if learn_sigma else 4, 8, 8)
    assert relative_error(got, want) < 1e-5


def test_pos_embed_layout():
    embed = sincos_pos_embed(16, 3)  # 9 tokens, row-major
    assert embed.dtype == np.float64 and embed.shape == (9, 16)
    token = 1 * 3 + 2  # row 1, column 2
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    np.testing.assert_allclose(embed[token, :8], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))
    np.testing.assert_allclose(embed[token, 8:], np.concatenate([np.sin(1 * omega), np.cos(1 * omega)]))


@pytest.mark.parametrize("name", list(PARAMS))
def test_published_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def expected_shapes(depth, width, patch, channels=4, num_classes=1000, tokens=256):
    shapes = {
        "pos_embed": (1, tokens, width),
        "x_embedder.proj.weight": (width, channels, patch, patch), "x_embedder.proj.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (num_classes + 1, width),
        "final_layer.linear.weight": (patch * patch * channels * 2, width),
        "final_layer.linear.bias": (patch * patch * channels * 2,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width), "final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    for i in range(depth):
        for layer, (out_dim, in_dim) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                         "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width),
                                         "adaLN_modulation.1": (6 * width, width)}.items():
            shapes[f"blocks.{i}.{layer}.weight"] = (out_dim, in_dim)
            shapes[f"blocks.{i}.{layer}.bias"] = (out_dim,)
    return shapes


def test_state_dict_matches_published_layout():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(28, 1152, 2)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("wrapper", ["bare", "ema", "model"])
def test_published_format_checkpoint_loads_strict(tmp_path, wrapper):
    source = randomize_parameters_(DiT(**TINY))
    state = source.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state if wrapper == "bare" else {wrapper: state, "args": None}, path)
    loaded = torch.load(path, weights_only=True)
    target = DiT(**TINY)
    target.load_state_dict(loaded if wrapper == "bare" else loaded[wrapper], strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_init_is_identity_blocks_and_zero_output():
    torch.manual_seed(0)
    model = DiT(**TINY).eval()
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    assert torch.count_nonzero(model(x, t, y)) == 0
    tokens = model.x_embedder(x) + model.pos_embed
    cond = model.t_embedder(t) + model.y_embedder(y, False)
    assert torch.equal(model.blocks[0](tokens, cond, model.ops), tokens)
    # The rest follows the published recipe: xavier-uniform linears, zero biases, N(0, 0.02) embeddings.
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    # the patch conv is xavier on its (out, in*p*p) view: fans 4*2*2 and 48 (not the conv default)
    patch = model.x_embedder.proj.weight
    bound = math.sqrt(6 / (4 * 2 * 2 + 48))
    assert patch.abs().max() <= bound and patch.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0
    for embedding in (model.y_embedder.embedding_table, model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        assert abs(embedding.weight.std().item() - 0.02) < 0.005
    # the final layer starts at zero in both its linears: the output's 0 shows only the second
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_forward_with_cfg_published_and_all_channels():
    torch.manual_seed(2)
    model = randomize_parameters_(DiT(**TINY)).eval()
    x = torch.randn(2, 4, 8, 8)
    x = torch.cat([x, x])
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([1, 2, 10, 10])
    scale = 4.0
    raw = model(x, t, y)
    cond, uncond = raw.chunk(2)
    for guide_all, guided in ((False, 3), (True, 4)):
        out = model.forward_with_cfg(x, t, y, scale, guide_all_channels=guide_all)
        want = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
        assert torch.allclose(out[:2, :guided], want, atol=1e-5) and torch.allclose(out[2:, :guided], want, atol=1e-5)
        assert torch.equal(out[:, guided:], raw[:, guided:])


def test_label_dropout_only_in_training_or_forced():
    torch.manual_seed(3)
    model = randomize_parameters_(DiT(**TINY, class_dropout_prob=0.5))
    labels = torch.arange(10).repeat(20)
    table = model.y_embedder.embedding_table.weight
    eval_embed = model.y_embedder(labels, train=False)
    assert torch.equal(eval_embed, table[labels])
    train_embed = model.y_embedder(labels, train=True)
    dropped = (train_embed == table[10]).all(dim=1)
    assert 0.3 < dropped.float().mean() < 0.7
    forced = model.y_embedder(labels[:4], train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced, table[torch.tensor([10, 1, 10, 3])])


def test_no_null_class_without_dropout():
    model = DiT(**TINY, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == 10
    with pytest.raises(ValueError, match="0..9"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([10]))


@pytest.mark.parametrize("x_shape, t, y, message", [
    ((1, 4, 8, 6), [1], [1], "square"),
    ((1, 4, 7, 7), [1], [1], "divisible by the patch"),
    ((1, 4, 16, 16), [1], [1], "input_size=8"),
    ((1, 3, 8, 8), [1], [1], "in_channels=4"),
    ((4, 8, 8), [1], [1], r"\(N, C, H, W\)"),
    ((2, 4, 8, 8), [1], [1, 2], "t must have shape"),
    ((2, 4, 8, 8), [1, 2], [1], "y must have shape"),
    ((1, 4, 8, 8), [1], [11], "labels must lie in 0..10"),
    ((1, 4, 8, 8), [1], [-1], "labels must lie"),
])
def test_bad_inputs_raise_value_errors(x_shape, t, y, message):
    model = DiT(**TINY)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(x_shape), torch.tensor(t), torch.tensor(y))


def test_null_label_accepted_and_dtype_mismatch_named():
    model = DiT(**TINY)
    model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([10]))
    with pytest.raises(ValueError, match="float64"):
        model(torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="integer class labels"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="context_mask marks padding in a context, and no context was given"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]), context_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="forward_with_cfg takes a batch of 2N: .*, got 3"):
        model.forward_with_cfg(torch.randn(3, 4, 8, 8), torch.tensor([1, 1, 1]), torch.tensor([1, 2, 10]), 4.0)


def test_configs_and_unknown_names():
    assert len(DiT_models) == 12
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with pytest.raises(ValueError, match="unknown model config 'DiT-M/2'"):
        create_model("DiT-M/2")
    assert [config_patch_size(name) for name in ("DiT-S/2", "DiT-B/4", "DiT-XL/8")] == [2, 4, 8]
    with pytest.raises(ValueError, match="unknown model config 'DiT-XL'"):
        config_patch_size("DiT-XL")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        DiT(**TINY, kernels="cuda")


def test_set_kernels_switches_every_site():
    model = DiT(**TINY)
    assert model.kernels == "reference"
    model.set_kernels("sdpa")
    assert model.kernels == "sdpa" and model.ops.attention.__name__ == "sdpa_attention"


def test_label_dropout_rate_is_the_dropout_prob():
    torch.manual_seed(0)
    embedder = LabelEmbedder(10, 8, dropout_prob=0.1)
    labels = torch.arange(10).repeat(400)
    out = embedder(labels, train=True)
    dropped = (out == embedder.embedding_table.weight[10]).all(dim=1).float().mean().item()
    assert 0.07 < dropped < 0.13


BAD_CONFIGS = [
    (dict(input_size=9), "input_size 9 is not divisible by patch_size 2"),
    (dict(num_heads=5), "hidden_size 48 is not divisible by num_heads 5"),
    (dict(hidden_size=42, num_heads=3), "hidden_size 42 must be a multiple of 4"),
    (dict(num_classes=0), "num_classes must be at least 1, got 0"),
    (dict(class_dropout_prob=1.5), r"class_dropout_prob must lie in \[0, 1\], got 1.5"),
    (dict(class_dropout_prob=float("nan")), r"class_dropout_prob must lie in \[0, 1\], got nan"),
]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("change, message", BAD_CONFIGS)
def test_a_config_no_dit_can_have_is_refused_by_name(framework, change, message):
    """Both models refuse it at construction, not with a shape error at the first forward."""
    if framework == "jax":
        for extra in ("jax", "flax"):  # fusedit.dit.jax raises an ImportError of its own, which importorskip lets through
            pytest.importorskip(extra, reason="JAX is an optional extra: pip install -e '.[jax]'")
        from fusedit.dit.jax.model import DiT as model_class
    else:
        model_class = DiT
    with pytest.raises(ValueError, match=message):
        model_class(**{**TINY, **change})


def test_forward_with_cfg_reads_only_the_first_half_of_x():
    # As published: the batch is [half, half], so whatever the caller put in the second half is unused.
    torch.manual_seed(4)
    model = randomize_parameters_(DiT(**TINY)).eval()
    first, second = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 20, 10, 20]), torch.tensor([1, 2, 10, 10])
    want = model.forward_with_cfg(torch.cat([first, first]), t, y, 4.0)
    assert torch.equal(model.forward_with_cfg(torch.cat([first, second]), t, y, 4.0), want)


def test_forward_with_cfg_guides_at_most_in_channels():
    # With fewer than 3 input channels the published "first 3" must not reach the sigma channels.
    torch.manual_seed(5)
    model = randomize_parameters_(DiT(**{**TINY, "in_channels": 1})).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    t, y = torch.tensor([10, 10]), torch.tensor([3, 10])
    raw = model(x, t, y)
    out = model.forward_with_cfg(x, t, y, 4.0)
    want = raw[1:, :1] + 4.0 * (raw[:1, :1] - raw[1:, :1])
    assert torch.allclose(out[:, :1], torch.cat([want, want]), atol=1e-5)
    assert torch.equal(out[:, 1:], raw[:, 1:])


@pytest.mark.parametrize("name", ["t", "y"])
def test_t_or_y_on_another_device_is_named(name):
    model = DiT(**TINY)
    tensors = dict(t=torch.tensor([1]), y=torch.tensor([1]))
    tensors[name] = tensors[name].to("meta")  # a second device that every machine has
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        model(torch.randn(1, 4, 8, 8), tensors["t"], tensors["y"])


def test_a_float64_model_runs_in_float64():
    # the float32 sin-cos timestep features are cast to the model's dtype before its MLP
    torch.manual_seed(6)
    model = randomize_parameters_(DiT(**TINY)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    want = model(x, t, y)
    got = model.double()(x.double(), t, y)
    assert got.dtype == torch.float64 and relative_error(got.float(), want) < 1e-5


def test_under_autocast_x_may_differ_from_the_weights_dtype():
    model = DiT(**TINY).eval()
    x, t, y = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1]), torch.tensor([1])
    with pytest.raises(ValueError, match="bfloat16"):
        model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, t, y).shape == (1, 8, 8, 8)


def test_x_that_is_not_floating_point_or_on_another_device_is_named():
    model = DiT(**TINY)
    t, y = torch.tensor([1]), torch.tensor([1])
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
        model(torch.zeros(1, 4, 8, 8, dtype=torch.long), t, y)
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        model(torch.randn(1, 4, 8, 8, device="meta"), t.to("meta"), y.to("meta"))


def test_forward_drops_labels_in_training_and_where_forced():
    torch.manual_seed(7)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    null = torch.tensor([10, 10])
    always = randomize_parameters_(DiT(**TINY, class_dropout_prob=1.0))
    want = always.eval()(x, t, null)
    assert torch.equal(always.train()(x, t, y), want)
    model = randomize_parameters_(DiT(**TINY)).eval()
    forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(forced, model(x, t, torch.tensor([10, 2])))
