"""`fusedit train --block` end to end: every design trains on digits and samples."""
import pytest
import torch

from fusedit.cli import main


@pytest.mark.parametrize("block", ["cross_attn", "in_context", "adaln"])
def test_train_and_sample_with_block(tmp_path, block):
    results = tmp_path / "run"
    assert main(["train", "--data", "digits", "--block", block, "--steps", "2", "--global-batch-size", "8",
                 "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--ckpt-every", "2",
                 "--results-dir", str(results)]) == 0
    checkpoint = results / "checkpoints" / "0000002.pt"
    state = torch.load(checkpoint, weights_only=True)["model"]
    if block == "cross_attn":
        assert "blocks.0.cross_attn.q.weight" in state
    assert main(["sample", "--ckpt", str(checkpoint), "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
