"""Lossless sampling: PPD-on sampling has exactly the distribution of plain sampling.

The reference distributions come from transformers' own logits processors, not from the engine.
Every test is seeded and deterministic; the significance level is ALPHA. A negative control
(Medusa-style typical acceptance) shows the same test detects a biased sampler.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ppd_core.engine import Engine, InputError, Settings, sampling_probs
from ppd_core.models import LoadedModel
from ppd_core.prompt_tokens import PromptTokens
from ppd_core.tree import TreeBuffers, build_tree

from .conftest import TinyTokenizer

ALPHA = 1e-3  # a correct sampler fails a test with this probability (for one fixed seed set: never)
PROMPT = [1, 5, 3, 7, 2]
STEPS = 3  # joint distribution of the first STEPS generated tokens


def hf_probs(ids: list[int], logits: torch.Tensor, s: Settings) -> torch.Tensor:
    """Sampling distribution by transformers' processors: penalty, temperature, top-k, top-p, min-p."""
    x = torch.tensor([ids])
    scores = logits[None].clone()
    procs = [RepetitionPenaltyLogitsProcessor(s.repetition_penalty), TemperatureLogitsWarper(s.temperature)]
    if s.top_k:
        procs.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        procs.append(TopPLogitsWarper(s.top_p))
    if s.min_p:
        procs.append(MinPLogitsWarper(s.min_p))
    for proc in procs:
        scores = proc(x, scores)
    return torch.softmax(scores, -1)[0]


def chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """Goodness-of-fit p-value, cells with expected count < 5 pooled (chi2 sf via the incomplete gamma)."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0.0, 0.0, 0
    for cell, p in probs.items():
        exp, obs = p * n, counts.get(cell, 0)
        if exp >= 5:
            stat += (obs - exp) ** 2 / exp
            cells += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
    pooled_obs += sum(c for cell, c in counts.items() if cell not in probs)
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    dof = cells - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def two_sample_p(a: Counter, b: Counter) -> float:
    """Chi-square test of homogeneity of two samples (cells with a small pooled count merged)."""
    n_a, n_b = sum(a.values()), sum(b.values())
    cells = [c for c in set(a) | set(b) if a[c] + b[c] >= 10]
    rest = (n_a - sum(a[c] for c in cells), n_b - sum(b[c] for c in cells))
    rows = [(a[c], b[c]) for c in cells] + ([rest] if sum(rest) else [])
    stat = 0.0
    for oa, ob in rows:
        tot = oa + ob
        ea, eb = tot * n_a / (n_a + n_b), tot * n_b / (n_a + n_b)
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    dof = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# ---------------------------------------------------------------- the warpers

@pytest.mark.parametrize("s", [
    Settings(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
    Settings(temperature=1.3, top_k=5),
    Settings(temperature=0.5, min_p=0.2),
    Settings(temperature=1.0, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
])
def test_sampling_probs_match_transformers(s: Settings):
    gen = torch.Generator().manual_seed(0)
    ids = [3, 9, 9, 40]
    for _ in range(5):
        logits = torch.randn(64, generator=gen) * 3
        seen = torch.zeros(64, dtype=torch.bool)
        seen[ids] = True
        p = s.repetition_penalty
        processed = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        torch.testing.assert_close(sampling_probs(processed[None], s)[0], hf_probs(ids, logits, s))


def test_bad_sampling_settings_are_refused():
    for bad in (Settings(temperature=-1), Settings(temperature=1, top_p=0), Settings(temperature=1, min_p=1)):
        with pytest.raises(InputError):
            bad.validate()


# ---------------------------------------------------------------- exact distribution, tiny model

@pytest.fixture(scope="module")
def peaked() -> LoadedModel:
    """A tiny random Llama with a 12-token vocabulary and sharpened outputs, so that guesses get accepted."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    model.generation_config.eos_token_id = None
    return LoadedModel(model, NoEosTokenizer(), "peaked", torch.device("cpu"), model.dtype, "sdpa", None, 0.0)


class NoEosTokenizer(TinyTokenizer):
    eos_token_id = None  # every reply has exactly STEPS tokens


SETTINGS = Settings(max_new_tokens=STEPS, temperature=0.8, top_p=0.95, repetition_penalty=1.2)


def exact_joint(lm: LoadedModel, s: Settings) -> dict[tuple[int, ...], float]:
    """P(first STEPS tokens) under plain sampling, enumerated with transformers' processors."""
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == STEPS:
            out[prefix] = prob
            return
        ids = PROMPT + list(prefix)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        p = hf_probs(ids, logits, s)
        for tok in range(p.shape[0]):
            if p[tok] > 0:
                walk((*prefix, tok), prob * float(p[tok]))

    walk((), 1.0)
    return out


def greedy_guesser(lm: LoadedModel):
    """Guesses that are often right: the top-k of the model's own next-token distributions along its
    greedy continuation (a stand-in for well-trained prompt tokens)."""
    def guess(ids: list[int], d: int, k: int) -> torch.Tensor:
        rows, ctx = [], list(ids)
        for _ in range(d + 1):
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ctx])).logits[0, -1]
            top = torch.topk(logits, k).indices
            rows.append(top)
            ctx.append(int(top[0]))
        return torch.stack(rows[1:])  # row j: the token j + 2 ahead
    return guess


def sample_counts(engine: Engine, s: Settings, n: int, ppd: bool, guesser=None) -> tuple[Counter, float]:
    counts: Counter = Counter()
    tokens = forwards = 0
    for seed in range(n):
        chunks = list(engine.generate(prompt_ids=PROMPT, settings=Settings(**{**s.__dict__, "seed": seed, "ppd": ppd}),
                                      guesser=guesser))
        counts[tuple(t for c in chunks for t in c.token_ids)] += 1
        tokens += chunks[-1].counters.new_tokens
        forwards += chunks[-1].counters.forward_passes
    return counts, tokens / forwards


def typical_acceptance(buf: TreeBuffers, node_tokens, node_logits, settings, rng):
    """Medusa's typical acceptance (the negative control): accept a guess whose probability clears an
    entropy-dependent threshold, deterministically. Fast, but it changes the output distribution."""
    parents, tokens = buf.parents.tolist(), node_tokens.tolist()
    node = 0
    while True:
        p = sampling_probs(node_logits[node:node + 1], settings)[0].double()
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum())
        threshold = min(0.3, 0.09 * math.exp(-entropy))
        nxt = next((c for c in range(1, len(parents)) if parents[c] == node and p[tokens[c]] > threshold), None)
        if nxt is None:
            return node, int(torch.multinomial(p, 1, generator=rng))
        node = nxt


@pytest.fixture(scope="module")
def sampled(peaked: LoadedModel):
    pt = PromptTokens.init_for(peaked.model, 3, how="random")
    engine = Engine(peaked, pt, build_tree(np.array([[0.6, 0.2, 0.1] + [0.01] * 7] * 3), 10))
    exact = exact_joint(peaked, SETTINGS)
    assert sum(exact.values()) == pytest.approx(1.0)
    return engine, exact


N_TINY = 3000


def test_plain_sampling_matches_the_exact_distribution(sampled):
    engine, exact = sampled
    counts, tau = sample_counts(engine, SETTINGS, N_TINY, ppd=False)
    assert tau == 1.0
    assert chi_square_p(counts, exact, N_TINY) > ALPHA


def test_ppd_sampling_matches_the_exact_distribution(sampled, peaked):
    engine, exact = sampled
    counts, tau = sample_counts(engine, SETTINGS, N_TINY, ppd=True, guesser=greedy_guesser(peaked))
    assert tau > 1.15  # guesses really were accepted (at most 1.5 here: 3 tokens, the first step has no guesses)
    assert chi_square_p(counts, exact, N_TINY) > ALPHA


def test_typical_acceptance_fails_the_same_test(sampled, peaked, monkeypatch):
    engine, exact = sampled
    monkeypatch.setattr(Engine, "_verify_sampled", staticmethod(typical_acceptance))
    counts, tau = sample_counts(engine, SETTINGS, N_TINY, ppd=True, guesser=greedy_guesser(peaked))
    assert tau > 1.15
    assert chi_square_p(counts, exact, N_TINY) < ALPHA


def test_a_seed_makes_a_reply_reproducible(sampled, peaked):
    engine, _ = sampled
    s = Settings(**{**SETTINGS.__dict__, "max_new_tokens": 20})
    runs = [[t for c in engine.generate(prompt_ids=PROMPT, settings=Settings(**{**s.__dict__, "seed": seed}))
             for t in c.token_ids] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_exact_enumeration_is_itself_right(peaked):
    """Sanity of the oracle: with temperature -> greedy-like sharpness the mass sits on the greedy path."""
    sharp = Settings(temperature=0.05)
    exact = exact_joint(peaked, sharp)
    greedy = [t for c in Engine(peaked, None).generate(prompt_ids=PROMPT, settings=Settings(max_new_tokens=STEPS,
                                                                                             ppd=False))
              for t in c.token_ids]
    assert exact[tuple(greedy)] > 0.9
