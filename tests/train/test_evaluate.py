"""`fusedit eval digits`: the classifier and Frechet distance separate real digits from noise."""
import numpy as np
import pytest
import torch

from fusedit.cli import main as cli_main
from fusedit.dit.models import DiT
from fusedit.train.evaluate import DigitsClassifier, frechet_distance, real_digits, real_floor, score, to_classifier_input


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


def write_npz(path, images01, labels):
    """images in [0, 1], (N, 64) -> uint8 NHWC."""
    pixels = np.round(np.asarray(images01).reshape(-1, 8, 8, 1) * 255).astype(np.uint8)
    np.savez(path, arr_0=pixels, arr_1=np.asarray(labels))


def test_frechet_distance_closed_form():
    generator = np.random.default_rng(0)
    a = generator.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 * (1 + 4 - 2 * 2)
    b = generator.normal(size=(4000, 3)) * 2 + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(1.0 + 3.0, rel=0.1)


def test_real_digits_score_high_and_noise_scores_low(tmp_path, cache_dir, capsys):
    x, y = real_digits()
    write_npz(tmp_path / "real.npz", x[:500], y[:500])
    assert cli_main(["eval", "digits", "--npz", str(tmp_path / "real.npz"), "--cache-dir", str(cache_dir),
                     "--json", str(tmp_path / "real.json")]) == 0
    import json

    real = json.loads((tmp_path / "real.json").read_text())
    assert real["classifier_held_out_accuracy"] > 0.95
    real_scores = real["results"]["real.npz"]
    assert real_scores["accuracy"] > 0.95 and set(real_scores["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert all(value > 0.9 for value in real_scores["per_class_accuracy"].values()), real_scores  # each digit, not its share

    write_npz(tmp_path / "noise.npz", np.random.default_rng(0).random((500, 64)), y[:500])
    assert cli_main(["eval", "digits", "--npz", str(tmp_path / "noise.npz"), "--cache-dir", str(cache_dir),
                     "--json", str(tmp_path / "noise.json")]) == 0
    noise = json.loads((tmp_path / "noise.json").read_text())["results"]["noise.npz"]
    assert noise["accuracy"] < 0.3 and noise["frechet_distance"] > 10 * real_scores["frechet_distance"]
    assert "accuracy (all)" in capsys.readouterr().out


def test_classifier_is_cached(cache_dir):
    first = DigitsClassifier.load_or_fit(cache_dir)
    assert list(cache_dir.glob("digits_classifier_*.npz"))
    again = DigitsClassifier.load_or_fit(cache_dir)
    assert np.array_equal(first.weights["w0"], again.weights["w0"])


def test_eval_samples_a_checkpoint(tmp_path, cache_dir):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    assert cli_main(["eval", "digits", "--ckpt", str(tmp_path / "digits.pt"), "--num-heads", "2", "--num-per-class", "2",
                     "--steps", "2", "--kernels", "reference", "--cache-dir", str(cache_dir),
                     "--json", str(tmp_path / "m.json")]) == 0
    import json

    report = json.loads((tmp_path / "m.json").read_text())
    results = report["results"]
    assert report["settings"]["ckpt"] == str(tmp_path / "digits.pt")
    assert set(results) == {"real held-out", "cfg 4", "cfg 1"} and results["cfg 4"]["count"] == 20
    assert cli_main(["eval", "digits", "--ckpt", str(tmp_path / "digits.pt"), "--num-heads", "2", "--num-per-class", "1",
                     "--steps", "2", "--kernels", "reference", "--cache-dir", str(cache_dir), "--no-unguided",
                     "--json", str(tmp_path / "guided.json")]) == 0
    assert set(json.loads((tmp_path / "guided.json").read_text())["results"]) == {"real held-out", "cfg 4"}


def test_eval_errors(tmp_path, capsys, cache_dir):
    with pytest.raises(SystemExit):
        cli_main(["eval", "digits"])
    assert "exactly one of --ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["eval", "digits", "--npz", str(tmp_path / "any.npz"), "--num-per-class", "0"])
    assert "--num-per-class must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["eval", "digits", "--npz", str(tmp_path / "missing.npz")])
    assert f"--npz {tmp_path / 'missing.npz'} does not exist" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    for flag, path, message in (("--json", tmp_path, "is a folder; give a file name"),  # before sampling, not after
                                ("--cache-dir", tmp_path / "afile", "is a file, not a folder")):
        with pytest.raises(SystemExit):
            cli_main(["eval", "digits", "--npz", str(tmp_path / "missing.npz"), flag, str(path)])
        assert f"{flag} {path} {message}" in capsys.readouterr().err
    latent = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(latent.state_dict(), tmp_path / "latent.pt")
    with pytest.raises(SystemExit):
        cli_main(["eval", "digits", "--ckpt", str(tmp_path / "latent.pt"), "--num-heads", "2", "--cache-dir", str(tmp_path)])
    assert "not a digits model" in capsys.readouterr().err

    images = np.random.default_rng(0).random((5, 64))
    for labels, found in (([20, 21, 22, 23, 24], "int64 (5,), 20..24"), ([-1, 0, 1, 2, 3], "-1..3"), ([0, 1, 2, 3, 10], "0..10"),
                          ([1, 2], "(2,)"), ([0.5] * 5, "float64")):
        write_npz(tmp_path / "bad.npz", images, labels)
        with pytest.raises(SystemExit):
            cli_main(["eval", "digits", "--npz", str(tmp_path / "bad.npz"), "--cache-dir", str(cache_dir)])
        error = capsys.readouterr().err
        assert "arr_1 must hold one digit label in 0..9 per image of arr_0 (5)" in error and found in error, error


def test_a_file_that_is_no_samples_npz_is_named(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("step,loss\n1,0.5\n")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "unlabelled.npz", samples=np.zeros((4, 8, 8, 1), np.uint8))
    write_npz(tmp_path / "single.npz", np.random.default_rng(0).random((1, 64)), [3])
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 1)), arr_1=np.arange(4))
    for name, expected in (("log.csv", "is not an .npz file numpy reads without unpickling"),
                           ("one.npy", "holds one array, not an .npz of samples"),
                           ("unlabelled.npz", "has no arr_0 or arr_1 (arr_0: uint8 NHWC samples, arr_1: the labels "
                                              "each was asked for; found samples)"),
                           ("single.npz", "at least 2 uint8 NHWC images with 1 or 3 channels, as `fusedit sample --npz` "
                                          "writes, got uint8 (1, 8, 8, 1)"),
                           ("floats.npz", "got float64 (4, 8, 8, 1)")):
        with pytest.raises(SystemExit):  # before the classifier is fitted: the cache folder stays empty
            cli_main(["eval", "digits", "--npz", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache")])
        error = capsys.readouterr().err
        assert f"fusedit eval: error: {tmp_path / name}" in error and expected in error, error
    assert not (tmp_path / "cache").exists()


def test_an_unusable_cached_classifier_is_fitted_again(tmp_path, cache_dir, capsys):
    reference = DigitsClassifier.load_or_fit(cache_dir)
    cached = tmp_path / next(cache_dir.glob("digits_classifier_*.npz")).name
    for content, why in ((b"garbage\n", "numpy cannot read it"), (None, "it holds only w0")):
        if content is None:
            np.savez(cached, w0=np.zeros(2))
        else:
            cached.write_bytes(content)
        again = DigitsClassifier.load_or_fit(tmp_path)
        assert f"the cached classifier {cached} is unusable ({why}" in capsys.readouterr().out
        assert np.array_equal(again.weights["w0"], reference.weights["w0"])  # the same fit (fixed seed)
        assert DigitsClassifier.load_or_fit(tmp_path).held_out_accuracy == reference.held_out_accuracy


def test_classifier_input_is_quantized_to_the_real_digits_17_levels():
    # 100 / 255 * 16 = 6.27: the nearest of the 17 levels 0/16 .. 16/16 is 6/16
    x = to_classifier_input(np.full((1, 8, 8, 1), 100, dtype=np.uint8))
    assert x.shape == (1, 64) and np.all(x == 6 / 16)


def gaussian_samples(generator, mean, covariance, n):
    """n rows whose sample mean and (ddof 1) covariance are exactly mean and covariance."""
    z = generator.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(covariance).T + mean


@pytest.mark.parametrize("seed", [1, 2])
def test_frechet_distance_matches_the_closed_form_on_correlated_gaussians(seed):
    import scipy.linalg

    generator = np.random.default_rng(seed)
    means = generator.normal(size=(2, 3)) * 2
    factors = generator.normal(size=(2, 3, 3))
    sigma_a, sigma_b = factors[0] @ factors[0].T + 0.1 * np.eye(3), factors[1] @ factors[1].T + 0.1 * np.eye(3)
    expected = (((means[0] - means[1]) ** 2).sum() + np.trace(sigma_a + sigma_b)
                - 2 * np.trace(scipy.linalg.sqrtm(sigma_a @ sigma_b)).real)
    a = gaussian_samples(generator, means[0], sigma_a, 40)
    b = gaussian_samples(generator, means[1], sigma_b, 60)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("channels", [1, 3])
def test_classifier_input_rounds_every_uint8_value_to_the_nearest_of_17_levels(channels):
    values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(channels, axis=-1)
    expected = np.round(np.arange(256) / 255 * 16).reshape(4, 64) / 16
    assert np.array_equal(to_classifier_input(values), expected)
    as_floats = np.arange(256).reshape(4, 1, 8, 8) / 255 * 2 - 1
    assert np.array_equal(to_classifier_input(as_floats), expected)


def test_per_class_accuracy_is_the_share_of_each_asked_for_class_classified_as_it(cache_dir):
    classifier = DigitsClassifier.load_or_fit(cache_dir)
    x, y = real_digits()
    chosen = np.isin(y, [2, 5])[:300]
    images, truth = x[:300][chosen].reshape(-1, 1, 8, 8) * 2 - 1, y[:300][chosen]
    asked = np.where(truth == 2, 5, 2)  # every sample asked for the other class
    scores = score(classifier, images, asked)
    assert set(scores["per_class_accuracy"]) == {"2", "5"} and scores["count"] == len(asked)
    assert scores["accuracy"] < 0.1 and all(value < 0.1 for value in scores["per_class_accuracy"].values()), scores


def test_real_floor_scores_the_held_out_quarter(cache_dir):
    classifier = DigitsClassifier.load_or_fit(cache_dir)
    floor = real_floor(classifier)
    assert floor["count"] == 450 and floor["accuracy"] == classifier.held_out_accuracy


def test_classifier_input_clamps_floats_and_area_resizes_larger_images():
    generator = np.random.default_rng(3)
    small = generator.random((2, 1, 8, 8)) * 2 - 1
    expected = to_classifier_input(small)
    doubled = small.repeat(2, axis=2).repeat(2, axis=3)  # each pixel a 2x2 block: its area mean is the pixel
    assert np.array_equal(to_classifier_input(doubled), expected)
    assert np.array_equal(to_classifier_input(np.sign(small) * 2), (np.sign(small) > 0).reshape(2, 64).astype(float))


def test_the_frechet_distance_of_a_score_is_over_the_classifier_features(cache_dir):
    classifier = DigitsClassifier.load_or_fit(cache_dir)
    x, y = real_digits()
    images = np.clip(x[:200] + np.random.default_rng(4).normal(scale=0.2, size=(200, 64)), 0, 1).reshape(-1, 1, 8, 8) * 2 - 1
    want = frechet_distance(classifier.features(x), classifier.features(to_classifier_input(images)))
    assert score(classifier, images, y[:200])["frechet_distance"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("flags, scales", [(["--cfg-scale", "2.5"], [2.5, 1.0]), (["--cfg-scale", "1"], [1.0]),
                                           (["--cfg-scale", "2.5", "--no-unguided"], [2.5])])
def test_eval_runs_guided_then_unguided_and_records_its_settings(tmp_path, cache_dir, monkeypatch, flags, scales):
    import json

    import fusedit.train.evaluate as evaluate

    calls = []

    def generate(model, labels, args):  # real digits of the asked-for classes: sampling is not what this checks
        calls.append((args.cfg_scale, list(labels)))
        x, y = real_digits()
        return np.stack([x[np.flatnonzero(y == label)[0]] for label in labels]).reshape(-1, 1, 8, 8) * 2 - 1

    monkeypatch.setattr(evaluate, "generate", generate)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    assert cli_main(["eval", "digits", "--ckpt", str(tmp_path / "digits.pt"), "--num-heads", "2", "--num-per-class", "3",
                     *flags, "--steps", "7", "--sampler", "ddim", "--eta", "0.5", "--seed", "11",
                     "--kernels", "reference", "--cache-dir", str(cache_dir), "--json", str(tmp_path / "m.json")]) == 0
    labels = [digit for digit in range(10) for _ in range(3)]
    assert calls == [(scale, labels) for scale in scales]
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["settings"] == {"ckpt": str(tmp_path / "digits.pt"), "weights": "ema", "cfg_scales": scales,
                                  "sampler": "ddim", "steps": 7, "eta": 0.5, "seed": 11, "clip_denoised": True,
                                  "num_per_class": 3}
    assert list(report["results"]) == ["real held-out"] + [f"cfg {scale:g}" for scale in scales]
    assert all(report["results"][f"cfg {scale:g}"]["count"] == 30 for scale in scales)
    assert report["results"][f"cfg {scales[0]:g}"]["accuracy"] > 0.9


def test_the_classifier_cache_defaults_to_fusedit_cache_then_the_home_folder(tmp_path, monkeypatch):
    import fusedit.train.evaluate as evaluate

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FUSEDIT_CACHE", str(tmp_path / "cache"))
    assert evaluate.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("FUSEDIT_CACHE")
    assert evaluate.default_cache_dir() == tmp_path / "home" / ".cache" / "fusedit"
