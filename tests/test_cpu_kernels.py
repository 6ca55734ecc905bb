"""The few-row CPU matmul: right answers, bit-identical rows whatever the batch, and the MKL fallback."""

from __future__ import annotations

import pytest
import torch

from ppd_core import cpu_kernels
from ppd_core.cpu_kernels import SmallBatchLinear, few_rows_matmul, load_kernel

needs_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                  reason="the kernel needs AVX2 + FMA")


@needs_kernel
def test_kernel_builds_here():
    # CI machines have AVX2, gcc and the Python headers: a missing kernel there is a failure, not a skip
    assert load_kernel() is not None


@needs_kernel
@pytest.mark.parametrize("n_out, n_in", [(576, 576), (193, 1536), (7, 64), (1, 8), (49152 // 8, 576)])
def test_kernel_matches_float64(n_out: int, n_in: int):
    gen = torch.Generator().manual_seed(n_out * 7 + n_in)
    w = torch.randn(n_out, n_in, generator=gen)
    for rows in (1, 2, 3, 4, 5, 9, 16, 17, 64):
        x = torch.randn(rows, n_in, generator=gen)
        got = load_kernel().few_rows_linear(x, w)
        want = (x.double() @ w.double().T)
        assert got.shape == (rows, n_out) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4 * n_in ** 0.5)


@needs_kernel
def test_a_row_is_bit_identical_alone_or_in_any_batch():
    """Plain decoding multiplies one row, a PPD tree many: the same row must give the same bits."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536 + 1, 576, generator=gen)  # N not a multiple of the 3- or 4-row weight blocks
    x = torch.randn(23, 576, generator=gen)
    alone = torch.cat([load_kernel().few_rows_linear(x[i:i + 1].contiguous(), w) for i in range(23)])
    for rows in (2, 3, 4, 7, 8, 13, 23):
        assert torch.equal(load_kernel().few_rows_linear(x[:rows], w), alone[:rows])


def test_mkl_fallback_and_linear_agree_with_f_linear(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen))
    x = torch.randn(2, 3, 64, generator=gen)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    for kernel_on in (True, False):
        if not kernel_on:
            monkeypatch.setenv("PPD_CPU_KERNEL", "0")
            cpu_kernels.load_kernel.cache_clear()
        fast = SmallBatchLinear(64, 48)
        fast.load_state_dict(lin.state_dict())
        assert torch.allclose(fast(x), want, atol=1e-5)
        assert torch.allclose(few_rows_matmul(lin.weight, x[0, :1]), want[0, :1] - lin.bias, atol=1e-5)
    assert load_kernel() is None
    cpu_kernels.load_kernel.cache_clear()  # later tests get the kernel again


def test_small_batch_linear_keeps_gradients_for_training():
    """The kernel has no backward: a few rows that need a gradient (prompt-token training on a short reply)
    must go through F.linear. Before this, a step whose rows all fit the kernel lost its gradient."""
    lin = torch.nn.Linear(64, 32)
    lin.__class__ = SmallBatchLinear
    lin.requires_grad_(False)  # the frozen model
    x = torch.randn(5, 64, requires_grad=True)
    y = lin(x)
    assert y.grad_fn is not None
    (y ** 2).sum().backward()
    want_x = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(want_x, lin.weight, lin.bias) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, want_x.grad)
    with torch.inference_mode():
        assert lin(x.detach()).grad_fn is None  # decoding still takes the kernel path
