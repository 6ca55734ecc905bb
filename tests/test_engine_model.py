"""Losslessness and behaviour of the engine on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ppd_core.cpu_kernels import SmallBatchLinear, packed_weights
from ppd_core.engine import EarlyPrune, Engine, InputError, Session, Settings
from ppd_core.models import ModelError, load_model
from ppd_core.prompt_tokens import PromptTokenError, PromptTokens
from ppd_core.tree import TreeBuffers, build_tree, default_tree

from .conftest import DEV_PROMPTS, load_prompts

pytestmark = pytest.mark.slow

N_PROMPTS, N_NEW = 12, 128
CHAT = Settings(max_new_tokens=N_NEW, repetition_penalty=1.1)  # the chat's deterministic default


def run(engine: Engine, prompt: str | list[int], settings: Settings, **kw) -> list[int]:
    ids = prompt if isinstance(prompt, list) else engine.encode([{"role": "user", "content": prompt}])
    out: list[int] = []
    for chunk in engine.generate(prompt_ids=ids, settings=settings, **kw):
        out += chunk.token_ids
    return out


def oracle(reference: dict[int, list[int]], p_right: float, seed: int):
    """A guesser that knows the plain output: per depth the right token sits at rank 0 (sometimes 1) with
    probability p_right; every other rank is a random token."""
    rng = random.Random(seed)

    def guesser(ids: list[int], d: int, k: int) -> torch.Tensor:
        full = next(f for f in reference.values() if f[: len(ids)] == ids)
        out = torch.randint(0, 49152, (d, k), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        for j in range(d):
            if len(ids) + j < len(full) and rng.random() < p_right:
                out[j, rng.choice([0, 0, 0, 1])] = full[len(ids) + j]
        return out

    return guesser


def deep_tree():
    """A tree that trusts its guesses (chains 3 deep), so forced-right guesses get accepted deeply."""
    acc = np.array([[0.9, 0.05] + [0.001] * 8] * 3)
    return build_tree(acc, 16)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return load_prompts(DEV_PROMPTS, N_PROMPTS)


@pytest.fixture(scope="module")
def plain_outputs(engine: Engine, prompts: list[str]) -> list[list[int]]:
    return [run(engine, p, Settings(max_new_tokens=N_NEW, ppd=False, repetition_penalty=1.1)) for p in prompts]


# ---------------------------------------------------------------- tree forward = causal forward

def _prefill(engine: Engine, ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=engine.model.config)
    engine.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache


def assert_same_logits(engine: Engine, got: torch.Tensor, want: torch.Tensor) -> None:
    """Tree logits against the model's own causal forward (SDPA prefill: another summation order). In float32 they
    agree to 1e-3. With bf16 matmuls every layer rounds its inputs to 8 bits, so a last-bit difference in the
    attention can move an activation by one bf16 step and the logits by a few tenths (measured: mean 0.10, max
    0.47 over 6 x 49152); a wrong mask or position moves them by whole units. The argmax must agree in both."""
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    diff = (got - want).abs()
    if engine.precision == "float32":
        assert diff.max() < 1e-3
    else:
        assert diff.mean() < 0.25 and diff.max() < 1.5, (diff.mean(), diff.max())


@torch.inference_mode()
def test_chain_tree_reproduces_causal_logits(engine: Engine):
    ids = engine.encode([{"role": "user", "content": "Name three colours."}])
    chain = ids[-6:]
    full = engine.model(input_ids=torch.tensor([ids])).logits[0, -6:].float()
    buf = TreeBuffers.build(parents=[-1, 0, 1, 2, 3, 4], cand_index=list(range(6)), attached=[0] * 6)
    cache = _prefill(engine, ids[:-6])
    embeds = engine.model.get_input_embeddings()(torch.tensor(chain))
    tree = engine._logits(engine._forward(cache, embeds, buf, len(ids) - 6)[0])
    assert_same_logits(engine, tree, full)


@torch.inference_mode()
def test_branching_tree_gives_each_branch_its_own_logits(engine: Engine):
    ids = engine.encode([{"role": "user", "content": "Write a haiku about rain."}])
    a, b = [1000, 2000, 3000], [4000, 5000]
    # root, branch a (3 deep), branch b (2 deep) hanging from the root
    buf = TreeBuffers.build(parents=[-1, 0, 1, 2, 0, 4], cand_index=list(range(6)), attached=[0] * 6)
    tokens = torch.tensor([ids[-1], *a, *b])
    cache = _prefill(engine, ids[:-1])
    tree = engine._logits(engine._forward(cache, engine.model.get_input_embeddings()(tokens), buf, len(ids) - 1)[0])
    alone_a = engine.model(input_ids=torch.tensor([ids + a])).logits[0, -4:].float()
    alone_b = engine.model(input_ids=torch.tensor([ids + b])).logits[0, -3:].float()
    assert_same_logits(engine, tree[[0, 1, 2, 3]], alone_a)
    assert_same_logits(engine, tree[[0, 4, 5]], alone_b)


@torch.inference_mode()
def test_tree_rows_are_bit_identical_to_plain_steps(engine: Engine):
    """On CPU in float32 every kernel a decoding step runs (few-row matmuls, attention over each row's own keys)
    gives a row the same bits alone or inside a tree: PPD is lossless by construction, not only up to ties."""
    if engine.lm.attn_implementation != "cpu_rows":
        pytest.skip(f"bit-identity is a property of the CPU kernels; this model runs {engine.lm.attn_implementation}")
    ids = engine.encode([{"role": "user", "content": "Write a haiku about rain."}])
    a, b = [1000, 2000, 3000], [4000, 5000]
    emb = engine.model.get_input_embeddings()

    def plain_steps(tokens: list[int]) -> torch.Tensor:
        cache, out = _prefill(engine, ids[:-1]), []
        for i, tok in enumerate(tokens):
            hidden, _ = engine._forward(cache, emb(torch.tensor([tok])), engine._plain, len(ids) - 1 + i)
            out.append(engine._logits(hidden))
        return torch.cat(out)

    buf = TreeBuffers.build(parents=[-1, 0, 1, 2, 0, 4], cand_index=list(range(6)), attached=[0] * 6)
    cache = _prefill(engine, ids[:-1])
    hidden, _ = engine._forward(cache, emb(torch.tensor([ids[-1], *a, *b])), buf, len(ids) - 1)
    tree = engine._logits(hidden)
    assert torch.equal(tree[[0, 1, 2, 3]], plain_steps([ids[-1], *a]))
    assert torch.equal(tree[[0, 4, 5]], plain_steps([ids[-1], *b]))


@torch.inference_mode()
def test_default_model_steps_read_its_gguf_blocks_with_the_same_bits(engine: Engine):
    """The default model came as a Q4_1 GGUF (head Q8_0): on CPU in float32 (and bfloat16-avx512) a decoding step
    reads every matrix packed, and a tree step gives the very logits the unpacked weights give."""
    if engine.precision not in ("float32", "bfloat16-avx512") or engine.lm.attn_implementation != "cpu_rows":
        pytest.skip(f"packed GGUF blocks feed the float32 and AVX512_BF16 kernels; this model runs {engine.precision}")
    layers = [m for m in engine.model.modules() if isinstance(m, SmallBatchLinear)]
    assert engine.packed_weights == {"q4_1": 210, "q8_0": 1} and len(layers) == 211
    ids = engine.encode([{"role": "user", "content": "Write a haiku about rain."}])
    emb = engine.model.get_input_embeddings()
    buf = TreeBuffers.build(parents=[-1, 0, 1, 0], cand_index=list(range(4)), attached=[0] * 4)

    def tree_logits() -> torch.Tensor:
        hidden, _ = engine._forward(_prefill(engine, ids[:-1]), emb(torch.tensor([ids[-1], 1000, 2000, 3000])), buf,
                                    len(ids) - 1)
        return engine._logits(hidden)

    packed = tree_logits()
    saved = [(m, m._buffers.pop("qweight")) for m in layers]
    bf16 = engine.precision == "bfloat16-avx512"
    try:
        for m in layers:
            assert m.packed_blocks() is None
            if bf16:  # the same kernel on a dense bf16 copy of the (already bf16-rounded) weights
                m._buffers["packed"] = m.weight.bfloat16()
        assert torch.equal(packed, tree_logits())
    finally:
        for m, q in saved:
            m._buffers["qweight"] = q
            m._buffers.pop("packed", None)
    assert engine.packed_weights == packed_weights(engine.model)


# ---------------------------------------------------------------- PPD output == plain output

def test_plain_engine_matches_hf_generate(engine: Engine, prompts: list[str], plain_outputs: list[list[int]]):
    """transformers' own greedy decoding loop (the bench's `hf_generate`: the prompt split as the engine splits
    it, see there) writes the engine's plain replies token for token."""
    from ppd_core.bench import hf_generate

    for prompt, expected in list(zip(prompts, plain_outputs, strict=False))[:3]:
        ids = engine.encode([{"role": "user", "content": prompt}])
        assert hf_generate(engine, ids, CHAT, lookup=False) == expected


def test_ppd_trained_tokens_equal_plain(engine: Engine, prompts: list[str], plain_outputs: list[list[int]]):
    for prompt, expected in zip(prompts, plain_outputs, strict=True):
        assert run(engine, prompt, CHAT) == expected


def test_full_engine_with_a_dynamic_tree_equals_plain(engine: Engine, prompts: list[str],
                                                      plain_outputs: list[list[int]]):
    """Prompt tokens + n-gram guesses + a tree chosen every step from the guesses' confidence."""
    from dataclasses import replace

    from ppd_core.dynamic import TreeMenu
    from ppd_core.tree import PRIOR_ACCURACY, tree_rows

    trees = {b: build_tree(PRIOR_ACCURACY, b) for b in (2, 4, 8, 16)}
    # about this CPU's cost per row, so that confident steps pick big trees and others small ones
    latency = {(b, d): 0.045 + 0.0012 * tree_rows(spec, d) for b, spec in trees.items() for d in spec.trees}
    fast = Engine(engine.lm, engine.prompt_tokens, engine.tree)
    fast.menu = TreeMenu(trees, latency)
    chosen: list[int] = []
    choose = fast.menu.choose
    fast.menu.choose = lambda a: (lambda r: chosen.append(r[0]) or r)(choose(a))
    for prompt, expected in zip(prompts, plain_outputs, strict=True):
        assert run(fast, prompt, replace(CHAT, ngram=True, dynamic=True)) == expected
    assert len(set(chosen)) >= 2, chosen


@pytest.mark.parametrize("prune", [EarlyPrune(8, 1), EarlyPrune(15, 3)])
def test_early_pruning_equals_plain(engine: Engine, prompts: list[str], plain_outputs: list[list[int]],
                                    prune: EarlyPrune):
    """ProPD's early pruning with prompt tokens + n-gram guesses on the 16-node default tree; the cut at layer 8
    of 30 with the early top-1 is a forced aggressive setting that drops most nodes."""
    from dataclasses import replace

    pruning = Engine(engine.lm, engine.prompt_tokens, default_tree(3))
    pruning.early_prune = prune
    assert pruning.layerwise
    nodes = pruned = accepted = 0
    for prompt, expected in zip(prompts[:4], plain_outputs[:4], strict=True):
        ids = pruning.encode([{"role": "user", "content": prompt}])
        out, last = [], None
        for chunk in pruning.generate(prompt_ids=ids, settings=replace(CHAT, ngram=True, early_prune=True)):
            out += chunk.token_ids
            last = chunk.counters
        assert out == expected
        nodes, pruned, accepted = nodes + last.tree_nodes, pruned + last.pruned_nodes, accepted + last.accepted_guesses
    assert 0 < pruned < nodes and accepted > 0
    if prune.top_k == 1:
        assert pruned > nodes / 2


def test_ppd_random_tokens_equal_plain(lm, prompts: list[str], plain_outputs: list[list[int]]):
    engine = Engine(lm, PromptTokens.init_for(lm.model, 3, how="random", seed=1), default_tree(3))
    # half the prompts: random tokens are rarely accepted, the other equality tests exercise acceptance
    for prompt, expected in zip(prompts[:6], plain_outputs[:6], strict=True):
        assert run(engine, prompt, CHAT) == expected


@pytest.mark.parametrize("p_right", [1.0, 0.6])
def test_ppd_with_forced_guesses_equals_plain(engine: Engine, prompts: list[str], plain_outputs: list[list[int]],
                                              p_right: float):
    """Guesses taken from the known output: deep acceptance and the KV commit are really exercised."""
    refs = {i: engine.encode([{"role": "user", "content": p}]) + out
            for i, (p, out) in enumerate(zip(prompts, plain_outputs, strict=True))}
    guesser = oracle(refs, p_right, seed=7)
    engine = Engine(engine.lm, engine.prompt_tokens, deep_tree())
    taus = []
    for prompt, expected in zip(prompts, plain_outputs, strict=True):
        ids = engine.encode([{"role": "user", "content": prompt}])
        out, last = [], None
        for chunk in engine.generate(prompt_ids=ids, settings=CHAT, guesser=guesser):
            out += chunk.token_ids
            last = chunk.counters
        assert out == expected
        taus.append(last.tau)
    deepest = max(len(path) for nodes in engine.tree.trees.values() for path, _ in nodes)
    assert sum(taus) / len(taus) > (1.5 if p_right == 1.0 else 1.2)
    assert max(taus) <= deepest + 1


def test_ppd_equals_plain_without_repetition_penalty(engine: Engine, prompts: list[str]):
    for prompt in prompts[:5]:
        greedy = Settings(max_new_tokens=64, repetition_penalty=1.0)
        assert run(engine, prompt, greedy) == run(engine, prompt, Settings(max_new_tokens=64, ppd=False,
                                                                           repetition_penalty=1.0))


# ---------------------------------------------------------------- stopping

def test_max_new_tokens_is_exact_even_inside_an_accepted_chunk(engine: Engine, prompts: list[str],
                                                               plain_outputs: list[list[int]]):
    refs = {0: engine.encode([{"role": "user", "content": prompts[0]}]) + plain_outputs[0]}
    engine = Engine(engine.lm, engine.prompt_tokens, deep_tree())
    for n in (1, 2, 5, 17, 33):
        out = run(engine, prompts[0], Settings(max_new_tokens=n, repetition_penalty=1.1),
                  guesser=oracle(refs, 1.0, seed=n))
        assert out == plain_outputs[0][:n]


def test_stop_strings_cut_the_text_exactly(engine: Engine, prompts: list[str], plain_outputs: list[list[int]]):
    text = engine.tokenizer.decode(plain_outputs[1], skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 6]
    for ppd in (False, True):
        chunks = list(engine.generate([{"role": "user", "content": prompts[1]}],
                                      Settings(max_new_tokens=N_NEW, ppd=ppd, repetition_penalty=1.1, stop=(stop,))))
        assert "".join(c.text for c in chunks) == text[: text.index(stop)]
        assert chunks[-1].finish_reason == "stop"


# ---------------------------------------------------------------- sessions, cancellation, counters

def test_cancelled_generation_leaves_engine_and_session_usable(engine: Engine, prompts: list[str],
                                                               plain_outputs: list[list[int]]):
    session = Session()
    msgs = [{"role": "user", "content": prompts[0]}]
    stream = engine.generate(msgs, CHAT, session)
    for _ in range(3):
        next(stream)
    stream.close()
    assert run(engine, prompts[0], CHAT) == plain_outputs[0]
    again = [t for c in engine.generate(msgs, CHAT, session) for t in c.token_ids]
    assert again == plain_outputs[0]


def test_second_turn_prefills_only_new_tokens(engine: Engine):
    session = Session()
    msgs = [{"role": "user", "content": "Give me one word for happy."}]
    chunks = list(engine.generate(msgs, Settings(max_new_tokens=24, repetition_penalty=1.1), session))
    first = chunks[-1].counters
    assert first.prefill_tokens == first.prompt_tokens - 1  # everything but the root
    reply = "".join(c.text for c in chunks)
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And one for sad?"}]
    turn2 = list(engine.generate(msgs, Settings(max_new_tokens=24, repetition_penalty=1.1), session))
    second = turn2[-1].counters
    full = engine.encode(msgs)
    assert second.prompt_tokens == len(full)
    assert second.prefill_tokens < 30 < first.prompt_tokens  # the first turn was not computed again
    # and reusing the cache does not change the answer
    assert [t for c in turn2 for t in c.token_ids] == run(engine, full, Settings(max_new_tokens=24,
                                                                                 repetition_penalty=1.1))


def test_counters_and_provenance(engine: Engine, prompts: list[str]):
    chunks = list(engine.generate([{"role": "user", "content": prompts[2]}], Settings(max_new_tokens=40)))
    last = chunks[-1].counters
    assert last.new_tokens == sum(len(c.token_ids) for c in chunks) == 40
    assert last.forward_passes == len(chunks)
    assert all(len(c.provenance) == len(c.token_ids) for c in chunks)
    assert last.accepted_guesses == sum(p == "ppd" for c in chunks for p in c.provenance)
    assert last.tau == pytest.approx(40 / last.forward_passes)
    assert last.tokens_per_s > 0 and last.peak_memory_mb > 0
    plain = list(engine.generate([{"role": "user", "content": prompts[2]}], Settings(max_new_tokens=40, ppd=False)))
    assert plain[-1].counters.tau == 1.0
    assert all(p == "model" for c in plain for p in c.provenance)


# ---------------------------------------------------------------- bad input

def test_bad_input_gives_clear_errors_and_engine_stays_usable(engine: Engine, lm, tmp_path):
    with pytest.raises(InputError, match="empty"):
        list(engine.generate([{"role": "user", "content": "   "}]))
    with pytest.raises(InputError, match="context"):
        list(engine.generate([{"role": "user", "content": "word " * (engine.max_context + 10)}]))
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        load_model(str(tmp_path))
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=9, num_key_value_heads=3))
    PromptTokens.init_for(other, 3).save(tmp_path / "other.safetensors", base_model="tiny-llama")
    with pytest.raises(PromptTokenError, match="another model"):
        PromptTokens.load(tmp_path / "other.safetensors", lm.model)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(PromptTokenError, match="not a valid"):
        PromptTokens.load(tmp_path / "corrupt.safetensors", lm.model)
    out = run(engine, "Say hi.", Settings(max_new_tokens=8))
    assert len(out) > 0


# ---------------------------------------------------------------- n-gram guesses (copy-heavy chat)

@pytest.mark.parametrize(("ppd", "ngram"), [(False, True), (True, True)])
def test_ngram_guesses_equal_plain_on_copy_heavy_prompts(engine: Engine, ppd: bool, ngram: bool):
    from ppd_core.bench import load_prompt_file
    from ppd_core.runtime import ASSETS

    rows = load_prompt_file(ASSETS / "bench" / "copy_heavy.jsonl")
    accepted_ngram = 0
    for row in rows[:4] + rows[14:16]:  # single-turn edits, then two-turn reworks
        plain_session, fast_session, messages = Session(), Session(), []
        for user in row["turns"]:
            messages.append({"role": "user", "content": user})
            plain = run(engine, engine.encode(messages), Settings(max_new_tokens=64, ppd=False,
                                                                  repetition_penalty=1.1), session=plain_session)
            chunks = list(engine.generate(messages, Settings(max_new_tokens=64, ppd=ppd, ngram=ngram,
                                                             repetition_penalty=1.1), fast_session))
            assert [t for c in chunks for t in c.token_ids] == plain
            accepted_ngram += chunks[-1].counters.accepted_ngram
            messages.append({"role": "assistant", "content": "".join(c.text for c in chunks)})
    assert accepted_ngram > 20  # the context source really contributed


# ---------------------------------------------------------------- sampling

N_SAMPLES = 1200


def _ocean_sampling_setup(engine: Engine):
    """Prompt ids, the chat preset, the exact joint distribution of the first two tokens (enumerated with
    transformers' processors) and a guesser that proposes that distribution's most likely tokens."""
    from .test_sampling import hf_probs

    preset = Settings(max_new_tokens=2, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    ids = engine.encode([{"role": "user", "content": "Give me one word that describes the ocean."}])
    exact: dict[tuple[int, ...], float] = {}
    p2_after: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        p1 = hf_probs(ids, engine.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), preset)
        for t1 in p1.nonzero().flatten().tolist():
            p2 = hf_probs(ids + [t1], engine.model(input_ids=torch.tensor([ids + [t1]])).logits[0, -1].double(),
                          preset)
            p2_after[t1] = p2
            for t2 in p2.nonzero().flatten().tolist():
                exact[(t1, t2)] = float(p1[t1] * p2[t2])

    def guesses(p: torch.Tensor, k: int) -> torch.Tensor:  # the most likely token, then impossible ones
        return torch.cat([p.argmax()[None], (p == 0).nonzero().flatten()[: k - 1]])

    def guesser(ctx: list[int], d: int, k: int) -> torch.Tensor:
        first = p1 if len(ctx) == len(ids) else p2_after.get(ctx[-1], p1)
        after = p2_after.get(int(first.argmax()), p1)
        return torch.stack([guesses(first, k)] + [guesses(after, k)] * (d - 1))[:d]

    return ids, preset, exact, guesser


def _sample_counts(engine: Engine, ids: list[int], preset: Settings, guesser, ppd: bool) -> tuple[dict, int]:
    session, counts, with_accepted_guess = Session(), {}, 0
    for seed in range(N_SAMPLES):
        chunks = list(engine.generate(prompt_ids=ids, session=session, guesser=guesser if ppd else None,
                                      settings=Settings(**{**preset.__dict__, "ppd": ppd, "seed": seed})))
        out = tuple(t for ch in chunks for t in ch.token_ids)
        counts[out] = counts.get(out, 0) + 1
        with_accepted_guess += bool(ppd and chunks[-1].counters.accepted_guesses)
    return counts, with_accepted_guess


def test_ppd_sampling_matches_plain_sampling_on_the_real_model(engine: Engine):
    """Joint distribution of the first two sampled tokens (chat preset: temperature 0.7, top-p 0.9,
    repetition penalty 1.1), PPD on and off, each against the exact distribution enumerated with
    transformers' processors, and against each other.

    PPD runs with guesses made from that exact distribution (its most likely token per position), so that
    many draws go through acceptance and many through rejection and the residual draw: the test then has
    power on exactly the code that could bias the distribution."""
    from .test_sampling import ALPHA, chi_square_p, two_sample_p

    ids, preset, exact, guesser = _ocean_sampling_setup(engine)
    counts = {}
    for ppd in (False, True):
        counts[ppd], with_accepted_guess = _sample_counts(engine, ids, preset, guesser, ppd)
        assert chi_square_p(counts[ppd], exact, N_SAMPLES) > ALPHA
    # many PPD draws went through an accepted guess, and many through rejection and the residual draw
    assert N_SAMPLES // 10 < with_accepted_guess < N_SAMPLES - N_SAMPLES // 10
    assert two_sample_p(Counter(counts[False]), Counter(counts[True])) > ALPHA


def test_typical_acceptance_fails_the_real_model_test(engine: Engine, monkeypatch):
    """The negative control on the real model: Medusa's typical acceptance in place of rejection sampling
    changes the distribution, and the same test with the same samples says so."""
    from .test_sampling import ALPHA, chi_square_p, typical_acceptance

    ids, preset, exact, guesser = _ocean_sampling_setup(engine)
    monkeypatch.setattr(Engine, "_verify_sampled", staticmethod(typical_acceptance))
    counts, _ = _sample_counts(engine, ids, preset, guesser, ppd=True)
    assert chi_square_p(counts, exact, N_SAMPLES) < ALPHA
