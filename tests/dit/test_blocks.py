"""The paper's four block designs: Gflops, identity at init, external context with a padding
mask and a learned null context, and parity across op sets."""
import pytest
import torch

from fusedit.dit.flops import PAPER_GFLOPS_BY_BLOCK, flops_row
from fusedit.dit.models import BLOCKS, DiT
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
