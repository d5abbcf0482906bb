"""fusedit.kernels.testing: the poisoned buffers every kernel test runs under."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fusedit.kernels.testing import GUARD_ELEMENTS, holds_data, poisoned_allocations


def test_buffers_are_nan_and_a_write_past_the_end_is_caught():
    with poisoned_allocations():
        buffer = torch.empty(3, 5)
        like = torch.empty_like(buffer.t())
    assert buffer.isnan().all() and like.isnan().all() and like.stride() == buffer.t().stride()
    with pytest.raises(AssertionError, match=r"wrote past the end of 1 of the 1 buffers allocated here: \(4,\)"):
        with poisoned_allocations():
            buffer = torch.empty(4)
            torch.as_strided(buffer, (4 + 4 + GUARD_ELEMENTS,), (1,))[-1] = 0.0


def test_integer_buffers_are_left_alone():
    with poisoned_allocations():
        assert torch.empty(3, dtype=torch.int64).dtype == torch.int64


def test_a_compilers_stand_ins_hold_no_data_and_are_left_alone():
    assert holds_data(torch.zeros(2))
    assert not holds_data(torch.zeros(2, device="meta"))
    # torch.compile runs an op's fake kernel outside the traced frame, where
    # torch.compiler.is_compiling() can be False (torch 2.11): the tensor itself must tell
    with poisoned_allocations():
        with FakeTensorMode():
            fake = torch.empty(4, 3)
            assert not holds_data(fake)
        meta = torch.empty(4, device="meta")
    assert fake.shape == (4, 3) and meta.shape == (4,)
