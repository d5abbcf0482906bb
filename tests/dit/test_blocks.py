"""The paper's four block designs: Gflops, identity at init, external context with a padding
mask and a learned null context, parity across op sets, each design against an independent
implementation, and every op call site reached by set_kernels."""
import math

import pytest
import torch
import torch.nn.functional as F

from fusedit.dit.flops import PAPER_GFLOPS_BY_BLOCK, flops_row
from fusedit.dit.models import BLOCKS, DiT, block_of_state_dict
from fusedit.kernels import OpSet, get_ops
from fusedit.kernels.testing import randomize_parameters_, relative_error

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3, num_classes=10)




def inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
            torch.randint(0, 10, (batch,), generator=generator))


@pytest.mark.parametrize("block", ["adaln", "cross_attn", "in_context"])
def test_gflops_match_the_paper(block):
    row = flops_row("DiT-XL/2", 256, block=block)
    assert row["paper_gflops"] == PAPER_GFLOPS_BY_BLOCK[block]
    assert abs(row["diff_percent"]) < 0.5, row


@pytest.mark.parametrize("block", BLOCKS)
def test_every_design_runs_and_matches_across_op_sets(block):
    model = randomize_parameters_(DiT(**TINY, block=block)).eval()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    assert relative_error(model.set_kernels("sdpa")(x, t, y), out) < 1e-5


def test_key_names():
    adaln = DiT(**TINY, block="adaln").state_dict()
    assert adaln["blocks.0.adaLN_modulation.1.weight"].shape == (4 * 48, 48)
    cross = DiT(**TINY, block="cross_attn", context_dim=5).state_dict()
    for key in ("blocks.0.norm1.weight", "blocks.0.norm_cross.bias", "blocks.0.cross_attn.q.weight",
                "blocks.0.cross_attn.kv.weight", "blocks.0.cross_attn.proj.weight", "blocks.0.norm2.weight",
                "context_embedder.weight", "null_context"):
        assert key in cross, key
    assert not any("adaLN" in key for key in cross if key.startswith("blocks."))


def test_only_adaln_zero_starts_as_identity():
    x, t, y = inputs()
    for block in BLOCKS:
        model = DiT(**TINY, block=block).eval()
        tokens = model.x_embedder(x) + model.pos_embed
        cond = model.t_embedder(t) + model.y_embedder(y, False)
        context = torch.stack([model.t_embedder(t), model.y_embedder(y, False)], dim=1)
        same = torch.equal(model.blocks[0](tokens, cond, model.ops, context, None), tokens)
        assert same == (block == "adaln_zero"), block


def test_in_context_tokens_are_dropped_before_the_final_layer():
    model = randomize_parameters_(DiT(**TINY, block="in_context")).eval()
    x, t, y = inputs()
    seen = {}
    model.final_layer.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0].shape[1]))
    model(x, t, y)
    assert seen["tokens"] == 16


def context_model(**kwargs):
    return randomize_parameters_(DiT(**TINY, block="cross_attn", context_dim=5, **kwargs)).eval()


def test_padded_context_keys_change_nothing():
    model = context_model()
    x, t, _ = inputs()
    context = torch.randn(2, 6, 5)
    mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 2 + [True] * 4])
    out = model(x, t, None, context=context, context_mask=mask)
    changed = context.clone()
    changed[mask] = 100.0
    assert torch.equal(model(x, t, None, context=changed, context_mask=mask), out)
    # and the unpadded positions do matter
    changed[0, 0] += 1.0
    assert not torch.allclose(model(x, t, None, context=changed, context_mask=mask), out)
    # a mask with every key valid is the same as no mask
    assert torch.equal(model(x, t, None, context=context), model(x, t, None, context=context, context_mask=torch.zeros(2, 6, dtype=torch.bool)))


def test_context_with_labels_and_triton_style_mask_errors():
    model = context_model()
    x, t, y = inputs()
    assert model(x, t, y, context=torch.randn(2, 3, 5)).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, y, context=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="context_mask must be bool"):
        model(x, t, y, context=torch.randn(2, 3, 5), context_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"context_mask must be bool \(N, L=3\)"):
        model(x, t, y, context=torch.randn(2, 3, 5), context_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"context must be \(N=2, L, context_dim=5\), got \(3, 3, 5\)"):
        model(x, t, y, context=torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match="context is on meta but x is on cpu"):
        model(x, t, y, context=torch.randn(2, 3, 5, device="meta"))
    with pytest.raises(ValueError, match="takes no context"):
        DiT(**TINY)(x, t, y, context=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="y \\(class labels\\) is required"):
        DiT(**TINY)(x, t, None)
    with pytest.raises(ValueError, match="context_dim needs block='cross_attn'"):
        DiT(**TINY, context_dim=5)
    with pytest.raises(ValueError, match="unknown block"):
        DiT(**TINY, block="film")


def test_cfg_with_the_learned_null_context():
    model = context_model()
    x, t, _ = inputs(batch=2)
    x, t = torch.cat([x, x]), torch.cat([t, t])
    context = torch.randn(4, 3, 5)
    mask = torch.tensor([[False, False, True]] * 4)
    out = model.forward_with_cfg(x, t, None, 3.0, guide_all_channels=True, context=context, context_mask=mask)
    cond = model(x[:2], t[:2], None, context=context[:2], context_mask=mask[:2])
    null = torch.zeros(2, 1, 5) + model.null_context  # the null context alone, one valid token
    uncond = model(x[:2], t[:2], None, context=null)
    want = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(out[:2, :4], want, atol=1e-5) and torch.allclose(out[2:, :4], want, atol=1e-5)


def test_context_dropout_in_training_uses_the_null_context():
    model = context_model(class_dropout_prob=1.0).train()
    x, t, _ = inputs()
    context = torch.randn(2, 3, 5)
    dropped = model(x, t, None, context=context)
    null = torch.zeros(2, 1, 5) + model.null_context
    assert torch.allclose(dropped, model.eval()(x, t, None, context=null), atol=1e-6)
    assert model.null_context.requires_grad


def reference_layer_norm(z, weight=None, bias=None, eps=1e-6):
    mean = z.mean(-1, keepdim=True)
    normed = (z - mean) / torch.sqrt(((z - mean) ** 2).mean(-1, keepdim=True) + eps)
    return normed if weight is None else normed * weight + bias


def reference_attention(queries, keys, values, heads, key_padding_mask=None):
    """Multi-head softmax attention over already projected (B, T, C) queries, keys and values."""
    b, _, width = queries.shape
    q, k, v = (z.reshape(b, z.shape[1], heads, width // heads).transpose(1, 2) for z in (queries, keys, values))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if key_padding_mask is not None:  # True = padding
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, -1, width)


def reference_mlp(sd, z):
    hidden = F.linear(z, sd["mlp.fc1.weight"], sd["mlp.fc1.bias"])
    hidden = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
    return F.linear(hidden, sd["mlp.fc2.weight"], sd["mlp.fc2.bias"])


def reference_self_attention(sd, z, heads):
    q, k, v = F.linear(z, sd["attn.qkv.weight"], sd["attn.qkv.bias"]).chunk(3, dim=-1)  # rows Q|K|V
    return F.linear(reference_attention(q, k, v, heads), sd["attn.proj.weight"], sd["attn.proj.bias"])


def reference_block(block, sd, x, c, context, context_mask, heads=3):
    """One block of each non-default design, written out over its bare state dict."""
    if block == "adaln":  # adaLN without gates: 4C outputs, shift|scale for attention, then for the MLP
        shift1, scale1, shift2, scale2 = F.linear(F.silu(c), sd["adaLN_modulation.1.weight"],
                                                  sd["adaLN_modulation.1.bias"]).chunk(4, dim=1)
        x = x + reference_self_attention(sd, reference_layer_norm(x) * (1 + scale1[:, None]) + shift1[:, None], heads)
        return x + reference_mlp(sd, reference_layer_norm(x) * (1 + scale2[:, None]) + shift2[:, None])
    x = x + reference_self_attention(sd, reference_layer_norm(x, sd["norm1.weight"], sd["norm1.bias"]), heads)
    if block == "cross_attn":  # queries from the image tokens, keys|values from the context
        q = F.linear(reference_layer_norm(x, sd["norm_cross.weight"], sd["norm_cross.bias"]),
                     sd["cross_attn.q.weight"], sd["cross_attn.q.bias"])
        k, v = F.linear(context, sd["cross_attn.kv.weight"], sd["cross_attn.kv.bias"]).chunk(2, dim=-1)
        attended = reference_attention(q, k, v, heads, context_mask)
        x = x + F.linear(attended, sd["cross_attn.proj.weight"], sd["cross_attn.proj.bias"])
    return x + reference_mlp(sd, reference_layer_norm(x, sd["norm2.weight"], sd["norm2.bias"]))


@pytest.mark.parametrize("block", ["adaln", "cross_attn", "in_context"])
def test_each_block_design_matches_an_independent_implementation(block):
    # The op-set parity test cannot see a wrong formula shared by every op set; this one can.
    model = randomize_parameters_(DiT(**TINY, block=block)).eval()
    for norm in ("norm1", "norm_cross", "norm2"):  # LayerNorm weights near 1, as trained, not near 0
        if hasattr(model.blocks[0], norm):
            getattr(model.blocks[0], norm).weight.data.add_(1.0)
    generator = torch.Generator().manual_seed(11)
    x, c = torch.randn(2, 16, 48, generator=generator), torch.randn(2, 48, generator=generator)
    context = torch.randn(2, 5, 48, generator=generator)
    mask = torch.tensor([[False, False, False, True, True], [False, True, True, True, True]])
    sd = model.blocks[0].state_dict()
    want = reference_block(block, sd, x, c, context, mask)
    assert relative_error(model.blocks[0](x, c, model.ops, context, mask), want) < 1e-5


def test_cross_attention_reads_t_y_and_the_embedded_context_with_its_mask():
    model = context_model()
    x, t, y = inputs()
    context = torch.randn(2, 3, 5)
    mask = torch.tensor([[False, False, True], [False, True, True]])
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(context=args[3], mask=args[4]))
    with torch.no_grad():
        t_token, y_token = model.t_embedder(t), model.y_embedder(y, False)
        for labels, condition in ((y, [t_token, y_token]), (None, [t_token])):
            model(x, t, labels, context=context, context_mask=mask)
            want = torch.cat([torch.stack(condition, dim=1), model.context_embedder(context)], dim=1)
            assert torch.equal(seen["context"], want)
            # the t (and y) tokens are never padding
            assert torch.equal(seen["mask"], torch.cat([torch.zeros(2, len(condition), dtype=torch.bool), mask], dim=1))


@pytest.mark.parametrize("block, calls", [
    ("adaln_zero", dict(adaln_modulate=3, residual_adaln_modulate=2, gated_residual=2, attention=2, linear_gelu=2)),
    ("adaln", dict(adaln_modulate=3, residual_adaln_modulate=2, gated_residual=2, attention=2, linear_gelu=2)),
    ("in_context", dict(adaln_modulate=5, residual_adaln_modulate=0, gated_residual=4, attention=2, linear_gelu=2)),
    ("cross_attn", dict(adaln_modulate=7, residual_adaln_modulate=0, gated_residual=6, attention=4, linear_gelu=2)),
])
def test_set_kernels_reaches_every_op_call_site(block, calls):
    """Every op of a forward goes through the op set given to set_kernels (here a counting
    wrapper of the reference ops): a site calling an op set of its own would be missed by
    the parity tests, since all op sets agree numerically."""
    model = randomize_parameters_(DiT(**TINY, block=block)).eval()
    x, t, y = inputs()
    want = model(x, t, y)
    reference, counts = get_ops("reference"), dict.fromkeys(calls, 0)

    def counting(name):
        def op(*args, **kwargs):
            counts[name] += 1
            return getattr(reference, name)(*args, **kwargs)
        return op

    model.set_kernels(OpSet(name="counting", **{name: counting(name) for name in calls}))
    assert model.kernels == "counting"
    assert torch.equal(model(x, t, y), want)
    assert counts == calls  # depth 2: per block, plus the final layer's one adaln_modulate


def test_only_adaln_zero_zeroes_the_block_modulation_at_init():
    # plain adaLN keeps the xavier-uniform init of every other linear (its blocks are not gated,
    # so zeroed shift and scale would not make them the identity anyway)
    modulation = DiT(**TINY, block="adaln").blocks[0].adaLN_modulation[1].weight
    bound = math.sqrt(6 / (modulation.shape[0] + modulation.shape[1]))
    assert modulation.abs().max() <= bound and modulation.abs().max() > 0.9 * bound


def test_null_context_starts_small_and_random():
    torch.manual_seed(0)
    null = DiT(**TINY, block="cross_attn", context_dim=512).null_context
    assert torch.count_nonzero(null) == 512 and abs(null.std().item() - 0.02) < 0.005


def test_in_context_final_layer_sees_the_image_tokens_not_the_condition_tokens():
    model = randomize_parameters_(DiT(**TINY, block="in_context")).eval()
    x, t, y = inputs()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(block_in=args[0]))
    model.blocks[-1].register_forward_hook(lambda module, args, out: seen.update(block_out=out))
    model.final_layer.register_forward_pre_hook(lambda module, args: seen.update(final_in=args[0]))
    model(x, t, y)
    with torch.no_grad():
        image = model.x_embedder(x) + model.pos_embed
        condition = torch.stack([model.t_embedder(t), model.y_embedder(y, False)], dim=1)
    assert torch.equal(seen["block_in"], torch.cat([image, condition], dim=1))
    assert seen["block_out"].shape[1] == 18  # 16 image tokens, then the t and y tokens
    assert torch.equal(seen["final_in"], seen["block_out"][:, :16])


def test_block_of_state_dict_names_each_design():
    for block in BLOCKS:
        kwargs = {"context_dim": 5} if block == "cross_attn" else {}
        assert block_of_state_dict(DiT(**TINY, block=block, **kwargs).state_dict()) == block
    assert block_of_state_dict({}) == "adaln_zero"


@pytest.mark.parametrize("block", BLOCKS)
def test_an_empty_batch_gives_an_empty_output(block):
    # check_inputs accepts N=0; the head reshapes once used -1, which an empty batch cannot infer
    kwargs, extra = {}, {}
    if block == "cross_attn":
        kwargs, extra = {"context_dim": 5}, dict(context=torch.zeros(0, 3, 5), context_mask=torch.zeros(0, 3, dtype=torch.bool))
    model = DiT(**TINY, block=block, **kwargs).eval()
    x, t, y = torch.zeros(0, 4, 8, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    assert model(x, t, y, **extra).shape == (0, 8, 8, 8)
    assert model.forward_with_cfg(x, t, y, 4.0, **extra).shape == (0, 8, 8, 8)
