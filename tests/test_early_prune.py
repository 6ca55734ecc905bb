"""Fast tests: ProPD's early pruning on a tiny random 4-layer Llama with deep prompt tokens (the per-layer
offsets make the layer-by-layer forward do everything the stock forward + steering hooks do)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppd_core import calibrate as cal
from ppd_core.engine import EarlyPrune, Engine, Session, Settings
from ppd_core.kv_cache import growing_cache
from ppd_core.models import LoadedModel
from ppd_core.prompt_tokens import PromptTokens
from ppd_core.tree import TreeBuffers, build_tree
from tests.conftest import TinyTokenizer

ACC = np.array([[0.5, 0.2] + [0.05] * 8] * 3)
LAYERS = 4
VOCAB = 64


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    lm = LoadedModel(model, TinyTokenizer(), "tiny4", torch.device("cpu"), model.dtype, "sdpa", None, 0.0)
    pt = PromptTokens.init_for(model, 3, how="random", deep=True)
    with torch.no_grad():
        pt.offsets.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    engine = Engine(lm, pt, build_tree(ACC, 12))
    assert engine.layerwise
    return engine


def greedy_guesser(model):
    """Often-right guesses (a stand-in for trained prompt tokens): the top-k of the model's own next-token
    distributions along its greedy continuation."""
    def guess(ids: list[int], d: int, k: int) -> torch.Tensor:
        rows, ctx = [], list(ids)
        for _ in range(d + 1):
            top = torch.topk(model(input_ids=torch.tensor([ctx])).logits[0, -1], k).indices
            rows.append(top)
            ctx.append(int(top[0]))
        return torch.stack(rows[1:])  # row j: the token j + 2 ahead
    return guess


def reply(engine: Engine, text: str, guesser=None, **kw) -> tuple[list[int], object]:
    chunks = list(engine.generate([{"role": "user", "content": text}], Settings(max_new_tokens=40, **kw), Session(),
                                  guesser=guesser))
    return [t for c in chunks for t in c.token_ids], chunks[-1].counters


def test_layer_by_layer_forward_equals_the_stock_forward_when_nothing_is_pruned(engine: Engine):
    buf = engine._buffers[3]  # the biggest tree: nodes at three depths, prompt tokens on several nodes
    assert buf.prompt_source.numel() > 0
    prefix = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(1, VOCAB, (buf.n_nodes,), generator=torch.Generator().manual_seed(4))
    embeds = torch.cat([engine.model.get_input_embeddings()(tokens),
                        engine.prompt_tokens.embeddings[buf.prompt_source]])
    hidden, caches = [], []
    assert engine.layerwise
    with torch.inference_mode():
        # the stock decoder forward (offsets through hooks), then the layer loop without and with a cut whose
        # top-k is the whole vocabulary (keeps every node)
        for layerwise, prune in ((False, None), (True, None), (True, EarlyPrune(layer=2, top_k=VOCAB))):
            engine.layerwise = layerwise
            try:
                cache = growing_cache(engine.model.config)
                engine.model(input_ids=prefix, past_key_values=cache, use_cache=True)
                h, kept = engine._forward(cache, embeds, buf, 30, prune, tokens)
            finally:
                engine.layerwise = True
            assert (kept is None) == (prune is None)
            if kept is not None:
                assert torch.equal(kept, torch.arange(buf.size))
            hidden.append(h)
            caches.append(cache)
    for other in (1, 2):
        torch.testing.assert_close(hidden[0], hidden[other], rtol=0, atol=0)
        for a, b in zip(caches[0].layers, caches[other].layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
            torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


def test_subtree_keeps_rows_in_order():
    buf = TreeBuffers.build([-1, 0, 0, 1, 2], list(range(5)), [1, 2, 0, 1, 0], 1)
    sub = buf.subtree([0, 2, 4], 1)  # node 1 (and its child 3) pruned
    assert sub.parents.tolist() == [-1, 0, 1] and sub.attached == [1, 0, 0]
    kept_rows = torch.isin(buf.owner, torch.tensor([0, 2, 4])).nonzero().flatten()
    assert sub.size == kept_rows.numel()
    torch.testing.assert_close(sub.offsets, buf.offsets[kept_rows])
    torch.testing.assert_close(sub.allow, buf.allow[kept_rows][:, kept_rows])


TEXTS = ("hello world", "abcabcabc", "the quick brown fox")
PENALTIES = (1.0, 1.3)


@pytest.fixture(scope="module")
def plain_replies(engine: Engine) -> dict[tuple[str, float], list[int]]:
    return {(t, p): reply(engine, t, ppd=False, repetition_penalty=p)[0] for t in TEXTS for p in PENALTIES}


@pytest.mark.parametrize("ngram", [False, True])
@pytest.mark.parametrize("prune", [EarlyPrune(1, 1), EarlyPrune(2, 3), EarlyPrune(0, 1)])
def test_early_pruning_is_lossless(engine: Engine, plain_replies: dict, prune: EarlyPrune, ngram: bool):
    engine.early_prune = prune
    guesser = greedy_guesser(engine.model)
    try:
        pruned_any = accepted = 0
        for (text, penalty), plain in plain_replies.items():
            pruned, c = reply(engine, text, guesser, ngram=ngram, repetition_penalty=penalty, early_prune=True)
            assert pruned == plain and len(plain) >= 10
            assert c.pruned_nodes <= c.tree_nodes
            pruned_any += c.pruned_nodes
            accepted += c.accepted_guesses  # multi-token commits happened under pruning
            if prune.top_k == 1:  # aggressive: most candidates go
                assert c.pruned_nodes > c.tree_nodes / 2
        assert pruned_any > 0
        if prune.top_k > 1:  # pruned steps that still accepted guesses: the cut layers' commits were exercised
            assert accepted > 0
    finally:
        engine.early_prune = None
    # the same guesses without pruning: nothing pruned, same reply
    text, penalty = TEXTS[0], PENALTIES[1]
    full, c_full = reply(engine, text, guesser, ngram=ngram, repetition_penalty=penalty)
    assert full == plain_replies[(text, penalty)] and c_full.pruned_nodes == 0


def test_early_pruning_keeps_seeded_sampling_reproducible(engine: Engine):
    engine.early_prune = EarlyPrune(1, 2)
    try:
        s = dict(temperature=0.9, top_p=0.95, seed=5, early_prune=True)
        a, c = reply(engine, "sample me", **s)
        b, _ = reply(engine, "sample me", **s)
        assert a == b and len(a) >= 10 and c.pruned_nodes > 0
    finally:
        engine.early_prune = None


def curve(tree_ms: float, plain_ms: float) -> list[dict]:
    return [{"b": 0, "latency_ms": plain_ms}, {"b": 12, "latency_ms": tree_ms}]


def test_calibration_switches_pruning_off_when_even_pruning_everything_cannot_pay(engine: Engine, monkeypatch):
    monkeypatch.setattr(cal, "time_early_head", lambda engine, rows: 0.006)  # 6 ms for the early predictor
    monkeypatch.setattr(cal, "pruned_run", lambda *a, **k: pytest.fail("the bound alone decides here"))
    # the CPU case: a 54 ms tree step against a 48.5 ms plain step saves at most 5.5 ms even at the first layer
    report = cal.choose_early_prune(engine, engine.tree, 12, curve(54.0, 48.5), cal.CALIBRATION_PROMPTS,
                                    progress=False)
    assert report["enabled"] is False and "cannot pay" in report["reason"]
    assert report["head_ms"] == 6.0 and max(report["max_saving_ms"].values()) < 6.0
    agreement = report["agreement"]  # the early predictor's accuracy, per cut and top-k
    assert set(agreement) == {"1", "2", "3"}
    for by_k in agreement.values():
        rates = [by_k[str(k)] for k in cal.EARLY_TOP_K]
        assert 0 <= rates[0] <= rates[1] <= rates[2] <= 1
    assert cal.early_prune_from_report({"early_prune": report}) is None
    assert cal.choose_early_prune(engine, engine.tree, 0, curve(54.0, 48.5), cal.CALIBRATION_PROMPTS,
                                  progress=False)["enabled"] is False  # plain decoding: nothing to prune


def test_calibration_measures_every_cut_and_top_k_when_the_bound_allows(engine: Engine, monkeypatch):
    monkeypatch.setattr(cal, "time_early_head", lambda engine, rows: 0.0001)
    report = cal.choose_early_prune(engine, engine.tree, 12, curve(90.0, 40.0), cal.CALIBRATION_PROMPTS,
                                    progress=False)
    trials = report["trials"]
    assert {(t["layer"], t["top_k"]) for t in trials} == {(c, k) for c in (1, 2, 3) for k in cal.EARLY_TOP_K}
    assert all(t["tokens_per_s"] > 0 and 0 <= t["pruned_fraction"] <= 1 for t in trials)
    assert any(t["pruned_fraction"] > 0 for t in trials) and report["base"]["pruned_fraction"] == 0
    best = max(trials, key=lambda t: t["vs_base"])
    confirm = report["confirmation"]
    assert len(confirm) == cal.CONFIRM_PAIRS and all(r > 0 for r in confirm)
    on = sorted(confirm)[len(confirm) // 2] >= cal.MIN_PRUNE_GAIN
    assert report["enabled"] is on
    chosen = cal.early_prune_from_report({"early_prune": report})
    assert chosen == (EarlyPrune(best["layer"], best["top_k"]) if on else None)
    assert engine.early_prune is None  # the trials restored the engine


def fake_runs(speed_of):
    """A pruned_run stand-in on a machine whose speed drifts: run i is slowed by a seeded factor of 0.75-1.0."""
    drift = random.Random(0)

    def run(engine, prompts, prune, max_new_tokens=32):
        return {"tokens_per_s": speed_of(prune) * drift.uniform(0.75, 1.0), "tau": 1.2,
                "pruned_fraction": 0.0 if prune is None else 0.5}
    return run


def test_calibration_does_not_switch_pruning_on_for_a_lucky_timing(engine: Engine, monkeypatch):
    monkeypatch.setattr(cal, "time_early_head", lambda engine, rows: 0.0001)
    monkeypatch.setattr(cal, "pruned_run", fake_runs(lambda prune: 100.0))  # pruning changes nothing
    report = cal.choose_early_prune(engine, engine.tree, 12, curve(90.0, 40.0), cal.CALIBRATION_PROMPTS,
                                    progress=False)
    assert max(t["vs_base"] for t in report["trials"]) >= cal.MIN_PRUNE_GAIN  # the noise alone made a "winner"
    assert report["enabled"] is False and "when confirmed" in report["reason"]


def test_calibration_switches_pruning_on_where_one_setting_really_pays(engine: Engine, monkeypatch):
    monkeypatch.setattr(cal, "time_early_head", lambda engine, rows: 0.0001)
    pays = EarlyPrune(2, 3)
    monkeypatch.setattr(cal, "pruned_run", fake_runs(lambda prune: 200.0 if prune == pays else 100.0))
    report = cal.choose_early_prune(engine, engine.tree, 12, curve(90.0, 40.0), cal.CALIBRATION_PROMPTS,
                                    progress=False)
    assert report["enabled"] is True and cal.early_prune_from_report({"early_prune": report}) == pays


def test_bench_early_prune_option():
    from ppd_core.bench import parse_early_prune

    assert parse_early_prune("15,3", 30) == EarlyPrune(15, 3)
    assert parse_early_prune("off", 30) is None
    for bad in ("15", "a,b", "0,3", "30,3", "15,0"):
        with pytest.raises(ValueError, match="early-prune"):
            parse_early_prune(bad, 30)
    report = {"early_prune": {"enabled": False, "layer": None, "top_k": None, "reason": "cannot pay here"}}
    assert cal.early_prune_summary(report) == "early pruning: off (cannot pay here)"


def test_bench_measures_pruning_side_by_side(engine: Engine):
    from ppd_core.bench import benchmark

    engine.early_prune = EarlyPrune(1, 1)
    try:
        prompts = [{"id": "a", "turns": ["hello there"]}, {"id": "b", "turns": ["abcabc"]}]
        report = benchmark(engine, prompts, ("plain", "ppd_ngram", "ppd_ngram_pruned", "propd"), Settings(
            max_new_tokens=12))
    finally:
        engine.early_prune = None
    assert all(report["identical_to_plain"].values())
    assert report["early_prune"] == {"layer": 1, "top_k": 1}
    modes = report["modes"]
    assert modes["ppd_ngram"]["pruned_fraction"] == 0 and modes["ppd_ngram_pruned"]["pruned_fraction"] > 0
    assert modes["ppd_ngram_pruned"]["step_ms"] > 0
