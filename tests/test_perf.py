"""libs/perf.py: the TF32 switch and the torch.compile switch the trainer applies."""
import torch

from libs import perf


def test_configure_tf32_sets_and_returns_previous():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        perf.configure_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert perf.configure_tf32(False) is True
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        perf.configure_tf32(before)


def test_maybe_compile_disabled_is_identity():
    m = torch.nn.Linear(2, 2)
    assert perf.maybe_compile(m, False) is m
