"""Shared test setup. TRITON_INTERPRET must be set before triton is imported, so that the
triton kernels run on CPU through Triton's interpreter when no CUDA device is present.

JAX runs on the CPU in the suite, also where it has a GPU: its tests check the JAX twin's
math against the PyTorch model at fp32 tolerances, which JAX's GPU default of TF32 matmuls
would miss, and on a GPU XLA would take 75% of its memory from the torch tests beside it.
(Set JAX_PLATFORMS yourself to override; `fusedit bench` times JAX on the GPU.)
"""
import os
import random
import sys
import zlib

import numpy
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "jax" in sys.modules:  # a plugin imported it first: its config has read the environment already
    sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])

import pytest  # noqa: E402

try:
    from hypothesis import settings as hypothesis_settings  # noqa: E402
except ImportError:  # the sweeps that need it skip on their own
    hypothesis_settings = None

try:  # a global, for the probe kernel below: Triton 3.0's interpreter looks for it there
    import triton.language as tl  # noqa: E402
except ImportError:
    tl = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device():
    return DEVICE


# Every test's draws are a function of the code and of --test-seed alone, never of which tests
# ran before it: a test that takes from the global RNGs gets its own seed (from its id), and the
# hypothesis sweeps pick their examples deterministically (the "ci" profile, the default). A
# bound that only some draws meet then fails on every run or on none. To look for one, vary
# --test-seed, and run the sweeps with --hypothesis-profile=explore (random examples; add
# --hypothesis-seed=N to replay a run).
if hypothesis_settings is not None:
    hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
    hypothesis_settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--test-seed", type=int, default=0,
                     help="offset of the per-test seeds of torch's, numpy's and random's global RNGs "
                          "(default 0; each test's seed also depends on its id)")


@pytest.fixture(autouse=True)
def seeded_global_rngs(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + request.config.getoption("--test-seed")) % 2**32
    torch.manual_seed(seed)
    numpy.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="session", autouse=True)
def one_config_per_autotuned_kernel_on_gpu():
    """On CUDA every autotuned kernel keeps only its last config, the small one that fits every
    head dim and dtype: autotuning them all at each shape, dtype and head dim of the suite
    would compile and time well over a thousand kernels. The every-config tests
    (test_every_cuda_config) set the configs themselves. The interpreter has one config."""
    if not ON_GPU:
        yield
        return
    from fusedit.kernels.testing import one_config_per_autotuned_kernel

    with one_config_per_autotuned_kernel():
        yield


def _interpreter_problem():
    """Older Triton interpreters break on newer numpy in loops with a runtime bound: 3.6's turns
    the bound into a one-element array and calls int() on it, which numpy 2.4 refuses; 3.0's
    runs no iteration at all under numpy 2 (seen here), so every kernel computes garbage.
    Probe it once, so the suite stops with what to do."""
    if ON_GPU or tl is None:
        return None  # without triton, the triton tests say so themselves
    import numpy
    import triton

    @triton.jit
    def count_kernel(out_pointer, steps):
        total = 0
        for _ in range(0, steps):
            total += 1
        tl.store(out_pointer, total)

    out = torch.zeros(1, dtype=torch.int32)
    where = (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}) "
             f"with numpy {numpy.__version__}")
    advice = "Triton 3.9's interpreter works with numpy 2.4; 3.6's needs numpy<2.4, 3.0's numpy<2"
    try:
        count_kernel[(1,)](out, 3)
    except Exception as error:  # noqa: BLE001 - any failure here is reported, with the versions
        return f"{where} cannot run a loop with a runtime bound: {type(error).__name__}: {error}. {advice}"
    return None if int(out) == 3 else f"{where} ran {int(out)} steps of a 3-step loop. {advice}"


# The kernels first, then the model, training and benchmark, and the JAX modules (which run
# on the CPU) last: a run cut short by a time limit (gpu-check.sh gives the CUDA suite 540 s)
# or stopped at a first failure (-x) has then checked what most needs a GPU.
FOLDER_ORDER = ("kernels", "dit", "train", "bench")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        parts = item.path.relative_to(config.rootpath).parts
        folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
        jax_only = "jax" in item.path.name or "pallas" in item.path.name
        return jax_only, FOLDER_ORDER.index(folder) if folder in FOLDER_ORDER else len(FOLDER_ORDER)

    items.sort(key=rank)  # stable: each module's tests stay together and in order


def pytest_sessionstart(session):
    if problem := _interpreter_problem():
        pytest.exit(problem, returncode=3)
