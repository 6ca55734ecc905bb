"""One real default model per test session, shared by every test that needs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEV_PROMPTS = SHARED / "data" / "dev_prompts.jsonl"
TRAIN_PROMPTS = SHARED / "data" / "train_prompts.jsonl"


def load_prompts(path: Path, limit: int) -> list[str]:
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
