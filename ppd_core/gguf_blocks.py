"""Find GGUF quantisation blocks inside float32 weights, exactly, and pack them for the CPU kernel.

The default model ships as a Q4_1 GGUF (token embedding / LM head in Q8_0) and is dequantised once to
float32. Its weights are therefore exact block values: w = d * q + m (Q4_1, q in 0..15) or w = d * q (Q8_0,
q in -127..127), with d and m float16 per block of 32. Recovering (q, d, m) from the floats and checking that
they rebuild every weight bit for bit lets the decoding step read 4 or 8 bits per weight instead of 32,
with the very same float32 weights: the kernel unpacks them with the same arithmetic, so every output is
bit-identical to the float32 kernel's. A matrix whose weights are not exact blocks (a model that came as
float16 or safetensors, a fine-tuned copy) is simply left to the float32 kernel.
"""

from __future__ import annotations

import torch

BLOCK = 32


def _blocks(w: torch.Tensor) -> torch.Tensor | None:
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or not w.isfinite().all():
        return None
    return w.detach().reshape(w.shape[0], -1, BLOCK)


def _is_fp16(v: torch.Tensor) -> bool:
    return bool((v.half().float() == v).all())


def find_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(nibbles [N, K/2] uint8, scales [N, K/32, 2] float32 (d, m)) if w is exact Q4_1 blocks, else None.

    Per 16 weights 8 bytes: byte i holds weight i in its low nibble and weight i + 8 in its high one (what
    the kernel's unpacking wants)."""
    b = _blocks(w)
    if b is None:
        return None
    m = b.amin(-1)
    if not _is_fp16(m):
        return None
    # the largest weight has q = 15 (or every q is 0): d is the fp16 nearest (max - m) / 15
    d = ((b.amax(-1).double() - m.double()) / 15).half().float()
    q = torch.round((b - m[..., None]) / torch.where(d > 0, d, 1.0)[..., None]).clamp(0, 15)
    if not torch.equal(d[..., None] * q + m[..., None], b):  # product exact, one rounding: as the kernel's FMA
        return None
    pairs = q.to(torch.uint8).reshape(w.shape[0], -1, 2, 8)
    nibbles = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return nibbles.reshape(w.shape[0], -1).contiguous(), torch.stack([d, m], dim=-1).contiguous()


def find_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 weights [N, K], scales [N, K/32] float32) if w is exact Q8_0 blocks, else None."""
    b = _blocks(w)
    if b is None:
        return None
    # the weight of largest magnitude has |q| = 127: d = amax / 127, itself an fp16
    d = (b.abs().amax(-1).double() / 127).float()
    if not _is_fp16(d):
        return None
    q = torch.round(b / torch.where(d > 0, d, 1.0)[..., None]).clamp(-127, 127)
    if not torch.equal(d[..., None] * q, b):
        return None
    return q.to(torch.int8).reshape(w.shape).contiguous(), d.contiguous()


def find_blocks(w: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """("q4_1" | "q8_0", packed weights, scales) for the kernel, or None: keep the float32 weights."""
    for kind, find in (("q4_1", find_q4_1), ("q8_0", find_q8_0)):
        if (found := find(w)) is not None:
            return kind, *found
    return None


def dequantise(kind: str, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weights the packed blocks stand for (what the kernel computes on the fly)."""
    n = q.shape[0]
    if kind == "q4_1":
        halves = q.reshape(n, -1, 1, 8)
        qf = torch.cat([halves & 15, halves >> 4], dim=2).reshape(n, -1, BLOCK).float()
        return (scales[..., 0:1] * qf + scales[..., 1:2]).reshape(n, -1)
    return (scales[..., None] * q.reshape(n, -1, BLOCK).float()).reshape(n, -1)
