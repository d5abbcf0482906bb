"""`fusedit extract`: an ImageFolder becomes latents (image and mirror, mean and std) that train."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusedit.cli import main as cli_main
from fusedit.train.data import ImageFolderDataset, LatentsDataset, center_crop_arr
from fusedit.train.extract import extract_latents


def stub_encoder(images):
    """A stand-in for the VAE: 8x average pooling to 4 channels; std from the pixels."""
    pooled = F.avg_pool2d(images, 8)
    mean = torch.cat([pooled, pooled[:, :1] * 2], dim=1)
    return mean, mean.abs() * 0.1 + 0.01


@pytest.fixture
def image_folder(tmp_path):
    generator = np.random.default_rng(0)
    for index, (name, size) in enumerate([("cat", (20, 24)), ("cat", (40, 33)), ("dog", (16, 16)), ("dog", (31, 50)), ("dog", (17, 19))]):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 255, size=size + (3,), dtype=np.uint8)).save(folder / f"{index}.png")
    (tmp_path / "images" / "dog" / "notes.txt").write_text("not an image")
    return tmp_path / "images"


def test_center_crop_is_square_and_central():
    image = Image.fromarray(np.arange(40 * 64, dtype=np.uint8).reshape(40, 64))
    cropped = center_crop_arr(image, 20)
    assert cropped.shape == (20, 20)
    halved = np.asarray(image.resize((32, 20), resample=Image.BOX))  # 40 >= 2 * 20: one box halving
    assert np.array_equal(cropped, halved[:, 6:26])


def test_extract_stores_image_and_mirror(image_folder, tmp_path):
    out = tmp_path / "latents"
    meta = extract_latents(image_folder, out, stub_encoder, image_size=16, batch_size=2, progress=False)
    assert meta["count"] == 5 and meta["num_classes"] == 2 and meta["classes"] == ["cat", "dog"]
    mean, std = np.load(out / "mean.npy"), np.load(out / "std.npy")
    assert mean.shape == (5, 2, 4, 2, 2) and mean.dtype == np.float16 and (std > 0).all()
    assert np.load(out / "labels.npy").tolist() == [0, 0, 1, 1, 1]
    assert json.loads((out / "meta.json").read_text())["scale"] == 0.18215
    np.testing.assert_allclose(mean[:, 1], mean[:, 0][..., ::-1], rtol=1e-3, atol=1e-3)  # mirror of a pooled image
    assert not (out / ".partial").exists()
    dataset = LatentsDataset(out, 16)
    pair, label = dataset[(2, True)]
    assert pair.shape == (2, 4, 2, 2) and label == 1
    np.testing.assert_array_equal(pair[0].numpy(), mean[2, 1].astype(np.float32))

    with pytest.raises(FileExistsError, match="--overwrite"):
        extract_latents(image_folder, out, stub_encoder, image_size=16, progress=False)
    assert cli_main(["train", "--data", "latents", str(out), "--image-size", "16", "--model", "DiT-S/2", "--depth", "1",
                     "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "4", "--steps", "2", "--no-progress",
                     "--num-workers", "0", "--results-dir", str(tmp_path / "run")]) == 0


def test_extract_errors(image_folder, tmp_path, capsys):
    def fails(*argv):
        with pytest.raises(SystemExit):
            cli_main(["extract", *argv])
        return capsys.readouterr().err

    assert "does not exist" in fails(str(tmp_path / "missing"), str(tmp_path / "out"), "--vae", "x")
    (tmp_path / "afile").write_text("")
    assert f"image directory {tmp_path / 'afile'} is a file, not a folder" in fails(str(tmp_path / "afile"),
                                                                                   str(tmp_path / "out"), "--vae", "x")
    assert f"OUT_DIR {tmp_path / 'afile'} is a file, not a folder" in fails(str(image_folder), str(tmp_path / "afile"),
                                                                           "--vae", "x")
    assert "--image-size must be positive, got 0" in fails(str(image_folder), str(tmp_path / "out"), "--vae", "x",
                                                           "--image-size", "0")
    assert "multiple of 8" in fails(str(image_folder), str(tmp_path / "out"), "--vae", "x", "--image-size", "20")
    assert "VAE folder" in fails(str(image_folder), str(tmp_path / "out"), "--vae", str(tmp_path / "no-vae"))
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in fails(str(tmp_path / "empty"), str(tmp_path / "out"), "--vae", "x")
    for flag, value, message in (("--batch-size", "0", "--batch-size must be positive, got 0"),
                                 ("--num-workers", "-1", "--num-workers must not be negative")):
        # refused before the VAE loads (this one does not exist)
        assert message in fails(str(image_folder), str(tmp_path / "out"), "--vae", "x", flag, value)
    assert not (tmp_path / "out").exists()


def conv_encoder():
    """A stand-in with parameters, as a VAE has: extraction must encode without autograd."""
    conv = torch.nn.Conv2d(3, 4, 8, stride=8)
    return lambda images: (conv(images), conv(images).exp())


@pytest.mark.parametrize("make_encoder", [lambda: stub_encoder, conv_encoder], ids=["pooling", "with-parameters"])
def test_extract_rows_hold_image_then_mirror_and_meta_describes_them(image_folder, tmp_path, make_encoder):
    encode, out = make_encoder(), tmp_path / "latents"
    meta = extract_latents(image_folder, out, encode, image_size=16, batch_size=2, progress=False)
    images = torch.stack([ImageFolderDataset(image_folder, 16)[(index, False)][0] for index in range(5)])
    with torch.no_grad():
        expected = [tensor.reshape(2, 5, 4, 2, 2).transpose(0, 1).numpy() for tensor in encode(torch.cat([images, images.flip(-1)]))]
    for name, want in zip(("mean.npy", "std.npy"), expected):
        np.testing.assert_allclose(np.load(out / name), want, rtol=2e-3, atol=2e-3)
    assert np.load(out / "labels.npy").dtype == np.int64
    assert json.loads((out / "meta.json").read_text()) == meta == {
        "format": "fusedit-latents-v1", "image_size": 16, "latent_shape": [4, 2, 2], "count": 5, "num_classes": 2,
        "classes": ["cat", "dog"], "scale": 0.18215, "dtype": "float16", "image_dir": str(image_folder)}


# (16, 1, 1) has as many numbers as (4, 2, 2); the last encoder drops the mirrors
@pytest.mark.parametrize("channels, factor, kept", [(8, 8, 2), (16, 16, 2), (4, 8, 1)])
def test_extract_refuses_latents_of_another_shape(image_folder, tmp_path, channels, factor, kept):
    def encode(images):
        pooled = F.avg_pool2d(images, factor)[:len(images) * kept // 2, :1].repeat(1, channels, 1, 1)
        return pooled, pooled.abs() + 0.01

    size = 16 // factor
    with pytest.raises(ValueError, match=rf"shape \((\d+), {channels}, {size}, {size}\) for a batch of (\d+) images "
                                         rf"\(each image and its mirror\), expected \(\d+, 4, 2, 2\)"):
        extract_latents(image_folder, tmp_path / "latents", encode, image_size=16, progress=False)
    assert not (tmp_path / "latents" / "meta.json").exists()


def test_a_failed_extraction_is_unfinished_and_reruns(image_folder, tmp_path):
    def fails(images):
        raise RuntimeError("out of memory")

    out = tmp_path / "latents"
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_latents(image_folder, out, fails, image_size=16, progress=False)
    assert (out / ".partial").is_dir() and not (out / "meta.json").exists()
    assert extract_latents(image_folder, out, stub_encoder, image_size=16, progress=False)["count"] == 5
    assert (out / "meta.json").exists() and not (out / ".partial").exists()


def test_an_overwrite_that_fails_midway_leaves_no_meta_json(image_folder, tmp_path, monkeypatch):
    """meta.json marks a finished extraction: it goes before the arrays are replaced, so
    arrays of two runs are never taken for one."""
    out = tmp_path / "latents"
    extract_latents(image_folder, out, stub_encoder, image_size=16, progress=False)
    moved, original_replace = [], type(out).replace

    def replace_then_fail(self, target):
        if moved:
            raise OSError("disk full")
        moved.append(self.name)
        return original_replace(self, target)

    monkeypatch.setattr(type(out), "replace", replace_then_fail)
    with pytest.raises(OSError, match="disk full"):
        extract_latents(image_folder, out, stub_encoder, image_size=16, overwrite=True, progress=False)
    assert len(moved) == 1 and not (out / "meta.json").exists()


RANK_SCRIPT = """
import sys
import torch.distributed as dist
import torch.nn.functional as F
from fusedit.train.extract import extract_latents

def stub_encoder(images):  # the test module's stand-in, written out again for the child processes
    import torch
    pooled = F.avg_pool2d(images, 8)
    mean = torch.cat([pooled, pooled[:, :1] * 2], dim=1)
    return mean, mean.abs() * 0.1 + 0.01

dist.init_process_group("gloo")
try:
    extract_latents(sys.argv[1], sys.argv[2], stub_encoder, image_size=16, batch_size=1, progress=False)
finally:
    dist.destroy_process_group()
"""


def test_two_ranks_write_the_same_latents_as_one(image_folder, tmp_path):
    single = extract_latents(image_folder, tmp_path / "one", stub_encoder, image_size=16, progress=False)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "rank.py"), str(image_folder), str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "two" / "meta.json").read_text()) == single
    for name in ("mean.npy", "std.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name), err_msg=name)
    assert not (tmp_path / "two" / ".partial").exists()
