"""One real default model per test session, shared by every test that needs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEV_PROMPTS = SHARED / "data" / "dev_prompts.jsonl"
TRAIN_PROMPTS = SHARED / "data" / "train_prompts.jsonl"


def load_prompts(path: Path, limit: int) -> list[str]:
    if not path.is_file():  # a clear failure, not a fixture traceback
        pytest.fail(f"{path} not found: the real-model tests read the team's prompt sets from ../shared/data/ "
                    "beside this checkout (where CI's clone has them)")
    lines = path.read_text().splitlines()[:limit]
    return [json.loads(line)["turns"][0] for line in lines]


@pytest.fixture(scope="session")
def lm():
    """The real default model (SmolLM2-135M-Instruct), in the dtype the engine ships (auto)."""
    from ppd_core.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def engine(lm):
    """An engine with the prompt tokens and tree the app uses by default."""
    from ppd_core.engine import Engine
    from ppd_core.prompt_tokens import PromptTokens
    from ppd_core.runtime import shipped_prompt_tokens
    from ppd_core.tree import default_tree

    path = shipped_prompt_tokens(lm.name)
    pt = PromptTokens.load(path, lm.model) if path else PromptTokens.init_for(lm.model, 3)
    return Engine(lm, pt, default_tree(pt.n_tokens))


class TinyTokenizer:
    """Just enough tokenizer for the engine: a character per token."""
    eos_token_id = 0
    chat_template = "tiny"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [1 + (ord(c) % 60) for m in messages for c in m["content"]]


def make_tiny(dtype=None):
    """A tiny random Llama through the stock class: fast engine tests without the real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppd_core.models import LoadedModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.eos_token_id = None
    return LoadedModel(model, TinyTokenizer(), "tiny", torch.device("cpu"), model.dtype, "sdpa", None, 0.0)


@pytest.fixture(scope="session")
def tiny():
    return make_tiny()
