"""fusedit.train.data: distinct random streams, a fresh permutation every epoch, latents drawn
from the posterior at the published scale, and the per-step draws of fusedit.train.loop."""
import numpy as np
import torch
from PIL import Image

from fusedit.train.data import (FLIP_STREAM, ORDER_STREAM, DigitsDataset, ImageFolderDataset, StepBatches, diffusion_inputs,
                                sample_latents, seeded_generator)
from fusedit.train.loop import TRAIN_STREAM, draw_step_randomness


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



def test_diffusion_inputs_per_data_source():
    class FakeVAE:  # a posterior whose mean and std are known functions of the images
        def encode(self, images):
            dist = type("Posterior", (), {"mean": images[:, :4] * 2, "std": images[:, :4].abs() + 0.5})
            return type("Encoded", (), {"latent_dist": dist})

    images, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert diffusion_inputs("pixels", images, None, noise) is images
    stored = torch.stack([images, images.abs()], dim=1)  # (N, 2, C, h, w): [mean, std]
    torch.testing.assert_close(diffusion_inputs("latents", stored, None, noise), (images + images.abs() * noise) * 0.18215)
    torch.testing.assert_close(diffusion_inputs("images", images, FakeVAE(), noise),
                               (images * 2 + (images.abs() + 0.5) * noise) * 0.18215)

def test_to_uint8_images_clamps_and_rounds():
    from fusedit.train.data import to_uint8_images

    pixels = to_uint8_images(torch.tensor([-2.0, -1, 0, 1, 2]).view(1, 1, 1, 5)).ravel()
    # out-of-range values clamp to 0 and 255 rather than wrapping around
    assert pixels.tolist() == [0, 0, 128, 255, 255]


def test_every_step_draws_afresh_over_all_timesteps():
    first, second = (draw_step_randomness(0, step, 4000, (1, 2, 2), 0.1) for step in (0, 1))
    assert not torch.equal(first.timesteps, second.timesteps) and not torch.equal(first.noise, second.noise)
    assert not torch.equal(first.drop_labels, second.drop_labels)
    timesteps = torch.cat([first.timesteps, second.timesteps])
    assert (timesteps.min(), timesteps.max()) == (0, 999)  # t = 0 trains too
    assert 0.08 < first.drop_labels.float().mean() < 0.12


def test_seeds_and_steps_are_separate_keys():
    # seed 1 must not be seed 0 one step later: runs meant to differ would share their draws
    draws = {key: torch.rand(4, generator=seeded_generator(*key)) for key in ((0, 1, 3), (1, 0, 3), (0, 0, 3))}
    assert len({tuple(value.tolist()) for value in draws.values()}) == 3


def test_flips_are_drawn_per_step_not_per_position_in_the_epoch():
    batches = StepBatches(64, 32, seed=0, flip=True)
    first, next_epoch = batches.global_batch(0)[1], batches.global_batch(batches.steps_per_epoch)[1]
    assert 0 < first.sum() < 32 and not torch.equal(first, next_epoch)


def test_digits_span_minus_one_to_one():
    x = DigitsDataset().x
    assert (x.min().item(), x.max().item()) == (-1.0, 1.0)


def test_image_folder_flips_mirror_left_to_right(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:4, :8] = 255  # a block in the top-left corner: asymmetric both ways
    Image.fromarray(pixels).save(folder / "one.png")
    dataset = ImageFolderDataset(tmp_path / "images", 16)
    plain, _ = dataset[(0, False)]
    flipped, _ = dataset[(0, True)]
    assert not torch.equal(plain, plain.flip(-1)) and torch.equal(flipped, plain.flip(-1))
