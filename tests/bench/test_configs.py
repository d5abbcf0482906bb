"""fusedit.bench.configs on its own: each argument check's boundaries, the custom-model
dicts (checked, built, rebuilt from a DiT, given another block), the run grid, the compile
options and the Triton interpreter switch. The benchmark tests reach these only through
whole runs, which leave many of the boundaries untried."""
import os
import sys
import types

import pytest
import torch

from fusedit.bench import configs
from fusedit.bench.kernels import KernelSettings
from fusedit.bench.models import Settings

# Every size off DiT's default, so a rebuilt model that dropped or altered one differs.
ODD_SIZES = {"name": "sizes", "patch_size": 4, "depth": 3, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2.0,
             "class_dropout_prob": 0.0, "num_classes": 10, "in_channels": 3, "learn_sigma": False, "block": "adaln"}
TINY = {"name": "tiny", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}


def test_positive_int_refuses_zero_negatives_and_bools():
    assert configs.positive_int("n", 1) == 1
    for bad in (0, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            configs.positive_int("n", bad)


def test_non_negative_int_takes_zero_but_not_bools():
    assert configs.non_negative_int("n", 0) == 0
    for bad in (-1, False, True, 0.0):
        with pytest.raises(ValueError, match="n must be a non-negative integer"):
            configs.non_negative_int("n", bad)


def test_seed_is_a_32_bit_unsigned_integer():
    # JAX keys take 32-bit seeds: the last one is allowed, one more is not.
    assert configs.check_seed(0) == 0
    assert configs.check_seed(2**32 - 1) == 2**32 - 1
    for bad in (2**32, -1, True, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer in 0..4294967295"):
            configs.check_seed(bad)


def test_cuda_is_refused_only_when_torch_has_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        configs.check_device("cuda")
    assert configs.default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert configs.check_device("cuda:1") == "cuda:1"
    assert configs.default_device() == "cuda"


def test_devices_other_than_cuda_and_cpu_are_refused():
    assert configs.check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'meta' is not supported"):
        configs.check_device("meta")


def test_unknown_dtype_lists_the_known_ones():
    assert configs.check_dtype("bf16") == "bf16"
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of fp32, bf16, fp16"):
        configs.check_dtype("fp8")


def test_choices_drop_repeats_in_order_and_refuse_none_or_unknown():
    assert configs.check_choices("backend", ["b", "a", "b"], ("a", "b")) == ["b", "a"]
    assert configs.check_choices("backend", "a", ("a", "b")) == ["a"]
    with pytest.raises(ValueError, match="no backend given; choose from a, b"):
        configs.check_choices("backend", [], ("a", "b"))
    with pytest.raises(ValueError, match="unknown backend 'c'"):
        configs.check_choices("backend", ["a", "c"], ("a", "b"))


@pytest.mark.parametrize("settings_class", [Settings, KernelSettings])
def test_options_are_settings_fields_but_not_the_device(settings_class):
    # The device is its own argument of a run, checked by check_device, never an option.
    configs.check_options({"warmup": 1, "repeats": 2}, settings_class)
    with pytest.raises(ValueError, match="unknown option"):
        configs.check_options({"device": "cpu"}, settings_class)
    with pytest.raises(ValueError, match=r"unknown option\(s\) bogus, nope; choose from"):
        configs.check_options({"nope": 1, "bogus": 2, "warmup": 1}, settings_class)


def test_a_custom_model_needs_a_name_and_only_known_keys():
    assert configs.check_model(TINY, 64) is TINY
    nameless = {key: value for key, value in TINY.items() if key != "name"}
    for bad in (nameless, {**TINY, "width": 64}):
        with pytest.raises(ValueError, match="a custom model is a dict with a 'name'"):
            configs.check_model(bad, 64)
    with pytest.raises(ValueError, match="a model is a config name or a dict of DiT sizes, got list"):
        configs.check_model(["DiT-S/2"], 64)


def test_a_config_entry_cannot_also_resize_it():
    assert configs.check_model({"name": "xl", "config": "DiT-XL/2", "block": "adaln"}, 256)
    with pytest.raises(ValueError, match="'xl': a 'config' entry keeps that config's sizes, so it cannot also "
                                         "set depth, num_heads"):
        configs.check_model({"name": "xl", "config": "DiT-XL/2", "num_heads": 8, "depth": 2}, 256)


def test_image_size_is_checked_against_the_models_patch():
    # A 16-pixel image is a 2x2 latent: tiled by patch 2 but not by 4 (a config's or a dict's
    # own), nor by 8; without a patch_size a dict has DiT's default of 2.
    configs.check_model({**TINY, "patch_size": 2}, 16)
    configs.check_model({key: value for key, value in TINY.items() if key != "patch_size"}, 16)
    for model in ({**TINY, "patch_size": 4}, "DiT-S/4", {"name": "s8", "config": "DiT-S/8"}):
        with pytest.raises(ValueError, match="not divisible by .*patch size"):
            configs.check_model(model, 16)
    with pytest.raises(ValueError, match="gives 1x1 latents, not divisible by tiny's patch size 2"):
        configs.check_model({key: value for key, value in TINY.items() if key != "patch_size"}, 8)


def test_run_grid_is_every_combination_with_none_taking_the_default():
    defaults = {"models": ["DiT-S/2"], "image_size": [256], "dtype": ["fp32"], "batch_size": [4]}
    assert configs.run_grid(None, None, None, None, defaults) == [("DiT-S/2", 256, "fp32", 4)]
    assert configs.run_grid(TINY, [32, 64], ["bf16", "fp16"], [1, 2], defaults) == [
        (TINY, size, dtype, batch) for size in (32, 64) for dtype in ("bf16", "fp16") for batch in (1, 2)]


@pytest.mark.parametrize("argument", range(4))
def test_run_grid_refuses_an_empty_list_instead_of_taking_the_default(argument):
    # An empty list is a mistake (a filter that matched nothing), not a request for the default.
    defaults = {"models": ["DiT-S/2"], "image_size": [256], "dtype": ["fp32"], "batch_size": [4]}
    arguments = [None] * 4
    arguments[argument] = []
    with pytest.raises(ValueError, match="an empty list selects nothing to run"):
        configs.run_grid(*arguments, defaults)


def test_run_grid_checks_every_value():
    defaults = {"models": [TINY], "image_size": [64], "dtype": ["fp32"], "batch_size": [1]}
    with pytest.raises(ValueError, match="batch size must be a positive integer, got 0"):
        configs.run_grid(None, None, None, [2, 0], defaults)
    with pytest.raises(ValueError, match="unknown dtype"):
        configs.run_grid(None, None, ["fp32", "int8"], None, defaults)
    with pytest.raises(ValueError, match="image size 60 is not divisible by 8"):
        configs.run_grid(None, [64, 60], None, None, defaults)


def test_build_model_takes_pixels_to_latents():
    dit = configs.build_model(TINY, 64, "cpu")
    assert dit.input_size == 64 // 8 and dit.x_embedder.proj.weight.device.type == "cpu"


def test_model_sizes_rebuild_the_same_dit():
    dit = configs.build_model(ODD_SIZES, 32, "cpu")
    assert configs.model_sizes(dit) == ODD_SIZES


def test_with_block_renames_the_model_and_keeps_its_sizes():
    assert configs.with_block("DiT-S/2", "cross_attn") == {"name": "DiT-S/2 cross_attn", "config": "DiT-S/2",
                                                           "block": "cross_attn"}
    assert configs.with_block(TINY, "adaln") == {**TINY, "name": "tiny adaln", "block": "adaln"}
    with pytest.raises(ValueError, match="unknown model config 'DiT-Q/2'"):
        configs.with_block("DiT-Q/2", "adaln")


def test_compile_mode_goes_to_inductor_only():
    inductor = types.SimpleNamespace(compile_backend="inductor", compile_mode="max-autotune")
    eager = types.SimpleNamespace(compile_backend="eager", compile_mode="max-autotune")
    assert configs.compile_options(inductor) == {"backend": "inductor", "dynamic": False, "mode": "max-autotune"}
    assert configs.compile_options(eager) == {"backend": "eager", "dynamic": False}
    assert configs.compile_label(inductor) == "max-autotune"
    assert configs.compile_label(eager) == "eager backend"


def test_note_error_keeps_the_first_line_cut_to_300_characters():
    record = {"notes": ["earlier"]}
    configs.note_error(record, "forward", RuntimeError("  out of memory\ntraceback detail  "))
    configs.note_error(record, "train", ValueError(""))
    configs.note_error(record, "sample", RuntimeError("x" * 400))
    assert record["notes"][:3] == ["earlier", "forward: RuntimeError: out of memory", "train: ValueError: "]
    assert record["notes"][3] == ("sample: RuntimeError: " + "x" * 400)[:300]


@pytest.fixture
def no_triton(monkeypatch):
    """As if neither triton nor fusedit's triton kernels were imported yet."""
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.delitem(sys.modules, "fusedit.kernels.triton", raising=False)
    return monkeypatch


@pytest.mark.parametrize("unset", [None, "", "0"])
def test_interpreter_is_switched_on_before_triton_is_imported(no_triton, unset):
    if unset is None:
        # setenv first: where the variable is unset (a GPU machine), delenv alone records
        # nothing to undo, and the "1" set below would outlive this test
        no_triton.setenv("TRITON_INTERPRET", "0")
        no_triton.delenv("TRITON_INTERPRET")
    else:
        no_triton.setenv("TRITON_INTERPRET", unset)
    assert configs.enable_triton_interpreter_on_cpu() is None
    assert os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("unset", ["", "0"])
def test_interpreter_off_with_triton_imported_is_too_late(no_triton, unset):
    # An empty TRITON_INTERPRET is off to Triton too, so it counts as unset.
    no_triton.setenv("TRITON_INTERPRET", unset)
    no_triton.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert "must be on before triton is imported" in configs.enable_triton_interpreter_on_cpu()
    assert os.environ["TRITON_INTERPRET"] == unset


@pytest.mark.parametrize("interpret", [False, True])
def test_kernels_imported_outside_the_interpreter_are_too_late(no_triton, interpret):
    # TRITON_INTERPRET set now does not help kernels that fixed their mode when imported.
    no_triton.setenv("TRITON_INTERPRET", "1")
    no_triton.setitem(sys.modules, "fusedit.kernels.triton", types.ModuleType("fusedit.kernels.triton"))
    common = types.ModuleType("fusedit.kernels.triton._common")
    common.INTERPRET = interpret
    no_triton.setitem(sys.modules, "fusedit.kernels.triton._common", common)
    late = configs.enable_triton_interpreter_on_cpu()
    assert (late is None) == interpret
