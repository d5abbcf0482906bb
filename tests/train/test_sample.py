"""`fusedit sample`: fusedit and published checkpoint formats load; grids and FID .npz files are written."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.cli import main as cli_main
from fusedit.dit.models import DiT
from fusedit.train.checkpoint import checkpoint_path
from fusedit.train.sample import infer_model_args, load_model_for_sampling


def tiny_digits_model():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


@pytest.fixture(scope="module")
def published_files(tmp_path_factory):
    """The same weights as a bare state dict, a published training checkpoint and safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("published")
    state = tiny_digits_model().state_dict()
    torch.save(state, folder / "bare.pt")
    published_args = argparse.Namespace(model="DiT-S/2", image_size=8, num_classes=10, global_seed=0)
    torch.save({"model": state, "ema": state, "opt": {}, "args": published_args}, folder / "training.pt")
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "weights.safetensors"))
    return folder, state


@pytest.mark.parametrize("name", ["bare.pt", "training.pt", "weights.safetensors"])
def test_published_formats_load(published_files, name):
    folder, state = published_files
    model, args = load_model_for_sampling(folder / name, kernels="reference", num_heads=2, device=torch.device("cpu"))
    assert (args.depth, args.hidden_size, args.num_classes, args.data) == (2, 32, 10, "digits")
    assert not model.training  # a training-mode model would drop labels at random
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("kernels, compile_model", [("compile", False), ("triton", True), ("triton", False)])
def test_compiled_sampling_models(published_files, monkeypatch, kernels, compile_model):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda forward: compiled.append(forward) or forward)
    folder, _ = published_files
    model, _ = load_model_for_sampling(folder / "bare.pt", kernels=kernels, num_heads=2, device=torch.device("cpu"),
                                       compile_model=compile_model)
    assert model.kernels == ("reference" if kernels == "compile" else kernels)
    assert compiled == ([model.forward] if compile_model or kernels == "compile" else [])


@pytest.mark.parametrize("block", ["adaln_zero", "adaln", "cross_attn", "in_context"])
def test_a_bare_state_dict_of_any_block_design_loads(tmp_path, block):
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                block=block)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    loaded, args = load_model_for_sampling(tmp_path / "bare.pt", kernels="reference", num_heads=2,
                                           device=torch.device("cpu"))
    assert args.block == block and loaded.block == block


def test_weights_that_do_not_fit_name_the_keys(published_files, tmp_path):
    _, state = published_files
    state = dict(state)
    state["extra.weight"] = state.pop("t_embedder.mlp.0.weight")
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"][:3]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as error:
        load_model_for_sampling(tmp_path / "broken.pt", kernels="reference", num_heads=2, device=torch.device("cpu"))
    assert str(error.value) == (f"the weights in {tmp_path / 'broken.pt'} do not fit the model they describe: "
                                "1 missing: t_embedder.mlp.0.weight; 1 unexpected: extra.weight; "
                                "1 of another shape: final_layer.linear.bias (3,) (model (8,))")


def test_a_bare_state_dict_without_a_null_class_loads_with_num_classes(tmp_path, capsys):
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == 10
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    cpu = torch.device("cpu")
    loaded, args = load_model_for_sampling(tmp_path / "bare.pt", kernels="reference", num_heads=2, device=cpu,
                                           num_classes=10)
    assert (loaded.num_classes, args.num_classes, args.label_dropout) == (10, 10, 0.0)
    assert loaded.y_embedder.dropout_prob == 0.0
    guessed, _ = load_model_for_sampling(tmp_path / "bare.pt", kernels="reference", num_heads=2, device=cpu)
    assert guessed.num_classes == 9  # the published layout: the last row read as the null class
    with pytest.raises(ValueError, match=r"--num-classes 12: the state dict's class table has 10 rows, so it holds "
                                         r"9 classes and the null class, or 10 classes without one"):
        load_model_for_sampling(tmp_path / "bare.pt", kernels="reference", num_heads=2, device=cpu, num_classes=12)
    common = ["sample", "--ckpt", str(tmp_path / "bare.pt"), "--num-heads", "2", "--steps", "2",
              "--kernels", "reference", "--num-classes", "10", "--out", str(tmp_path / "grid.png")]
    assert "guidance needs a model trained with label dropout" in fails(capsys, *common, "--class-labels", "9")
    assert cli_main([*common, "--class-labels", "9", "--cfg-scale", "1"]) == 0


def test_heads_and_classes_must_match_what_a_fusedit_checkpoint_records(published_files, tmp_path):
    folder, state = published_files
    recorded = vars(infer_model_args(state, num_heads=2))
    torch.save({"ema": state, "args": recorded}, tmp_path / "run.pt")
    cpu = torch.device("cpu")
    model, args = load_model_for_sampling(tmp_path / "run.pt", kernels="reference", num_heads=2, num_classes=10,
                                          device=cpu)
    assert (model.num_classes, args.num_heads) == (10, 2)
    for name, given in (("heads", 4), ("classes", 11)):
        with pytest.raises(ValueError, match=rf"--num-{name} {given}: .*run.pt was trained with "
                                             rf"{recorded['num_' + name]} {name}, which its checkpoint records"):
            load_model_for_sampling(tmp_path / "run.pt", kernels="reference", device=cpu, **{f"num_{name}": given})


def test_architecture_of_a_published_xl_checkpoint_is_inferred():
    shapes = {"pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2),
              "final_layer.linear.weight": (32, 1152), "y_embedder.embedding_table.weight": (1001, 1152)}
    shapes.update({f"blocks.{i}.attn.qkv.weight": (3456, 1152) for i in range(28)})
    args = infer_model_args({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
    assert (args.model, args.num_heads, args.image_size, args.num_classes, args.learn_sigma, args.data) == (
        "DiT-XL/2", 16, 256, 1000, True, "latents")


def test_sample_writes_a_grid_and_an_npz(published_files, tmp_path):
    folder, _ = published_files
    common = ["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--steps", "3", "--kernels", "reference"]
    assert cli_main([*common, "--class-labels", "0", "1", "2", "--out", str(tmp_path / "grid.png"), "--upscale", "2"]) == 0
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == (3 * 20 + 4, 20 + 4) and image.mode == "L"  # 16 px tiles, 4 px padding
    assert cli_main([*common, "--num-samples", "5", "--batch-size", "2", "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as stored:
        assert stored["arr_0"].shape == (5, 8, 8, 1) and stored["arr_0"].dtype == np.uint8
        assert stored["arr_1"].shape == (5,) and stored["arr_1"].max() < 10
        first = stored["arr_0"].copy()
    assert cli_main([*common, "--num-samples", "5", "--batch-size", "2", "--npz", str(tmp_path / "again.npz")]) == 0
    with np.load(tmp_path / "again.npz") as stored:
        assert np.array_equal(stored["arr_0"], first)  # seeded


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_sample_errors(published_files, tmp_path, capsys):
    folder, state = published_files
    assert "does not exist" in fails(capsys, "sample", "--ckpt", str(tmp_path / "nope.pt"))
    assert "pass --num-heads" in fails(capsys, "sample", "--ckpt", str(folder / "bare.pt"))
    assert "--class-labels [12]" in fails(capsys, "sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2",
                                          "--class-labels", "12", "--steps", "2", "--out", str(tmp_path / "x.png"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "is not a checkpoint fusedit loads" in fails(capsys, "sample", "--ckpt", str(tmp_path / "junk.pt"))
    broken = dict(state)
    broken["final_layer.linear.bias"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pt")
    assert "do not fit" in fails(capsys, "sample", "--ckpt", str(tmp_path / "broken.pt"), "--num-heads", "2")
    latent = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(latent.state_dict(), tmp_path / "latent.pt")
    assert "--vae PATH" in fails(capsys, "sample", "--ckpt", str(tmp_path / "latent.pt"), "--num-heads", "2")
    assert "does not exist" in fails(capsys, "sample", "--ckpt", str(tmp_path / "latent.pt"), "--num-heads", "2",
                                     "--vae", str(tmp_path / "no-vae"))
    assert "pass --sampler ddim" in fails(capsys, "sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2",
                                          "--eta", "0.5")
    assert "pixel-space model" in fails(capsys, "sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2",
                                        "--vae", str(tmp_path / "no-vae"), "--steps", "2", "--out", str(tmp_path / "x.png"))
    bare = ["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2"]
    assert "--out samples: give an image file name, e.g. samples.png (the name has no extension)" in fails(
        capsys, *bare, "--out", "samples")
    assert "(PIL writes no '.pgx' files)" in fails(capsys, *bare, "--out", "samples.pgx")
    assert "--steps 2000: the diffusion has 1000 timesteps" in fails(capsys, *bare, "--steps", "2000")
    assert "--seed must lie in 0..2**63-1, got -1" in fails(capsys, *bare, "--seed", "-1")
    assert not (tmp_path / "x.png").exists()


# Files that are not checkpoints, as users hand them over by mistake: each gives an error that
# names the file and says what it is, never a traceback, and never torch's advice to load it
# with weights_only=False (which would run whatever code the file brings).
NOT_CHECKPOINTS = {
    "empty.pt": (b"", "is empty, not a checkpoint"),
    "log.pt": (b"step,loss\n1,0.5\n", "is not a checkpoint fusedit loads"),
    "text.pt": (b"hello world\n", "is not a checkpoint fusedit loads"),
    "random.pt": (bytes(range(256)) * 8, "is not a checkpoint fusedit loads"),
    "truncated.safetensors": (b"\x10\x00", "is not a readable safetensors file"),
    "json.safetensors": (b'{"a": 1}', "is not a readable safetensors file"),
}


@pytest.mark.parametrize("name", list(NOT_CHECKPOINTS))
def test_a_file_that_is_no_checkpoint_is_named(name, tmp_path, capsys):
    content, message = NOT_CHECKPOINTS[name]
    (tmp_path / name).write_bytes(content)
    error = fails(capsys, "sample", "--ckpt", str(tmp_path / name), "--num-heads", "2")
    assert message in error and name in error, error
    assert "weights_only" not in error.replace("weights_only=True", ""), error
    assert "Traceback" not in error


@pytest.mark.parametrize("kept", [100, 5000, 200_000, -10])
def test_a_truncated_checkpoint_is_named(kept, tmp_path, capsys):
    # torch.load fails on a cut torch.save zip in several ways, one of them a bare OSError
    # (EINVAL, at 5,000 bytes here), which must not pass for a disk error and hide the file
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"weight": torch.randn(500, 500)}, "step": 3}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:kept])
    error = fails(capsys, "sample", "--ckpt", str(cut), "--num-heads", "2")
    assert "cut.pt is not a" in error and "Traceback" not in error, error


def test_output_paths_are_checked_before_sampling(published_files, tmp_path, capsys, monkeypatch):
    import fusedit.train.sample as sample

    folder, _ = published_files
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: pytest.fail("sampled before checking the output"))
    (tmp_path / "afile").write_text("")
    (tmp_path / "folder.png").mkdir()
    bare = ["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--steps", "2"]
    for flag, path, message in (("--out", tmp_path / "folder.png", "is a folder; give a file name"),
                                ("--npz", tmp_path, "is a folder; give a file name"),
                                ("--npz", tmp_path / "afile" / "s.npz", "is a file, so no folder can be made in it"),
                                ("--out", "/proc/grid.png", "cannot write files in /proc")):
        error = fails(capsys, *bare, flag, str(path), *(["--num-samples", "2"] if flag == "--npz" else []))
        assert f"{flag} {path}" in error and message in error, error


def test_a_checkpoint_of_something_else_is_named(tmp_path, capsys):
    torch.save({"encoder.weight": torch.randn(4, 4)}, tmp_path / "other.pt")
    error = fails(capsys, "sample", "--ckpt", str(tmp_path / "other.pt"), "--num-heads", "2")
    assert "other.pt: not a DiT state dict: 'pos_embed' is missing" in error, error


def test_a_run_folder_samples_its_newest_checkpoint(published_files, tmp_path, capsys):
    folder, state = published_files
    older = {key: value + 1 for key, value in state.items()}
    for step, weights in ((2, older), (5, state)):
        checkpoint_path(tmp_path, step).parent.mkdir(exist_ok=True)
        torch.save(weights, checkpoint_path(tmp_path, step))
    for where in (tmp_path, tmp_path / "checkpoints"):
        model, model_args = load_model_for_sampling(where, kernels="reference", num_heads=2, device=torch.device("cpu"))
        assert model_args.loaded_from == str(checkpoint_path(tmp_path, 5))  # what eval --json records
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
        assert f"{where}: using its newest checkpoint, {checkpoint_path(tmp_path, 5)}" in capsys.readouterr().out
    assert "is a folder without checkpoints" in fails(capsys, "sample", "--ckpt", str(folder), "--num-heads", "2")


def test_num_heads_must_agree_with_a_training_checkpoint(tmp_path, capsys):
    assert cli_main(["train", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "4",
                     "--steps", "1", "--no-progress", "--results-dir", str(tmp_path)]) == 0
    error = fails(capsys, "sample", "--ckpt", str(tmp_path), "--num-heads", "4")
    assert "--num-heads 4" in error and "trained with 2 heads" in error


def test_sampling_flag_defaults_are_the_papers():
    from fusedit.train.sample import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args([])
    # the DiT paper samples 250 DDPM steps; cfg 4.0 is its sample.py's guidance for grids
    assert (args.steps, args.cfg_scale, args.sampler, args.eta, args.seed) == (250, 4.0, "ddpm", 0.0, 0)
    assert args.weights == "ema"  # the paper samples its EMA weights


def test_sample_counts_must_be_positive(published_files, tmp_path, capsys):
    folder, _ = published_files
    common = ["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--steps", "2"]
    error = fails(capsys, *common, "--num-samples", "0", "--npz", str(tmp_path / "x.npz"))
    assert "--num-samples must be positive" in error
    assert "must be positive" in fails(capsys, *common, "--batch-size", "0", "--out", str(tmp_path / "x.png"))
    for flags, message in ((("--nrow", "0"), "--nrow must be positive, got 0"),
                           (("--upscale", "-2"), "--upscale must be positive, got -2"),
                           (("--cfg-scale", "nan"), "--cfg-scale must be a finite number, got nan"),
                           (("--sampler", "ddim", "--eta", "1.5"), "--eta must lie in [0, 1]"),
                           (("--sampler", "ddim", "--eta", "-0.1"), "--eta must lie in [0, 1]")):
        assert message in fails(capsys, *common, *flags, "--out", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.png").exists()


def test_default_labels_of_a_digits_model_are_each_digit_ten_times():
    from fusedit.train.sample import _default_labels

    labels = _default_labels(10)
    assert len(labels) == 100 and all(labels.count(digit) == 10 for digit in range(10))


def test_clipping_defaults_on_for_pixel_models_only():
    from fusedit.train.sample import resolve_clip

    for data, clip in (("digits", True), ("latents", False)):
        args = argparse.Namespace(clip_denoised=None)
        resolve_clip(args, argparse.Namespace(data=data))
        assert args.clip_denoised is clip, data


def test_npz_batches_are_seeded_seed_plus_batch(published_files, tmp_path, monkeypatch):
    import fusedit.train.sample as sample

    seeds = []

    def fake_sample_images(model, labels, seed, **kwargs):
        seeds.append(seed)
        return torch.zeros(len(labels), 1, 8, 8)

    monkeypatch.setattr(sample, "sample_images", fake_sample_images)
    folder, _ = published_files
    assert cli_main(["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--kernels", "reference",
                     "--num-samples", "5", "--batch-size", "2", "--npz", str(tmp_path / "s.npz")]) == 0
    assert seeds == [0, 1, 2]  # one seed per batch, so batches are not copies of each other
    seeds.clear()  # and so does a grid drawn in several batches
    args = argparse.Namespace(seed=7, batch_size=2, steps=1, cfg_scale=1.0, sampler="ddpm", eta=0.0,
                              guide_all_channels=False, clip_denoised=True)
    assert sample.generate(None, [0] * 5, args, progress=False).shape == (5, 8, 8, 1)
    assert seeds == [7, 8, 9]


def test_a_state_dict_of_neither_pixels_nor_latents_is_refused():
    shapes = {"pos_embed": (1, 16, 384), "x_embedder.proj.weight": (384, 3, 2, 2),
              "final_layer.linear.weight": (24, 384), "y_embedder.embedding_table.weight": (11, 384),
              "blocks.0.attn.qkv.weight": (1152, 384)}
    with pytest.raises(ValueError, match="3 input channels is neither a digits pixel model"):
        infer_model_args({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})


def test_save_grid_places_images_row_by_row_on_white(tmp_path):
    from fusedit.train.sample import save_grid

    images = np.stack([np.full((2, 3, 1), value, np.uint8) for value in (10, 20, 30)])
    save_grid(images, tmp_path / "grid.png", nrow=2, padding=1)
    with Image.open(tmp_path / "grid.png") as image:
        grid = np.asarray(image)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1)  # two rows of two columns, 1 px padding around each
    assert (grid[1:3, 1:4] == 10).all() and (grid[1:3, 5:8] == 20).all() and (grid[4:6, 1:4] == 30).all()
    assert (grid[4:6, 5:8] == 255).all() and (grid[0] == 255).all()  # the empty cell and the padding stay white


def test_generate_passes_the_clip_and_guidance_flags(monkeypatch):
    import fusedit.train.sample as sample

    calls = []
    monkeypatch.setattr(sample, "sample_images", lambda model, labels, **options: calls.append(options)
                        or torch.zeros(len(labels), 1, 4, 4))
    for clip, all_channels in ((False, True), (True, False)):
        args = argparse.Namespace(seed=0, batch_size=2, steps=1, cfg_scale=1.0, sampler="ddpm", eta=0.0,
                                  guide_all_channels=all_channels, clip_denoised=clip)
        sample.generate(None, [0], args, progress=False)
        assert (calls[-1]["clip_denoised"], calls[-1]["guide_all_channels"]) == (clip, all_channels)


def test_every_timestep_is_a_valid_step_count():
    from fusedit.train.sample import check_sampler_flags

    # sampling all 1000 timesteps is the full chain, not one too many
    check_sampler_flags(argparse.Namespace(steps=1000, batch_size=1, seed=0, cfg_scale=1.0, eta=0.0, sampler="ddpm"))


def test_default_labels_of_other_models_lie_inside_their_classes():
    from fusedit.train.sample import _default_labels

    assert _default_labels(1000) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert _default_labels(974) == [207, 360, 387, 88, 417, 279]  # 974 is not a class of a 974-class model
    assert _default_labels(5) == [0, 1, 2, 3, 4]  # none of the paper's classes: the first ones


def fake_sampling(monkeypatch, side):
    """sample_images replaced by random pixels of side x side, recording the labels it was asked for."""
    import fusedit.train.sample as sample

    asked = []

    def fake_sample_images(model, labels, **options):
        asked.extend(labels)
        return torch.rand(len(labels), 1, side, side) * 2 - 1

    monkeypatch.setattr(sample, "sample_images", fake_sample_images)
    return asked


def test_npz_labels_cover_every_class_and_match_the_images(published_files, tmp_path, monkeypatch):
    asked = fake_sampling(monkeypatch, 8)
    folder, _ = published_files
    assert cli_main(["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--kernels", "reference",
                     "--num-samples", "100", "--batch-size", "30", "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as stored:
        assert stored["arr_1"].tolist() == asked  # each image's label, in order
    assert sorted(set(asked)) == list(range(10))  # the last class is drawn too


def test_a_digits_grid_is_ten_per_row_with_tiles_of_at_least_64_pixels(published_files, tmp_path, monkeypatch):
    fake_sampling(monkeypatch, 20)
    folder, _ = published_files
    assert cli_main(["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--kernels", "reference",
                     "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as image:
        # 100 default labels of 20 px, upscaled 4x (3x would be 60 px), 4 px padding
        assert image.size == (10 * 84 + 4, 10 * 84 + 4)


def test_sample_refuses_negative_labels_and_an_unpaired_npz_flag(published_files, tmp_path, capsys):
    folder, _ = published_files
    common = ["sample", "--ckpt", str(folder / "bare.pt"), "--num-heads", "2", "--steps", "2"]
    assert "--class-labels [-1] lie outside 0..9" in fails(capsys, *common, "--class-labels", "-1", "0",
                                                            "--out", str(tmp_path / "x.png"))
    for flags in (("--num-samples", "4"), ("--npz", str(tmp_path / "x.npz"))):
        assert "--num-samples N and --npz PATH go together" in fails(capsys, *common, *flags, "--out", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.npz").exists()


def test_a_latent_models_grid_and_npz_are_decoded_through_the_vae(tmp_path, monkeypatch):
    import fusedit.train.sample as sample

    class FakeVAE(torch.nn.Module):  # decodes 4-channel latents to RGB 8x larger, as the SD VAE does
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def decode(self, latents):
            return argparse.Namespace(sample=torch.nn.functional.interpolate(latents[:, :3], scale_factor=8))

    monkeypatch.setattr(sample, "load_vae", lambda path, device: FakeVAE())
    monkeypatch.setattr(sample, "sample_images", lambda model, labels, **options: torch.randn(len(labels), 4, 4, 4))
    latent = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(latent.state_dict(), tmp_path / "latent.pt")
    common = ["sample", "--ckpt", str(tmp_path / "latent.pt"), "--num-heads", "2", "--kernels", "reference",
              "--vae", str(tmp_path / "vae")]
    assert cli_main([*common, "--class-labels", "0", "1", "2", "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as image:
        # 32 px RGB tiles (not the 4 px latents) upscaled 2x to 64 px, all 3 in one row, 4 px padding
        assert image.mode == "RGB" and image.size == (3 * 68 + 4, 68 + 4)
    assert cli_main([*common, "--num-samples", "3", "--batch-size", "2", "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as stored:
        assert stored["arr_0"].shape == (3, 32, 32, 3)
