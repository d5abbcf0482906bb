"""fusedit.train.data: distinct random streams, a fresh permutation every epoch, latents drawn
from the posterior at the published scale, and the per-step draws of fusedit.train.loop."""
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.train.data import (FLIP_STREAM, ORDER_STREAM, DigitsDataset, ImageFolderDataset, LatentsDataset,
                                RankBatchSampler, StepBatches, center_crop_arr, decode_latents, diffusion_inputs,
                                list_image_folder, load_image, load_vae, sample_latents, seeded_generator, to_uint8_images)
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


def test_step_batches_refuse_an_empty_batch():
    # a batch of 0 would divide by zero in steps_per_epoch rather than say what is wrong
    with pytest.raises(ValueError, match="must be positive, got 0"):
        StepBatches(10, 0, seed=0, flip=False)


def test_rank_slices_partition_the_global_batch():
    batches = StepBatches(12, 6, seed=3, flip=True)
    samplers = [RankBatchSampler(batches, 2, 5, rank=rank, world_size=3) for rank in range(3)]
    assert [len(sampler) for sampler in samplers] == [3, 3, 3]  # steps 2, 3, 4: counted from the start step
    per_rank = [list(sampler) for sampler in samplers]
    for position, step in enumerate(range(2, 5)):
        indices, flips = batches.global_batch(step)
        joined = [pair for rank_steps in per_rank for pair in rank_steps[position]]
        assert joined == list(zip(indices.tolist(), flips.tolist()))
    with pytest.raises(ValueError, match="does not divide across 4 ranks"):
        RankBatchSampler(batches, 0, 1, rank=0, world_size=4)


def test_order_and_flips_come_from_their_own_streams_of_the_seed():
    # a run resumed from an older checkpoint must draw the batches it would have drawn, so the
    # order and flips of a seed are pinned: each comes from its own stream of that seed
    batches = StepBatches(8, 4, seed=0, flip=True)
    indices, flips = batches.global_batch(1)
    order = torch.randperm(8, generator=seeded_generator(0, 0, ORDER_STREAM))
    assert torch.equal(indices, order[4:8])
    assert torch.equal(flips, torch.rand(4, generator=seeded_generator(0, 1, FLIP_STREAM)) < 0.5)


def test_digits_of_another_size_are_a_bilinear_resize():
    small, large = DigitsDataset().x, DigitsDataset(12).x
    expected = torch.nn.functional.interpolate(small, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(large, expected)


def write_latents(directory, count=3, format="fusedit-latents-v1"):
    directory.mkdir()
    generator = np.random.default_rng(1)
    shape = (count, 2, 4, 2, 2)
    np.save(directory / "mean.npy", generator.normal(size=shape).astype(np.float16))
    np.save(directory / "std.npy", generator.uniform(0.1, 1, size=shape).astype(np.float16))
    np.save(directory / "labels.npy", np.arange(count, dtype=np.int64))
    (directory / "meta.json").write_text(json.dumps({"format": format, "num_classes": count, "image_size": 16}))
    return directory


def test_latents_of_another_format_or_inconsistent_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="has format 'something-else', expected 'fusedit-latents-v1'"):
        LatentsDataset(write_latents(tmp_path / "other", format="something-else"), 16)
    for name, array in (("std.npy", np.ones((3, 2, 4, 2, 1), np.float16)),  # std not the shape of mean
                        ("labels.npy", np.arange(2, dtype=np.int64))):
        directory = write_latents(tmp_path / name.split(".")[0])
        np.save(directory / name, array)
        with pytest.raises(ValueError, match="are inconsistent"):
            LatentsDataset(directory, 16)
    unpaired = write_latents(tmp_path / "unpaired")
    for name in ("mean.npy", "std.npy"):  # one posterior per image, without its mirror
        np.save(unpaired / name, np.ones((3, 1, 4, 2, 2), np.float16))
    with pytest.raises(ValueError, match="are inconsistent"):
        LatentsDataset(unpaired, 16)


def test_image_folders_take_upper_case_extensions(tmp_path):
    for name in ("a/one.PNG", "a/two.Jpg", "b/three.png", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    paths, labels, classes = list_image_folder(tmp_path)
    assert [path.rsplit("/", 1)[1] for path in paths] == ["one.PNG", "two.Jpg", "three.png"]
    assert (labels, classes) == ([0, 0, 1], ["a", "b"])


def test_loaded_images_span_minus_one_to_one(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255
    Image.fromarray(pixels).save(tmp_path / "image.png")
    image = load_image(tmp_path / "image.png", 8)
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)


def test_center_crop_resizes_the_short_side_to_the_rounded_size():
    # 31 x 20 to 16 px: ADM resizes to round(31 * 16 / 20) = 25 columns (24.8), not 24
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(20, 31, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((25, 16), resample=Image.BICUBIC))
    assert np.array_equal(center_crop_arr(image, 16), resized[:, 4:20])


def test_decode_latents_unscales_and_clamps():
    class FakeVAE:  # decoding doubles its input, so out-of-range pixels appear
        def decode(self, latents):
            return types.SimpleNamespace(sample=latents * 2)

    latents = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(decode_latents(FakeVAE(), latents), (latents / 0.18215 * 2).clamp(-1, 1))


def test_to_uint8_images_are_channels_last_in_their_own_rows_and_columns():
    images = torch.rand(2, 3, 4, 5) * 2 - 1
    pixels = to_uint8_images(images)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == np.uint8
    assert pixels[1, 3, 2, 0] == round((images[1, 0, 3, 2].item() + 1) * 127.5)


def test_load_vae_reads_local_files_only_and_freezes_the_model(tmp_path, monkeypatch):
    requests = []

    class FakeAutoencoderKL:  # diffusers' loader, recording how it was asked
        @staticmethod
        def from_pretrained(path, **options):
            requests.append((path, options))
            return torch.nn.Linear(2, 2)

    fake_diffusers = types.ModuleType("diffusers")
    fake_diffusers.models = types.ModuleType("diffusers.models")
    fake_diffusers.models.AutoencoderKL = FakeAutoencoderKL
    monkeypatch.setitem(sys.modules, "diffusers", fake_diffusers)
    monkeypatch.setitem(sys.modules, "diffusers.models", fake_diffusers.models)
    vae = load_vae(tmp_path)
    assert requests == [(str(tmp_path), {"local_files_only": True})]  # never a download
    assert not vae.training and not any(parameter.requires_grad for parameter in vae.parameters())
