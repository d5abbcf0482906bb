"""fusedit.train.data: distinct random streams, a fresh permutation every epoch, latents drawn
from the posterior at the published scale."""
import torch

from fusedit.train.data import FLIP_STREAM, ORDER_STREAM, StepBatches, sample_latents
from fusedit.train.loop import TRAIN_STREAM


def test_random_streams_are_distinct():
    # a shared id would make two kinds of draws (order, flips, per-step noise) the same numbers
    assert len({ORDER_STREAM, FLIP_STREAM, TRAIN_STREAM}) == 3


def test_each_epoch_is_a_fresh_permutation():
    batches = StepBatches(10, 5, seed=0, flip=False)

    def epoch(number):  # its two batches of 5
        return torch.cat([batches.global_batch(2 * number)[0], batches.global_batch(2 * number + 1)[0]])

    assert sorted(epoch(0).tolist()) == list(range(10)) and sorted(epoch(1).tolist()) == list(range(10))
    assert not torch.equal(epoch(0), epoch(1))


def test_sample_latents_scales_the_posterior_draw():
    mean, std, noise = torch.randn(2, 4, 2, 2), torch.rand(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    # 0.18215: the Stable Diffusion VAE's latent scale, as published
    torch.testing.assert_close(sample_latents(mean, std, noise), (mean + std * noise) * 0.18215)


def test_to_uint8_images_clamps_and_rounds():
    from fusedit.train.data import to_uint8_images

    pixels = to_uint8_images(torch.tensor([-2.0, -1, 0, 1, 2]).view(1, 1, 1, 5)).ravel()
    # out-of-range values clamp to 0 and 255 rather than wrapping around
    assert pixels.tolist() == [0, 0, 128, 255, 255]
