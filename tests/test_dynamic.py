"""Fast tests: the dynamic tree (acceptance calibration, menu choice) and the in-place KV cache, on a tiny
random Llama; the real-model losslessness of the dynamic tree is in test_engine_model.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ppd_core.calibrate import menu_entries, menu_from_report, monotone_fit
from ppd_core.dynamic import AcceptanceStats, TreeMenu
from ppd_core.engine import Engine, Session, Settings
from ppd_core.kv_cache import GrowingLayer, growing_cache
from ppd_core.models import LoadedModel
from ppd_core.prompt_tokens import PromptTokens
from ppd_core.tree import PRIOR_ACCURACY, build_tree, tree_rows

ACC = np.array([[0.5, 0.2] + [0.05] * 8] * 3)


def flat_latency(trees: dict, per_row: float) -> dict[tuple[int, int], float]:
    """Step time = 10 ms + per_row x rows: per_row 0 makes every tree free, so the biggest wins."""
    return {(b, d): 0.010 + per_row * tree_rows(spec, d) for b, spec in trees.items() for d in spec.trees}


def test_acceptance_starts_from_q_and_learns_from_evidence():
    stats = AcceptanceStats.empty(3)
    q = torch.tensor([[0.12, 0.02], [0.5, 0.3]], dtype=torch.float64)
    assert torch.allclose(stats.acceptance(q), q)  # no evidence: q is taken as calibrated
    # 40 depth-1 candidates of q = 0.12, all accepted; 40 more whose parent was rejected (never tested)
    n = 40
    q_nodes = torch.full((2 * n,), 0.12, dtype=torch.float64)
    depth = torch.ones(2 * n, dtype=torch.long)
    reached = torch.tensor([True] * n + [False] * n)
    stats.update(q_nodes, depth, reached, torch.ones(2 * n, dtype=torch.bool))
    est = stats.acceptance(q)
    assert est[0, 0] > 0.7  # learnt: these candidates are much better than their q says
    assert est[0, 1] == q[0, 1] and torch.equal(est[1], q[1])  # other buckets and depths untouched
    table = stats.table()
    assert sum(t for t, _, _ in table[0]) == n  # untested candidates are not counted
    assert max(table[0], key=lambda r: r[0])[1] == 1.0


def test_menu_picks_big_trees_when_confident_and_small_ones_when_not():
    trees = {b: build_tree(PRIOR_ACCURACY, b) for b in (2, 8, 16)}
    menu = TreeMenu(trees, flat_latency(trees, 0.004))
    sure = torch.full((3, menu.top_k), 0.9, dtype=torch.float64)
    hopeless = torch.full((3, menu.top_k), 0.001, dtype=torch.float64)
    assert menu.choose(sure)[0] == 16
    assert menu.choose(hopeless)[0] == 2
    b, buf = menu.choose(hopeless[:1])  # d = 1 guess available: the tree for d = 1 of that budget
    assert buf.n_nodes == len(trees[b].trees[1])


def test_monotone_fit_and_menu_from_a_calibration_report():
    assert monotone_fit([1, 2, 3, 3, 4], [5.0, 4.0, 6.0, 8.0, 7.0]) == {1: 4.5, 2: 4.5, 3: 7.0, 4: 7.0}
    trees = {0: build_tree(ACC, 2), 2: build_tree(ACC, 2), 8: build_tree(ACC, 8)}
    # a noisy measurement that has the 8-row tree faster than the 2-row one for d = 3
    latency = {(b, d, c): 0.05 + 0.001 * b + (0.02 if (b, d) == (2, 3) else 0.0)
               for b, spec in trees.items() for d in spec.trees for c in (128, 512)}
    report = {"menu": menu_entries(trees, latency)}
    assert [e["b"] for e in report["menu"]] == [2, 8]  # plain (b = 0) is not on the menu
    menu = menu_from_report(report)
    assert menu.budgets == [2, 8]
    for d, by_d in menu.by_d.items():
        assert by_d.seconds[0] <= by_d.seconds[1], d  # monotone in rows despite the noise
    assert menu_from_report({}) is None


def tiny_engine(tiny: LoadedModel, per_row: float) -> Engine:
    pt = PromptTokens.init_for(tiny.model, 3, how="random")
    engine = Engine(tiny, pt, build_tree(ACC, 8))
    trees = {b: build_tree(ACC, b) for b in (2, 4, 8, 16)}
    engine.menu = TreeMenu(trees, flat_latency(trees, per_row))
    return engine


@pytest.mark.parametrize("per_row", [0.0, 0.002, 1.0])
@pytest.mark.parametrize("ngram", [False, True])
def test_dynamic_tree_is_lossless_on_a_tiny_model(tiny: LoadedModel, per_row: float, ngram: bool):
    engine = tiny_engine(tiny, per_row)
    chosen: list[int] = []
    choose = engine.menu.choose
    engine.menu.choose = lambda a: (lambda r: chosen.append(r[0]) or r)(choose(a))
    for text in ["hello world", "abcabcabc", "the quick brown fox"]:
        msgs = [{"role": "user", "content": text}]
        for penalty in (1.0, 1.3):
            plain = [t for c in engine.generate(msgs, Settings(max_new_tokens=40, ppd=False,
                                                               repetition_penalty=penalty)) for t in c.token_ids]
            session = Session()
            chunks = list(engine.generate(msgs, Settings(max_new_tokens=40, repetition_penalty=penalty, ngram=ngram,
                                                         dynamic=True), session))
            assert [t for c in chunks for t in c.token_ids] == plain and len(plain) >= 10
            assert session.acceptance is not None and session.acceptance.tried.sum() > 0
            assert chunks[-1].counters.tree_nodes > 0
    if per_row == 0.0:
        assert 16 in chosen and 2 not in chosen  # free rows: big trees
    if per_row == 1.0:
        assert set(chosen) == {2}  # expensive rows: always the smallest


def test_dynamic_tree_keeps_sampling_seeded_and_valid(tiny: LoadedModel):
    engine = tiny_engine(tiny, 0.0)
    s = Settings(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=11, dynamic=True)
    msgs = [{"role": "user", "content": "sample me"}]
    a = [t for c in engine.generate(msgs, s) for t in c.token_ids]
    b = [t for c in engine.generate(msgs, s) for t in c.token_ids]
    assert a == b and len(a) == 30


def test_growing_cache_matches_the_stock_cache(tiny: LoadedModel):
    model = tiny.model
    ids = torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        caches = [DynamicCache(config=model.config), growing_cache(model.config)]
        assert isinstance(caches[1].layers[0], GrowingLayer)
        outs = []
        for cache in caches:
            logits = [model(input_ids=ids[:, :20], past_key_values=cache, use_cache=True).logits[0, -1]]
            for t in range(20, 40):  # one token at a time, with a crop (as a rejected tree is dropped) midway
                logits.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
                if t == 30:
                    cache.crop(-3)
                    for j in range(3):
                        model(input_ids=ids[:, 28 + j:29 + j], past_key_values=cache, use_cache=True)
            outs.append(torch.stack(logits))
            assert cache.get_seq_length() == 40
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    room = caches[1].layers[0]._key_buf.shape[-2]
    assert room >= 256 and caches[1].layers[0].keys.data_ptr() == caches[1].layers[0]._key_buf.data_ptr()


def test_growing_layer_keep_shortens_lazily_and_the_next_update_writes_after_the_kept_part():
    layer = GrowingLayer()
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    layer.update(k, v)
    layer.keep(4)  # as a step keeps its accepted rows
    assert layer.get_seq_length() == 4
    assert torch.equal(layer.keys, k[..., :4, :]) and torch.equal(layer.values, v[..., :4, :])
    layer.keep(3)
    k2, v2 = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    keys, values = layer.update(k2, v2)  # the kept cut is not read before the update: it still applies
    assert torch.equal(keys, torch.cat([k[..., :3, :], k2], -2))
    assert torch.equal(values, torch.cat([v[..., :3, :], v2], -2))
    assert layer.get_seq_length() == 5 and layer.keys.data_ptr() == layer._key_buf.data_ptr()
    layer.crop(-1)  # the stock crop sees the same views
    assert layer.get_seq_length() == 4 and torch.equal(layer.values, values[..., :4, :])
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        layer.keep(5)
