"""Few-row float32 matmuls on CPU: the kernel a decoding step spends most of its time in.

A decoding step multiplies every weight matrix by 1 row (plain decoding) or a few rows (a PPD tree).
MKL is slow at that shape on this project's CPUs (measured on a 2-core AMD EPYC over the default
model's 210 weight matrices: 1 row 31-38 ms, 2 rows 22 ms, 9 rows 45 ms, 13 rows 78 ms), and its
results for a row change with the number of rows around it. `few_rows.cpp` is a small AVX2 kernel
built once on first use (torch's C++ extension loader, ~30 s, cached): memory-bound up to ~8 rows
(1 row 18 ms, 4 rows 23 ms, 9 rows 31 ms, 16 rows 44 ms) and bit-identical per row whatever the
batch, which keeps PPD's tree rows numerically the same as plain decoding's single row. Where the CPU
has AVX-512 the same loop runs 16 lanes wide with 32 registers, so twice as many rows ride on one
weight read (measured on a 2-core AMD EPYC with AVX-512, 210 matrices: AVX2 loop 1 row 12.3 ms, 12 rows
16.7, 16 rows 24.1; AVX-512 loop 10.9 / 11.2 / 14.2 ms).
Where the float32 weights are exact GGUF blocks (the default model: Q4_1, head Q8_0), the kernel reads them
packed at 4-8 bits per weight, unpacks a strip of rows into L1 and runs the same float32 loop: bit-identical
outputs, a fifth of the memory traffic (2-core AVX2 EPYC, 210 matrices: 1 row 20-25 -> 9-10 ms).
Without AVX2, a compiler or with PPD_CPU_KERNEL=0, the MKL path below is used.
Where the CPU has AMX (Intel Sapphire Rapids on), `AmxBf16Linear` runs the bf16 matmuls of the lossless bf16
mode on AMX tiles instead; where it has AVX512_BF16 but no AMX (AMD Zen 4 on), `Avx512Bf16Linear` runs them
on bf16 dot products, reading the same packed GGUF blocks.
The same extension also normalises rows (`rms_norm`, `KernelRMSNorm`): one call where the stock RMSNorm runs 7
tensor ops, a step's 61 norms being a large share of what a plain step spends outside the matmuls.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from platformdirs import user_cache_dir

from .gguf_blocks import find_blocks

KERNEL_SOURCE = Path(__file__).with_name("few_rows.cpp")
KERNEL_MAX_ROWS = 64  # every tree the calibration tries; above, the MKL path (prefill) is faster
MKL_MAX_ROWS = 16  # the MKL fallback's W @ x^T path is faster than F.linear up to here


def _say(msg: str) -> None:
    print(f"[ppd] {msg}", file=sys.stderr, flush=True)


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled few-row kernel, building it on first use; None where it cannot run."""
    if os.environ.get("PPD_CPU_KERNEL", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    from torch.utils.cpp_extension import load

    build = Path(user_cache_dir("ppd-chat", appauthor=False)) / "kernels" / f"torch-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        _say("building the CPU matmul kernel (once, ~30 s)")
    try:
        return load("ppd_few_rows", [str(KERNEL_SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as exc:  # no compiler, no ninja, no Python headers: fall back, say why once
        _say(f"CPU matmul kernel unavailable ({type(exc).__name__}: {str(exc)[:200]}); using MKL")
        return None


def few_rows_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for a few rows x [R, K] -> [R, N]: the kernel where it runs, else MKL's few-row path."""
    rows = x.shape[0]
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and rows <= KERNEL_MAX_ROWS
            and weight.shape[1] % 8 == 0 and weight.is_contiguous() and (kernel := load_kernel()) is not None):
        return kernel.few_rows_linear(x.contiguous(), weight)
    return mkl_matmul(weight, x)


def mkl_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MKL's few-row path: W @ x^T is 2-5x faster than x @ W^T, and one row runs as two (sgemv is slower)."""
    rows = x.shape[0]
    if rows == 1:
        x = torch.cat([x, x])
    return (weight @ x.T).T[:rows].contiguous()  # strided outputs would push attention off its fast kernel


class SmallBatchLinear(torch.nn.Linear):
    """nn.Linear through `few_rows_matmul` when x has few rows (a decoding step), else F.linear (prefill).

    Same weights, module tree and state dict: only the kernel changes, and plain decoding, PPD and
    `model.generate` all run through it. Where the weights are exact GGUF blocks (`gguf_blocks`), the step
    reads them packed (buffers `qweight`, `qscales`): same float32 weights and sums, bit for bit, at 4-8 bits
    per weight instead of 32.
    """

    def packed_blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        q = self._buffers.get("qweight")
        return None if q is None else (q, self._buffers["qscales"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        limit = KERNEL_MAX_ROWS if load_kernel() is not None else MKL_MAX_ROWS
        # the kernel has no backward: training a few rows (a short reply's cut points) must keep its gradient
        if flat.shape[0] > limit or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        if (blocks := self.packed_blocks()) is not None and flat.dtype == torch.float32 and (kernel := load_kernel()):
            y = kernel.quant_linear(flat.contiguous(), *blocks)
        else:
            y = few_rows_matmul(self.weight, flat)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _swap_classes(model: torch.nn.Module, new_class: Callable[[torch.nn.Module], type | None],
                  prepare: Callable[[torch.nn.Module], None] | None = None) -> int:
    """Give every module for which `new_class(module)` names a class that class in place (after `prepare(module)`):
    same weights, state dict and module tree, another forward. Returns how many."""
    n = 0
    for module in model.modules():
        if (cls := new_class(module)) is not None:
            if prepare is not None:
                prepare(module)
            module.__class__ = cls
            n += 1
    return n


def _swap_linears(model: torch.nn.Module, cls: type, prepare: Callable[[torch.nn.Module], None] | None = None) -> int:
    """Give every plain nn.Linear of the model the class `cls` in place (after `prepare(module)`); returns how many."""
    return _swap_classes(model, lambda m: cls if type(m) is torch.nn.Linear else None, prepare)


# RMSNorm classes whose forward is exactly Llama's (transformers copies it): w * (x * rsqrt(mean(x^2) + eps))
LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm"}


class KernelRMSNorm(torch.nn.Module):
    """Mixed in before a stock Llama-style RMSNorm class: the same arithmetic in one kernel call (`rms_norm`),
    rows normalised independently of each other. Training (gradients) and other dtypes keep the stock forward."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype is not torch.float32 or (
                torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad)):
            return super().forward(hidden_states)
        return load_kernel().rms_norm(hidden_states.contiguous(), self.weight, self.variance_epsilon)


@functools.cache
def _kernel_norm_class(stock: type) -> type:
    return type(f"Kernel{stock.__name__}", (KernelRMSNorm, stock), {})


def use_kernel_norms(model: torch.nn.Module) -> int:
    """Give the model's Llama-style float32 RMSNorm layers the one-call kernel in place; returns how many.
    Their weights, state dict and module tree are unchanged; only the number of tensor ops per call is."""
    if load_kernel() is None:
        return 0

    def kernel_class(module: torch.nn.Module) -> type | None:
        w = getattr(module, "weight", None)
        if (type(module).__name__ in LLAMA_RMS_NORMS and isinstance(w, torch.Tensor) and w.dtype == torch.float32
                and w.device.type == "cpu" and w.numel() % 8 == 0):
            return _kernel_norm_class(type(module))
        return None

    return _swap_classes(model, kernel_class)


def packs_gguf_blocks() -> bool:
    """Whether decoding steps read exact GGUF blocks packed (PPD_GGUF_BLOCKS=0: the unpacked copies, to compare)."""
    return os.environ.get("PPD_GGUF_BLOCKS", "1") != "0"


def use_small_batch_linears(model: torch.nn.Module) -> int:
    """Switch the model's plain nn.Linear layers to SmallBatchLinear in place; returns how many.

    Builds the kernel now, so that a first reply does not wait for the compiler, and packs the weights
    that are exact GGUF blocks for it (PPD_GGUF_BLOCKS=0: read the float32 copies instead, for comparison)."""
    packs = load_kernel() is not None and packs_gguf_blocks()

    def pack(module: torch.nn.Module) -> None:
        if packs and module.weight.device.type == "cpu" and (found := find_blocks(module.weight)):
            module.register_buffer("qweight", found[1], persistent=False)
            module.register_buffer("qscales", found[2], persistent=False)

    return _swap_linears(model, SmallBatchLinear, pack)


def packed_weights(model: torch.nn.Module) -> dict[str, int]:
    """How many weight matrices a decoding step reads as GGUF blocks, by kind (e.g. {"q4_1": 210, "q8_0": 1})."""
    kinds: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, SmallBatchLinear) and (blocks := m.packed_blocks()) is not None:
            kind = "q4_1" if blocks[0].dtype == torch.uint8 else "q8_0"
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def describe_packed(kinds: dict[str, int]) -> str:
    """{"q4_1": 210, "q8_0": 1} -> "210 q4_1, 1 q8_0" (empty when nothing is packed)."""
    return ", ".join(f"{n} {kind}" for kind, n in kinds.items())


def amx_available() -> bool:
    """True where the CPU has AMX bf16 tiles and the OS lets this process use them (Intel Sapphire Rapids on)."""
    kernel = load_kernel()
    return kernel is not None and bool(kernel.amx_available())


def avx512_bf16_available() -> bool:
    """True where the CPU has AVX512_BF16 dot products (AMD Zen 4 on, Intel Cooper Lake)."""
    kernel = load_kernel()
    return kernel is not None and bool(kernel.avx512_bf16_available())


class Bf16Linear(SmallBatchLinear):
    """A bf16 matmul (bf16 weights and inputs, fp32 accumulation and output): the CPU counterpart of a bf16
    model's matmuls, with fp32 everywhere else. The weights are rounded to bf16 once (kept as fp32 values for
    prefill and training); prefill rounds its inputs the same way, so prompt and decoding see one bf16 model.
    A decoding step runs `step_rows`, whose rows are bit-identical alone or inside a tree."""

    def step_rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 211 calls a step: every check here is paid per call (kept to plain attributes and one reshape)
        if (x.dtype is not torch.float32 or x.numel() > KERNEL_MAX_ROWS * self.in_features
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.nn.functional.linear(x.to(torch.bfloat16).to(x.dtype), self.weight, self.bias)
        y = self.step_rows(x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class AmxBf16Linear(Bf16Linear):
    """Bf16Linear on AMX tiles, the weights packed in AMX's layout (buffer `packed`). A tile takes 16 rows at the
    cost of one, so a PPD tree of up to 16 nodes costs about a plain step (measured on a 2-core Xeon, the default
    model's 211 matrices incl. the head: 1 row 10.7 ms, 16 rows 11.2 ms; the fp32 kernel 18.8 / 35.0 ms)."""

    packed: torch.Tensor

    def step_rows(self, x: torch.Tensor) -> torch.Tensor:
        return load_kernel().amx_linear(x, self.packed)


class Avx512Bf16Linear(Bf16Linear):
    """Bf16Linear on AVX512_BF16 dot products (32 multiply-adds per instruction, float32's 16). Reads the GGUF
    blocks where the weights are exact ones (`qweight`, `qscales`: unpacked and rounded to bf16 in L1), else a
    bf16 copy (`packed`). Measured on a 2-core Zen 5, the default model's 211 matrices: 1 row 6.4 -> 5.3 ms,
    16 rows 18.2 -> 13.7 ms against the float32 kernel on the same packed blocks."""

    def step_rows(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        if (q := buffers.get("qweight")) is not None:
            return load_kernel().bf16_quant_linear(x, q, buffers["qscales"])
        if (packed := buffers.get("packed")) is not None:
            return load_kernel().bf16_linear(x, packed)
        return torch.nn.functional.linear(x.to(torch.bfloat16).to(x.dtype), self.weight)  # K % 32 != 0


def use_bf16_linears(model: torch.nn.Module, isa: str) -> int:
    """Turn the model's nn.Linear layers into the bf16 kernel's class (isa "amx" or "avx512") in place, weights
    rounded to bf16; returns how many. Tied weights (the LM head and the embedding table) are rounded once, in
    place, so they stay tied. GGUF blocks are found before the rounding: they hold the exact float32 weights."""
    kernel = load_kernel()
    packs_blocks = isa == "avx512" and packs_gguf_blocks()

    def round_and_pack(module: torch.nn.Module) -> None:
        w = module.weight.data
        found = find_blocks(w) if packs_blocks else None
        w.copy_(w.to(torch.bfloat16))
        if isa == "amx":
            module.register_buffer("packed", kernel.amx_pack(w), persistent=False)
        elif found:
            module.register_buffer("qweight", found[1], persistent=False)
            module.register_buffer("qscales", found[2], persistent=False)
        elif w.shape[1] % 32 == 0:
            module.register_buffer("packed", w.to(torch.bfloat16).contiguous(), persistent=False)

    return _swap_linears(model, AmxBf16Linear if isa == "amx" else Avx512Bf16Linear, round_and_pack)


def precision(model: torch.nn.Module) -> str:
    """The numerics a model runs with (reports, caches and the UI show it): its dtype, or "bfloat16-amx" /
    "bfloat16-avx512" for fp32 activations with our bf16 matmuls. Read off the layers, so it cannot go stale."""
    if any(isinstance(m, AmxBf16Linear) for m in model.modules()):
        return "bfloat16-amx"
    if any(isinstance(m, Avx512Bf16Linear) for m in model.modules()):
        return "bfloat16-avx512"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def linear_rows(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer (the LM head) on a few rows, through the same kernel as the decoder's matmuls."""
    if isinstance(layer, SmallBatchLinear):
        return layer(x)
    y = few_rows_matmul(layer.weight, x)
    return y + layer.bias if layer.bias is not None else y


def kernel_isa() -> str:
    """Which build of the kernel this CPU runs ("avx512", "avx2"), or "mkl" without the kernel."""
    kernel = load_kernel()
    if kernel is None:
        return "mkl"
    return kernel.isa() + ("+amx" if kernel.amx_available() else "")


def kernel_signature() -> str:
    """The kernel build and source this process runs: a calibration timed with another one is stale."""
    import hashlib

    return f"{kernel_isa()}-{hashlib.sha256(KERNEL_SOURCE.read_bytes()).hexdigest()[:12]}"


def time_linears(weights: list[torch.Tensor], rows: tuple[int, ...] = (1, 2, 4, 8, 12, 16), repeats: int = 7
                 ) -> list[dict]:
    """Best-of-`repeats` ms to multiply every weight matrix by `rows` rows: MKL path, kernel on float32 weights,
    kernel on the same weights packed as GGUF blocks (where they are), AMX bf16 and AVX512_BF16 (dense bf16
    weights, and the GGUF blocks) where the CPU has them."""
    import time

    kernel = load_kernel()
    paths = {"mkl_ms": mkl_matmul}
    if kernel is not None:
        paths["kernel_ms"] = lambda w, x: kernel.few_rows_linear(x, w)
    blocks = {id(w): found for w in weights if kernel is not None and (found := find_blocks(w))}
    if len(blocks) == len(weights):
        paths["gguf_blocks_ms"] = lambda w, x: kernel.quant_linear(x, blocks[id(w)][1], blocks[id(w)][2])
    if amx_available():
        packed = {id(w): kernel.amx_pack(w) for w in weights}
        paths["amx_bf16_ms"] = lambda w, x: kernel.amx_linear(x, packed[id(w)])
    if avx512_bf16_available():
        as_bf16 = {id(w): w.to(torch.bfloat16) for w in weights}
        paths["avx512_bf16_ms"] = lambda w, x: kernel.bf16_linear(x, as_bf16[id(w)])
        if len(blocks) == len(weights):
            paths["avx512_bf16_blocks_ms"] = lambda w, x: kernel.bf16_quant_linear(x, *blocks[id(w)][1:])
    out = []
    for r in rows:
        xs = {k: torch.randn(r, k) for k in {w.shape[1] for w in weights}}
        row: dict = {"rows": r}
        for name, fn in paths.items():
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for w in weights:
                    fn(w, xs[w.shape[1]])
                best = min(best, time.perf_counter() - start)
            row[name] = round(best * 1e3, 1)
        out.append(row)
    return out
