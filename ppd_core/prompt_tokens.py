"""The trained prompt tokens: N groups of m embedding vectors, the only parameters PPD adds.

Prompt token j (1-based), appended after a token at position p, sits at position p + j and is
trained to predict the token at p + j + 1. With m > 1 each prompt token is an ensemble of m
virtual tokens whose logits are averaged (EPT in the PPD paper).
"""

from __future__ import annotations

import hashlib
import json
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
    def __init__(self, n_tokens: int, hidden_size: int, n_virtual: int = 1, meta: dict | None = None):
        super().__init__()
        self.n_tokens, self.n_virtual, self.hidden_size = n_tokens, n_virtual, hidden_size
        self.embeddings = nn.Parameter(torch.zeros(n_tokens * n_virtual, hidden_size))
        self.meta: dict = dict(meta or {})

    def embedding(self, j: int, v: int = 0) -> torch.Tensor:
        """Embedding of virtual token v of prompt token j (both 0-based)."""
        return self.embeddings[j * self.n_virtual + v]

    @property
    def num_parameters(self) -> int:
        return self.embeddings.numel()

    def weights_hash(self) -> str:
        data = self.embeddings.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    @classmethod
    def init_for(cls, model: PreTrainedModel, n_tokens: int = 3, n_virtual: int = 1, how: str = "mean",
                 seed: int = 0) -> PromptTokens:
        """Fresh prompt tokens for `model`: the mean token embedding (a good start) or random."""
        emb = model.get_input_embeddings().weight.detach().float()
        pt = cls(n_tokens, emb.shape[1], n_virtual, meta={"init": how})
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
        save_file({"embeddings": self.embeddings.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                  metadata={"ppd": json.dumps(meta)})
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
        except Exception as exc:  # safetensors raises several types on a damaged file
            raise PromptTokenError(f"{path} is not a valid prompt-token file: {exc}") from exc
        want = model_signature(model)
        got = meta.get("base_model_signature")
        if got != want or weights.shape[1] != model.config.hidden_size:
            raise PromptTokenError(
                f"{path.name} was made for another model (base {meta.get('base_model', 'unknown')}, "
                f"signature {got}, hidden size {weights.shape[1]}); this model has signature {want} and "
                f"hidden size {model.config.hidden_size}. Train tokens for it with `python launch.py train`.")
        pt = cls(int(meta["n_tokens"]), weights.shape[1], int(meta.get("n_virtual", 1)), meta=meta)
        with torch.no_grad():
            pt.embeddings.copy_(weights)
        emb = model.get_input_embeddings().weight
        return pt.to(device=emb.device, dtype=model.dtype)
