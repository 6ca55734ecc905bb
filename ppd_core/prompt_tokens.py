"""The trained prompt tokens: N groups of m embedding vectors, the only parameters PPD adds.

Prompt token j (1-based), appended after a token at position p, sits at position p + j and is
trained to predict the token at p + j + 1. With m > 1 each prompt token is an ensemble of m
virtual tokens whose logits are averaged (EPT in the PPD paper).

The "deep" variant adds, per decoder layer after the first, a learned offset to each prompt
token's hidden state (prefix-tuning in miniature): L x N x m x H more parameters, still far under
0.1 % of the model, and no change for real tokens, which never see prompt tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel


class PromptTokenError(ValueError):
    """A prompt-token file that is missing, corrupt or made for another model."""


def model_signature(model: PreTrainedModel) -> str:
    """A short id of the base model that survives dtype changes (fp32/bf16 loads agree)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    h = hashlib.sha256()
    h.update(json.dumps([cfg.model_type, cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers]).encode())
    # a few rows of the embedding table, rounded to bf16 so fp32 and bf16 loads agree
    sample = emb[:: max(1, emb.shape[0] // 64)][:64, :64].detach().to("cpu", torch.bfloat16)
    h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


class PromptTokens(nn.Module):
    def __init__(self, n_tokens: int, hidden_size: int, n_virtual: int = 1, meta: dict | None = None,
                 deep_layers: int = 0):
        super().__init__()
        self.n_tokens, self.n_virtual, self.hidden_size = n_tokens, n_virtual, hidden_size
        self.embeddings = nn.Parameter(torch.zeros(n_tokens * n_virtual, hidden_size))
        # deep variant: offsets[i] is added to the input of decoder layer i + 1 (layer 0 would only
        # duplicate the embedding); None for plain PPD
        self.offsets = (nn.Parameter(torch.zeros(deep_layers, n_tokens * n_virtual, hidden_size))
                        if deep_layers else None)
        self.meta: dict = dict(meta or {})

    @property
    def variant(self) -> str:
        name = "deep" if self.offsets is not None else "plain"
        return name if self.n_virtual == 1 else f"{name}-ensemble-m{self.n_virtual}"

    def embedding(self, j: int, v: int = 0) -> torch.Tensor:
        """Embedding of virtual token v of prompt token j (both 0-based)."""
        return self.embeddings[j * self.n_virtual + v]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weights_hash(self) -> str:
        h = hashlib.sha256()
        for p in self.parameters():
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @contextmanager
    def steering(self, model: PreTrainedModel, rows: torch.Tensor, source: torch.Tensor) -> Iterator[None]:
        """While active, a forward of `model` adds the deep offsets to the prompt-token rows.

        rows: [R] sequence positions (within this forward's input) that hold prompt tokens;
        source: [R] their row in `embeddings`. Plain tokens and empty `rows` need no hooks.
        """
        if self.offsets is None or rows.numel() == 0:
            yield
            return
        layers = list(model.get_decoder().layers)[1:]
        per_layer = self.offsets[:, source]  # one gather per step, not one per layer

        def hook_for(i: int):
            def add_offsets(module: nn.Module, args: tuple) -> tuple:
                return (self.add_offsets(args[0], per_layer[i], rows), *args[1:])
            return add_offsets

        handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def add_offsets(hidden: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden [1, T, H] with one layer's offsets [R, H] added to the prompt-token rows `rows` [R]."""
        return hidden.index_add(1, rows, offsets[None].to(hidden.dtype))

    @classmethod
    def init_for(cls, model: PreTrainedModel, n_tokens: int = 3, n_virtual: int = 1, how: str = "mean",
                 seed: int = 0, deep: bool = False) -> PromptTokens:
        """Fresh prompt tokens for `model`: the mean token embedding (a good start) or random; zero offsets."""
        emb = model.get_input_embeddings().weight.detach().float()
        deep_layers = model.config.num_hidden_layers - 1 if deep else 0
        pt = cls(n_tokens, emb.shape[1], n_virtual, meta={"init": how}, deep_layers=deep_layers)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(pt.embeddings.shape, generator=gen) * emb.std().item()
        with torch.no_grad():
            if how == "mean":
                pt.embeddings.copy_(emb.mean(0).cpu() + 0.01 * noise)
            elif how == "random":
                pt.embeddings.copy_(noise)
            else:
                raise ValueError(f"unknown init {how!r}")
        pt.meta["base_model_signature"] = model_signature(model)
        return pt.to(device=emb.device, dtype=model.dtype)

    def save(self, path: str | Path, **extra_meta: object) -> None:
        meta = {**self.meta, **extra_meta, "n_tokens": self.n_tokens, "n_virtual": self.n_virtual,
                "hidden_size": self.hidden_size}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        meta["variant"] = self.variant
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(tmp), metadata={"ppd": json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, model: PreTrainedModel) -> PromptTokens:
        """Load tokens made for `model`; a file for another model fails with a clear message."""
        path = Path(path)
        if not path.is_file():
            raise PromptTokenError(f"prompt-token file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("ppd", "{}"))
                weights = f.get_tensor("embeddings")
                names = list(f.keys())
                offsets = f.get_tensor("offsets") if "offsets" in names else None
        except Exception as exc:  # safetensors raises several types on a damaged file
            raise PromptTokenError(f"{path} is not a valid prompt-token file: {exc}") from exc
        want = model_signature(model)
        got = meta.get("base_model_signature")
        if got != want or weights.shape[1] != model.config.hidden_size:
            raise PromptTokenError(
                f"{path.name} was made for another model (base {meta.get('base_model', 'unknown')}, "
                f"signature {got}, hidden size {weights.shape[1]}); this model has signature {want} and "
                f"hidden size {model.config.hidden_size}. Train tokens for it with `python launch.py train`.")
        if offsets is not None and offsets.shape[0] != model.config.num_hidden_layers - 1:
            raise PromptTokenError(f"{path.name} has deep offsets for {offsets.shape[0] + 1} layers; "
                                   f"this model has {model.config.num_hidden_layers}")
        pt = cls(int(meta["n_tokens"]), weights.shape[1], int(meta.get("n_virtual", 1)), meta=meta,
                 deep_layers=0 if offsets is None else offsets.shape[0])
        with torch.no_grad():
            pt.embeddings.copy_(weights)
            if offsets is not None:
                pt.offsets.copy_(offsets)
        emb = model.get_input_embeddings().weight
        return pt.to(device=emb.device, dtype=model.dtype)
