"""Assemble an engine from names on the command line: model, dtype, prompt tokens, tree."""

from __future__ import annotations

import sys
from pathlib import Path

from .engine import Engine
from .models import DEFAULT_MODEL, load_model
from .prompt_tokens import PromptTokens
from .tree import TreeSpec, build_tree, default_tree, plain_spec

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def shipped_prompt_tokens(model_name: str) -> Path | None:
    path = ASSETS / "prompt_tokens" / f"{Path(model_name).name}.safetensors"
    return path if path.is_file() else None


def build_engine(model: str | None = None, dtype: str = "auto", device: str = "auto",
                 quantization: str | None = None, prompt_tokens: str | None = None,
                 tree: str | TreeSpec | None = None, *, calibrated: bool = True, recalibrate: bool = False,
                 tree_size: int | None = None) -> Engine:
    """The engine the app, the benchmark and the tests use.

    Prompt tokens: the given file, else the ones shipped in assets/ for this model, else fresh
    (mean-embedding) tokens, which make PPD correct but not yet faster.
    Tree: the given spec file; else a tree of `tree_size` rows built from the measured accuracies;
    else the calibrated tree for this machine (measured once, then cached).
    """
    from .calibrate import CALIBRATION_PROMPTS, accuracy_table, calibrate, early_prune_from_report, menu_from_report

    lm = load_model(model, dtype=dtype, device=device, quantization=quantization)
    path = Path(prompt_tokens) if prompt_tokens else shipped_prompt_tokens(model or DEFAULT_MODEL)
    if path is not None:
        pt = PromptTokens.load(path, lm.model)
    else:
        print(f"[ppd] no trained prompt tokens for {lm.name}; using untrained ones "
              "(train them with `python launch.py train`)", file=sys.stderr)
        pt = PromptTokens.init_for(lm.model, 3, how="mean")
    engine = Engine(lm, pt, default_tree(pt.n_tokens))
    if isinstance(tree, TreeSpec | str):
        engine.set_tree(TreeSpec.load(tree) if isinstance(tree, str) else tree)
    elif tree_size is not None:
        acc = accuracy_table(engine, CALIBRATION_PROMPTS)
        engine.set_tree(build_tree(acc, tree_size) if tree_size > 0 else plain_spec(pt.n_tokens))
    elif calibrated:
        cal = calibrate(engine, recalibrate=recalibrate)
        engine.set_tree(cal.tree)
        engine.calibration = cal.report
        engine.menu = menu_from_report(cal.report, pt.n_virtual, engine.device)
        engine.early_prune = early_prune_from_report(cal.report)
    return engine
