"""Fast tests: tree specs, buffers, the builder, and the engine on a tiny random Llama (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ppd_core.engine import Engine, Settings, _Detokenizer
from ppd_core.models import LoadedModel
from ppd_core.prompt_tokens import PromptTokens
from ppd_core.tree import (
    TreeBuffers,
    TreeSpec,
    build_tree,
    default_tree,
    expected_tokens_per_step,
    plain_spec,
    stationary,
)


def test_spec_json_round_trip_and_validation():
    spec = default_tree(3, 16)
    assert TreeSpec.from_json(spec.to_json()) == spec
    raw = json.loads(spec.to_json())
    raw["trees"]["1"].append([[5, 5], 0])  # deeper than d=1 allows and without a parent
    with pytest.raises(ValueError):
        TreeSpec.from_json(json.dumps(raw))


def test_buffers_mask_positions_and_prompt_rows():
    # root -> a -> b, root -> c; the root carries 2 prompt tokens with 2 virtual tokens each, b carries 1
    buf = TreeBuffers.build(parents=[-1, 0, 1, 0], cand_index=[0, 1, 11, 2], attached=[2, 0, 1, 0], n_virtual=2)
    assert buf.n_nodes == 4 and buf.size == 4 + 2 * 2 + 1 * 2
    assert buf.offsets.tolist()[:4] == [0, 1, 2, 1]
    assert buf.path(2).tolist() == [0, 1, 2]
    # candidates never see prompt tokens, nor nodes off their path
    assert not buf.allow[:4, 4:].any()
    assert buf.allow[2].tolist()[:4] == [True, True, True, False]
    assert buf.allow[3].tolist()[:4] == [True, False, False, True]
    rows = buf.prompt_rows[0]  # [2 prompt tokens, 2 virtual]
    assert rows.shape == (2, 2)
    # prompt token j of the root sits at offset j+1; virtual v of token 2 sees virtual v of token 1 only
    assert buf.offsets[rows[0]].tolist() == [1, 1] and buf.offsets[rows[1]].tolist() == [2, 2]
    r2v0, r1v0, r1v1 = rows[1, 0], rows[0, 0], rows[0, 1]
    assert buf.allow[r2v0, r1v0] and not buf.allow[r2v0, r1v1]
    assert buf.prompt_source[rows[1, 1] - 4].item() == 1 * 2 + 1
    # the prompt token on b sees b's path (root, a, b) but not c
    b_row = buf.prompt_rows[2][0, 0]
    assert buf.allow[b_row].tolist()[:4] == [True, True, True, False]
    assert buf.offsets[b_row].item() == 3


def test_stationary_distribution_solves_the_chain():
    p = np.array([[0.5, 0.5], [0.2, 0.8]])
    pi = stationary(p)
    assert np.allclose(pi @ p, pi) and np.isclose(pi.sum(), 1)
    assert np.allclose(pi, [2 / 7, 5 / 7])


def test_builder_prefers_likely_paths_and_respects_the_budget():
    acc = np.array([[0.6, 0.1] + [0.01] * 8, [0.4, 0.1] + [0.01] * 8, [0.3, 0.1] + [0.01] * 8])
    for budget in (4, 8, 16, 32):
        spec = build_tree(acc, budget)
        spec.validate()
        assert spec.budget <= budget
    small, big = build_tree(acc, 4), build_tree(acc, 32)
    assert expected_tokens_per_step(big, acc) > expected_tokens_per_step(small, acc) > 1.0
    assert ((0,), 0) in small.trees[1] or any(p == (0,) for p, _ in small.trees[1])
    assert expected_tokens_per_step(plain_spec(3), acc) == 1.0


def test_detokenizer_holds_back_a_possible_stop_string():
    class CharTok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    det = _Detokenizer(CharTok(), ("END",))
    sent = ""
    for ch in "abcEN":
        assert not det.add(ord(ch))
        sent += det.flush(False)
    assert sent == "abc"  # "EN" may start "END"
    assert det.add(ord("D"))
    sent += det.flush(True)
    assert sent == "abc"


# ---------------------------------------------------------------- tiny model engine

def random_tokens(model, n_virtual: int = 1, deep: bool = False) -> PromptTokens:
    pt = PromptTokens.init_for(model, 3, n_virtual, how="random", deep=deep)
    if deep:
        with torch.no_grad():
            pt.offsets.normal_(generator=torch.Generator().manual_seed(7))
    return pt


@pytest.mark.parametrize("n_virtual,deep", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_tiny_model_ppd_equals_plain(tiny: LoadedModel, n_virtual: int, deep: bool, penalty: float):
    pt = random_tokens(tiny.model, n_virtual, deep)
    acc = np.array([[0.5, 0.2] + [0.05] * 8] * 3)
    engine = Engine(tiny, pt, build_tree(acc, 12))
    for text in ["hello world", "abcabcabc", "the quick brown fox"]:
        msgs = [{"role": "user", "content": text}]
        plain = [t for c in engine.generate(msgs, Settings(max_new_tokens=40, ppd=False, repetition_penalty=penalty))
                 for t in c.token_ids]
        ppd = [t for c in engine.generate(msgs, Settings(max_new_tokens=40, repetition_penalty=penalty))
               for t in c.token_ids]
        assert ppd == plain and len(plain) >= 10


@pytest.mark.parametrize("deep", [False, True])
def test_engine_guesses_equal_training_student(tiny: LoadedModel, deep: bool):
    """The first step's prompt-token logits (root with N prompt tokens attached) are exactly what
    training optimises: the student rows of one cut at the prompt's last token."""
    from ppd_core.engine import Counters, Session
    from ppd_core.train import student_logits, teacher_pass

    pt = random_tokens(tiny.model, 2, deep)
    engine = Engine(tiny, pt, build_tree(np.array([[0.5, 0.2] + [0.05] * 8] * 3), 12))
    ids = engine.encode([{"role": "user", "content": "steer me"}])
    with torch.inference_mode():
        state = engine._prefill(ids, Session(), Counters())
        engine._step(state, Settings(), None)
        cache, _ = teacher_pass(tiny.model, torch.tensor(ids))
        want = student_logits(tiny.model, pt, cache, [len(ids) - 1])[0]
    torch.testing.assert_close(state.prompt_logits, want, atol=1e-4, rtol=1e-4)


def test_tiny_model_deep_acceptance_with_right_guesses(tiny: LoadedModel):
    """Guesses copied from the plain output are accepted several deep and the output stays the same."""
    pt = PromptTokens.init_for(tiny.model, 3, how="random")
    engine = Engine(tiny, pt, build_tree(np.array([[0.9, 0.05] + [0.001] * 8] * 3), 16))
    msgs = [{"role": "user", "content": "deep acceptance"}]
    plain = [t for c in engine.generate(msgs, Settings(max_new_tokens=60, ppd=False)) for t in c.token_ids]
    full = engine.encode(msgs) + plain

    def guesser(ids: list[int], d: int, k: int) -> torch.Tensor:
        out = torch.full((d, k), 63)
        for j in range(d):
            if len(ids) + j < len(full):
                out[j, 0] = full[len(ids) + j]
        return out

    chunks = list(engine.generate(msgs, Settings(max_new_tokens=60), guesser=guesser))
    assert [t for c in chunks for t in c.token_ids] == plain
    assert chunks[-1].counters.tau > 2.5
    assert max(len(c.token_ids) for c in chunks) == 4  # root + 3 accepted guesses


@pytest.mark.parametrize("ppd", [False, True])
def test_tiny_model_ngram_guesses_are_lossless(tiny: LoadedModel, ppd: bool):
    """A random tiny model loops, so the context source has plenty to copy; output must not change."""
    pt = PromptTokens.init_for(tiny.model, 3, how="random")
    engine = Engine(tiny, pt, build_tree(np.array([[0.5, 0.2] + [0.05] * 8] * 3), 12))
    for text in ["abcabcabcabc", "the quick brown fox jumps over the quick brown dog"]:
        msgs = [{"role": "user", "content": text}]
        plain = [t for c in engine.generate(msgs, Settings(max_new_tokens=60, ppd=False, repetition_penalty=1.0))
                 for t in c.token_ids]
        chunks = list(engine.generate(msgs, Settings(max_new_tokens=60, ppd=ppd, ngram=True)))
        assert [t for c in chunks for t in c.token_ids] == plain
        assert all(p in ("model", "ppd", "ngram") for c in chunks for p in c.provenance)
        if not ppd:
            assert all(p != "ppd" for c in chunks for p in c.provenance)


def test_bench_compares_trees_and_sampling_modes(tiny: LoadedModel, tmp_path):
    from ppd_core.bench import benchmark, markdown_table

    pt = PromptTokens.init_for(tiny.model, 3, how="random")
    acc = np.array([[0.5, 0.2] + [0.05] * 8] * 3)
    engine = Engine(tiny, pt, build_tree(acc, 8))
    prompts = [{"id": "a", "turns": ["hello there", "and again"]}, {"id": "b", "turns": ["abcabc"]}]
    modes = ("hf_generate", "plain", "ppd", "ppd_b2", "ppd_ngram")
    trees = {"ppd_b2": build_tree(acc, 2)}
    report = benchmark(engine, prompts, modes, Settings(max_new_tokens=12), tmp_path / "p.jsonl", trees)
    assert report["identical_to_plain"] == dict.fromkeys(modes, True)
    assert report["tree_budgets"] == {"ppd_b2": trees["ppd_b2"].budget} and engine.tree.budget != 2
    assert set(report["turns"]) == {"1", "2"} and report["modes"]["plain"]["new_tokens"] == 36
    # the copy bound reads plain's own replies: never fewer tokens per step than 1, never slower than plain
    bound = report["copy_bound"]
    assert set(bound) == {"1", "4"} and all(b["tau"] >= 1.0 and b["speedup"] >= 1.0 for b in bound.values())
    sampled = benchmark(engine, prompts, modes, Settings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3),
                        None, trees)
    assert sampled["identical_to_plain"] == {} and sampled["sampling"]["temperature"] == 0.8
    assert sampled["copy_bound"] is None  # a bound on greedy replies only
    assert "n/a (sampling)" in markdown_table(sampled)
    again = benchmark(engine, prompts, ("ppd",), Settings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3))
    assert again["modes"]["ppd"]["new_tokens"] == sampled["modes"]["ppd"]["new_tokens"]  # seeded: reproducible
