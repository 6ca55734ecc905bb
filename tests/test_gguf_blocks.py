"""Weights that are exact GGUF blocks are found, packed and multiplied bit for bit like their float32 copy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ppd_core.cpu_kernels import SmallBatchLinear, load_kernel, packed_weights, use_small_batch_linears
from ppd_core.gguf_blocks import dequantise, find_blocks

needs_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                  reason="the kernel needs AVX2 + FMA")

KINDS = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def gguf_weights(kind: str, n_out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    """What the model converter produces: float weights quantised by gguf-py, dequantised to float32 again."""
    w = np.random.default_rng(seed).normal(0, 0.05, (n_out, n_in)).astype(np.float32)
    w[0, :32] = 0.25  # a constant block: d = 0
    blocks = gguf.quants.quantize(w, KINDS[kind])
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, KINDS[kind]), dtype=np.float32))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_blocks_are_found_and_rebuild_every_weight_exactly(kind: str):
    w = gguf_weights(kind, 96, 576)
    found = find_blocks(w)
    assert found is not None and found[0] == kind
    assert torch.equal(dequantise(*found), w)
    # Q4_1 blocks are 4 bits a weight (+ d, m per 32), Q8_0 8 bits (+ d)
    assert found[1].element_size() * found[1].numel() == w.numel() // (2 if kind == "q4_1" else 1)


def test_weights_that_are_not_exact_blocks_stay_float():
    w = gguf_weights("q4_1", 64, 576)
    assert find_blocks(torch.randn(64, 576)) is None  # ordinary float weights
    assert find_blocks(w.to(torch.bfloat16).float() + 1e-3) is None
    nudged = w.clone()
    nudged[5, 100] = torch.nextafter(nudged[5, 100], torch.tensor(1.0))  # one weight one ulp off
    assert find_blocks(nudged) is None
    assert find_blocks(w[:, :100].contiguous()) is None  # K not a multiple of the block


@needs_kernel
@pytest.mark.parametrize("kind, n_out, n_in", [("q4_1", 576, 576), ("q4_1", 193, 1536), ("q8_0", 577, 576),
                                                ("q4_1", 2, 64)])
def test_packed_matmul_is_the_float_kernel_bit_for_bit(kind: str, n_out: int, n_in: int):
    w = gguf_weights(kind, n_out, n_in, seed=n_out)
    _, q, scales = find_blocks(w)
    gen = torch.Generator().manual_seed(n_in)
    x = torch.randn(17, n_in, generator=gen)
    for rows in (1, 2, 3, 4, 5, 8, 13, 17):
        got = load_kernel().quant_linear(x[:rows].contiguous(), q, scales)
        assert torch.equal(got, load_kernel().few_rows_linear(x[:rows].contiguous(), w))
        # a row alone (plain decoding) is the same row inside a tree
        assert torch.equal(got[rows - 1:], load_kernel().quant_linear(x[rows - 1:rows].contiguous(), q, scales))
    torch.testing.assert_close(got, x @ w.T, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_small_batch_linears_pack_what_they_can_and_prefill_still_uses_the_floats():
    model = torch.nn.Sequential(torch.nn.Linear(576, 64, bias=False), torch.nn.Linear(64, 576, bias=True),
                                torch.nn.Linear(576, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(gguf_weights("q4_1", 64, 576))
        model[1].weight.copy_(gguf_weights("q8_0", 576, 64))  # model[2] keeps random floats
    x = torch.randn(3, 576)
    want = x @ model[0].weight.T
    assert use_small_batch_linears(model) == 3
    assert packed_weights(model) == {"q4_1": 1, "q8_0": 1}
    assert all(isinstance(m, SmallBatchLinear) for m in model)
    assert model[2].packed_blocks() is None
    with torch.no_grad():
        assert torch.equal(model[0](x), load_kernel().few_rows_linear(x, model[0].weight))
        torch.testing.assert_close(model[0](x), want, rtol=1e-4, atol=1e-4)
        long = torch.randn(100, 576)  # prefill: F.linear on the float weights
        assert torch.equal(model[0](long), torch.nn.functional.linear(long, model[0].weight))
        assert "qweight" not in model.state_dict() and "0.qweight" not in model.state_dict()
