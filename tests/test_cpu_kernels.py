"""The few-row CPU matmul: right answers, bit-identical rows whatever the batch, and the MKL fallback."""

from __future__ import annotations

import pytest
import torch

from ppd_core import cpu_kernels
from ppd_core.cpu_kernels import (
    AmxBf16Linear,
    Avx512Bf16Linear,
    SmallBatchLinear,
    amx_available,
    avx512_bf16_available,
    few_rows_matmul,
    load_kernel,
    use_bf16_linears,
)

needs_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                  reason="the kernel needs AVX2 + FMA")


needs_amx = pytest.mark.skipif(not amx_available(), reason="no AMX bf16 tiles on this CPU (Intel Sapphire Rapids on)")
needs_avx512_bf16 = pytest.mark.skipif(not avx512_bf16_available(),
                                       reason="no AVX512_BF16 on this CPU (AMD Zen 4 on, Intel Cooper Lake)")
BF16_KERNELS = [pytest.param("amx", marks=needs_amx), pytest.param("avx512", marks=needs_avx512_bf16)]


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


def _tree_case(rows: int, past: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k_room = torch.randn(1, 3, past + rows + 40, 64, generator=gen)  # a cache with spare room, as the engine's
    v_room = torch.randn(1, 3, past + rows + 40, 64, generator=gen)
    k, v = k_room[:, :, :past + rows], v_room[:, :, :past + rows]
    q = torch.randn(1, rows, 9, 64, generator=gen).transpose(1, 2)  # the layout the attention layer hands over
    allow = torch.tril(torch.rand(rows, rows, generator=gen) > 0.5) | torch.eye(rows, dtype=torch.bool)
    allow[:, 0] = True  # every node sees the root
    mask = torch.zeros(1, 1, rows, past + rows)
    mask[0, 0, :, past:].masked_fill_(~allow, torch.finfo(torch.float32).min)
    return q, k, v, allow, mask


@needs_kernel
@pytest.mark.parametrize("rows, past", [(1, 0), (1, 13), (7, 300), (17, 5), (33, 129)])
def test_tree_attention_matches_sdpa_and_each_row_equals_its_plain_step(rows: int, past: int):
    q, k, v, allow, mask = _tree_case(rows, past, rows * 31 + past)
    got = load_kernel().tree_attention(q, k, v, mask, 0.125)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125,
                                                            enable_gqa=True).transpose(1, 2)
    assert got.shape == (1, rows, 9, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for t in range(rows):  # the same token decoded alone sees the prefix and its own path, contiguous, no mask
        cols = list(range(past)) + [past + j for j in range(rows) if allow[t, j]]
        alone = load_kernel().tree_attention(q[:, :, t:t + 1], k[:, :, cols].contiguous(), v[:, :, cols].contiguous(),
                                             torch.empty(0), 0.125)
        assert torch.equal(alone[0, 0], got[0, t])
    assert torch.equal(load_kernel().tree_attention(q, k, v, mask == 0, 0.125), got)  # a boolean mask alike


@needs_kernel
def test_tree_attention_declines_masks_it_does_not_understand():
    q, k, v, _, mask = _tree_case(5, 20, 0)
    mask[0, 0, 1, 3] = -2.0  # a bias (ALiBi-like), not allow / block: the caller must use SDPA
    assert load_kernel().tree_attention(q, k, v, mask, 0.125) is None


@needs_amx
@pytest.mark.parametrize("n_out, n_in", [(576, 576), (192, 1536), (16, 32), (49152 // 8, 576)])
def test_amx_matmul_is_a_bf16_matmul_with_fp32_accumulation(n_out: int, n_in: int):
    gen = torch.Generator().manual_seed(n_out + n_in)
    w = torch.randn(n_out, n_in, generator=gen)
    packed = load_kernel().amx_pack(w)
    for rows in (1, 2, 7, 16, 17, 33, 64):
        x = torch.randn(rows, n_in, generator=gen)
        got = load_kernel().amx_linear(x, packed)
        want = x.bfloat16().double() @ w.bfloat16().double().T  # exact products of the bf16 inputs
        assert got.shape == (rows, n_out) and got.dtype == torch.float32 and got.is_contiguous()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * n_in ** 0.5)


@needs_amx
def test_amx_row_is_bit_identical_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16 * 37, 1536, generator=gen)  # 37 blocks: the 4-block loop and the 1-block tail both run
    packed = load_kernel().amx_pack(w)
    x = torch.randn(40, 1536, generator=gen)
    alone = torch.cat([load_kernel().amx_linear(x[i:i + 1].contiguous(), packed) for i in range(40)])
    for rows in (2, 5, 13, 16, 17, 40):
        assert torch.equal(load_kernel().amx_linear(x[:rows].contiguous(), packed), alone[:rows])


@pytest.mark.parametrize("isa", BF16_KERNELS)
def test_bf16_linears_round_tied_weights_once_and_prefill_agrees_with_decoding(isa: str):
    gen = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(64, 32)
    head = torch.nn.Linear(32, 64, bias=False)
    head.weight = emb.weight  # tied, as in the default model
    model = torch.nn.Sequential(emb, head)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(64, 32, generator=gen))
    cls = AmxBf16Linear if isa == "amx" else Avx512Bf16Linear
    assert use_bf16_linears(model, isa) == 1 and isinstance(head, cls)
    assert head.weight is emb.weight and torch.equal(emb.weight, emb.weight.bfloat16().float())
    assert "1.packed" not in model.state_dict()  # derived from the weights, never saved
    x = torch.randn(80, 32, generator=gen)
    with torch.inference_mode():
        decode = head(x[:5])  # our kernel
        prefill = head(x)  # more rows than the kernel takes: F.linear on the bf16-rounded inputs
    torch.testing.assert_close(decode, prefill[:5], rtol=1e-5, atol=1e-5)
    assert cpu_kernels.precision(model) == f"bfloat16-{isa}"


@needs_avx512_bf16
@pytest.mark.parametrize("n_out, n_in", [(576, 576), (193, 1536), (1, 32), (49152 // 8, 576)])
def test_avx512_bf16_matmul_is_a_bf16_matmul_with_fp32_accumulation(n_out: int, n_in: int):
    gen = torch.Generator().manual_seed(n_out + n_in)
    w = torch.randn(n_out, n_in, generator=gen)
    for rows in (1, 2, 5, 6, 7, 13, 64):
        x = torch.randn(rows, n_in, generator=gen)
        got = load_kernel().bf16_linear(x, w.bfloat16())
        want = x.bfloat16().double() @ w.bfloat16().double().T  # exact products of the bf16 inputs
        assert got.shape == (rows, n_out) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * n_in ** 0.5)


@needs_avx512_bf16
@pytest.mark.parametrize("kind, n_out, n_in",
                         [("q4_1", 577, 576), ("q4_1", 35, 608), ("q8_0", 194, 1536), (None, 1537, 576),
                          ("q8_0", 4099, 64)])  # wide like the LM head: outputs staged in tiles
def test_avx512_bf16_row_is_bit_identical_alone_or_in_any_batch_and_packed_blocks_are_the_bf16_weights(
        kind: str | None, n_out: int, n_in: int):
    from ppd_core.gguf_blocks import find_blocks
    from tests.test_gguf_blocks import gguf_weights

    gen = torch.Generator().manual_seed(n_out)
    w = gguf_weights(kind, n_out, n_in, seed=n_out) if kind else torch.randn(n_out, n_in, generator=gen)
    x = torch.randn(23, n_in, generator=gen)
    kernel = load_kernel()
    dense = lambda rows: kernel.bf16_linear(rows.contiguous(), w.bfloat16())  # noqa: E731
    alone = torch.cat([dense(x[i:i + 1]) for i in range(23)])
    for rows in (2, 4, 5, 7, 12, 23):  # N not a multiple of the 4-row strips; 6-row x blocks and their tails
        assert torch.equal(dense(x[:rows]), alone[:rows])
    if kind:  # unpacked on the fly and rounded (608: an odd number of blocks): the very bf16 weights and sums
        _, q, scales = find_blocks(w)
        for rows in (1, 5, 7, 12, 23):
            assert torch.equal(kernel.bf16_quant_linear(x[:rows].contiguous(), q, scales), alone[:rows])


def test_bf16_kernel_is_chosen_only_where_it_stays_lossless(monkeypatch):
    from ppd_core import models
    from ppd_core.models import cpu_bf16_kernel

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    here = "amx" if amx_available() else "avx512" if avx512_bf16_available() else None
    assert cpu_bf16_kernel("auto", cpu, None) == cpu_bf16_kernel("bfloat16", cpu, None) == here
    assert cpu_bf16_kernel("float32", cpu, None) is None  # the full-precision model on request
    assert cpu_bf16_kernel("auto", cpu, "8bit") is None  # bitsandbytes brings its own matmuls
    assert cpu_bf16_kernel("auto", cuda, None) is None
    # faked CPUs: AMX wins over AVX512_BF16, neither means float32
    for amx, avx512, want in ((True, True, "amx"), (False, True, "avx512"), (False, False, None)):
        monkeypatch.setattr(models, "amx_available", lambda v=amx: v)
        monkeypatch.setattr(models, "avx512_bf16_available", lambda v=avx512: v)
        assert cpu_bf16_kernel("auto", cpu, None) == want


@needs_kernel
def test_kernel_rms_norm_is_the_stock_norm_per_row_and_keeps_gradients():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ppd_core.cpu_kernels import KernelRMSNorm, use_kernel_norms

    stock = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(576, generator=torch.Generator().manual_seed(1)))
    model = torch.nn.Sequential(LlamaRMSNorm(576, eps=1e-5), torch.nn.Linear(576, 8))
    model[0].load_state_dict(stock.state_dict())
    assert use_kernel_norms(model) == 1 and isinstance(model[0], KernelRMSNorm)
    assert set(model.state_dict()) == {"0.weight", "1.weight", "1.bias"}  # module tree and weights unchanged
    x = torch.randn(1, 23, 576, generator=torch.Generator().manual_seed(2)) * 3
    with torch.inference_mode():
        y = model[0](x)
        torch.testing.assert_close(y, stock(x), rtol=1e-6, atol=1e-6)  # the same arithmetic, last bits aside
        for rows in (1, 5, 23):  # a row is normalised alone as inside any batch (plain step vs tree)
            assert torch.equal(model[0](x[:, :rows]), y[:, :rows])
    xg = x.clone().requires_grad_(True)  # training: the stock forward, with its gradient
    model[0](xg).sum().backward()
    want = x.clone().requires_grad_(True)
    stock(want).sum().backward()
    torch.testing.assert_close(xg.grad, want.grad)
