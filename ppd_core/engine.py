"""The decoding engine: plain and Parallel Prompt Decoding through one streaming API.

One step = one forward of the stock model over [root, candidate nodes, attached prompt tokens]
with a 4-D additive mask and explicit positions. The cache always holds the committed tokens
*before* the root; the root (already chosen) is the first row of every step. Plain decoding is
the same step with a tree that is just the root, so both modes share every line that matters for
losslessness: the logits processing, the argmax and the commit.

A prompt is prefilled up to its last token; that token is the first root (with N prompt tokens
attached in PPD mode, which yields the first guesses).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import psutil
import torch
from transformers import DynamicCache

from .cpu_kernels import linear_rows, packed_weights, precision
from .dynamic import AcceptanceStats, TreeMenu
from .kv_cache import GrowingLayer, growing_cache
from .models import LoadedModel, eos_ids
from .ngram import MAX_CHAIN, NgramIndex, NgramStats, merge_chain
from .prompt_tokens import PromptTokens
from .tree import TreeBuffers, TreeSpec, plain_spec

PREFILL_CHUNK = 512
MAX_CACHED_SHAPES = 4096  # cached per-step tree buffers per engine (each a few KB)
# decoders whose forward is embeddings -> rotary -> layers -> norm, with nothing else (Gemma scales its embeddings,
# others add sliding-window masks): the ones early pruning may walk layer by layer
LAYERWISE_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class InputError(ValueError):
    """Bad user input (empty message, prompt longer than the context, bad settings)."""


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    ppd: bool = True  # guesses from the trained prompt tokens
    ngram: bool = False  # guesses copied from the context (prompt, earlier turns, the reply so far)
    dynamic: bool = False  # size the tree every step from the guesses' confidence (needs a calibrated menu)
    early_prune: bool = False  # drop unlikely nodes halfway through the layers (where the engine has a setting)
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    # sampling: temperature 0 = greedy (deterministic); otherwise top-k, top-p and min-p apply, in
    # that order (as in transformers), to every node's own distribution
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # same seed, same settings, same mode -> same reply

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if self.repetition_penalty <= 0:
            raise InputError("repetition_penalty must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p < 1:
            raise InputError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and 0 <= min_p < 1")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def penalise(logits: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty on the logits of tokens already seen (as transformers applies it)."""
    return torch.where(logits < 0, logits * penalty, logits / penalty)


def sampling_probs(logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Processed logits [R, V] -> the sampling distribution [R, V]: temperature, top-k, top-p, min-p."""
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        # drop a token when the tokens strictly more likely already cover top_p (the first always stays).
        # The nucleus is found among the top 256, growing only if needed: sorting the whole vocabulary
        # cost ~4 ms per node here, more than a third of a step's non-matmul time.
        k = min(256, probs.shape[-1])
        while True:
            top_probs, order = torch.topk(probs, k, dim=-1)  # sorted, most likely first
            before = top_probs.cumsum(-1) - top_probs
            if k == probs.shape[-1] or bool((before[:, -1] >= settings.top_p).all()):
                break  # every token past the k-th is dropped too
            k = min(4 * k, probs.shape[-1])
        probs = torch.zeros_like(probs).scatter(-1, order, top_probs.masked_fill(before >= settings.top_p, 0.0))
    if settings.min_p > 0:
        probs = probs.masked_fill(probs < settings.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


@dataclass(frozen=True)
class EarlyPrune:
    """ProPD's early pruning: after `layer` decoder layers, the LM head on that layer's (normalised) state
    predicts each node's next token; a child survives only if its token is among its parent's `top_k`
    predictions, and the remaining layers run on the survivors (and their prompt tokens) only. Pruning
    only removes candidates, so the output is unchanged."""
    layer: int
    top_k: int


@dataclass
class Counters:
    """Running figures of one generation; the UI and the benchmark read these."""
    new_tokens: int = 0
    forward_passes: int = 0  # decoding forwards; the prefill of all but the last prompt token is separate
    accepted_guesses: int = 0  # tokens that came from accepted guesses (any source)
    accepted_ngram: int = 0  # of which guessed by the n-gram source
    tree_nodes: int = 0  # candidate nodes in the trees (root excluded), over all forward passes
    pruned_nodes: int = 0  # of which early pruning dropped before the last layer
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the session cache)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_memory_mb: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tau(self) -> float:
        """Acceptance length: new tokens per decoding forward pass (1.0 for plain decoding)."""
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s, "tau": self.tau}


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the last chunk
    token_ids: list[int]
    provenance: list[str]  # per token: "model" (the model's own next token) or the source of an
    # accepted guess: "ppd" (prompt tokens) or "ngram" (copied from the context)
    counters: Counters
    finish_reason: str | None = None  # "eos", "stop", "length" on the last chunk


@dataclass
class Session:
    """A conversation's KV cache, reused by its next turn. Not shared between threads."""
    cache: DynamicCache | None = None
    cached_ids: list[int] = field(default_factory=list)  # tokens whose keys/values are in `cache`
    ngram_stats: NgramStats = field(default_factory=NgramStats)  # how well context guesses do here
    acceptance: AcceptanceStats | None = None  # how well prompt-token guesses of each confidence do here

    def reset(self) -> None:
        self.cache, self.cached_ids, self.ngram_stats, self.acceptance = None, [], NgramStats(), None


# Overrides the candidate tokens: (committed ids incl. root, d, top_k) -> LongTensor [d, top_k].
Guesser = Callable[[list[int], int, int], torch.Tensor]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


class Engine:
    def __init__(self, lm: LoadedModel, prompt_tokens: PromptTokens | None = None, tree: TreeSpec | None = None):
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.prompt_tokens = prompt_tokens
        self.device = lm.model.get_input_embeddings().weight.device
        self.dtype = lm.model.get_input_embeddings().weight.dtype  # of the activations and the KV cache
        self.precision = precision(lm.model)  # of the matmuls too: "float32", "bfloat16-amx", ...
        self.packed_weights = packed_weights(lm.model)  # matrices read as exact GGUF blocks, by kind
        self.max_context = int(getattr(lm.model.config, "max_position_embeddings", 2048))
        self.eos_ids = eos_ids(lm.model, lm.tokenizer)
        # the decoder stack and the LM head of the stock model, called separately (see _logits)
        self.decoder, self.head = lm.model.get_decoder(), lm.model.get_output_embeddings()
        self.logit_scale = getattr(lm.model.config, "logit_scale", None)  # read once, not every step
        self.softcap = getattr(lm.model.config, "final_logit_softcapping", None)
        self.calibration: dict | None = None  # the calibration report when the tree came from calibration
        self.menu: TreeMenu | None = None  # trees with calibrated step times, for Settings.dynamic
        self._shapes: dict[tuple, TreeBuffers] = {}  # per-step tree shapes seen so far (see _buffers_for)
        # early pruning walks the decoder's own layers one by one, which we do for decoders built like Llama's
        # (embeddings in, rotary embeddings, layers, final norm); tests check it equals the stock forward
        self.layerwise = all(hasattr(self.decoder, a) for a in ("layers", "rotary_emb", "norm")) and (
            lm.model.config.model_type in LAYERWISE_MODEL_TYPES)
        self.early_prune: EarlyPrune | None = None  # set by calibration where it pays, for Settings.early_prune
        n = prompt_tokens.n_tokens if prompt_tokens is not None else 0
        self.set_tree(tree if tree is not None else plain_spec(n))
        self._plain = TreeBuffers.from_spec(plain_spec(0), 0, device=self.device)

    def set_tree(self, tree: TreeSpec) -> None:
        n = self.prompt_tokens.n_tokens if self.prompt_tokens is not None else 0
        if tree.n_tokens != n:
            raise ValueError(f"tree is for {tree.n_tokens} prompt tokens, the engine has {n}")
        tree.validate()
        m = self.prompt_tokens.n_virtual if self.prompt_tokens is not None else 1
        self.tree = tree
        self._buffers = {d: TreeBuffers.from_spec(tree, d, m, self.device) for d in tree.trees}

    @property
    def parameter_overhead(self) -> float:
        """Prompt-token parameters / model parameters."""
        if self.prompt_tokens is None:
            return 0.0
        return self.prompt_tokens.num_parameters / sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ input

    def encode(self, messages: list[dict]) -> list[int]:
        """Chat messages -> prompt ids ending with the assistant header."""
        if not messages or not str(messages[-1].get("content", "")).strip():
            raise InputError("the message is empty")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    # ------------------------------------------------------------------ the step

    def _forward(self, cache: DynamicCache, embeds: torch.Tensor, buf: TreeBuffers, past: int,
                 prune: EarlyPrune | None = None, node_tokens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states of the tree rows, with their keys/values appended to `cache`; and, when early
        pruning dropped rows, which rows survived (the hidden states are theirs only), else None.

        Logits are computed afterwards (`_logits`) in one pass over the LM head.
        """
        rows = embeds.shape[0]
        positions = past + buf.offsets
        if rows == 1:  # plain step: causal attention needs no mask
            out = self.decoder(inputs_embeds=embeds[None], position_ids=positions[None], past_key_values=cache,
                               use_cache=True)
            return out.last_hidden_state[0], None
        allow = buf.allow
        mask = torch.zeros(1, 1, allow.shape[0], past + allow.shape[0], dtype=self.dtype, device=self.device)
        mask[0, 0, :, past:].masked_fill_(~allow, torch.finfo(self.dtype).min)
        if self.layerwise:  # the decoder's layers called here: deep offsets added in the loop, no per-step hooks
            return self._forward_layers(cache, embeds, buf, past, mask, positions,
                                        prune if buf.n_nodes > 1 else None, node_tokens)
        prompt_rows = torch.arange(buf.n_nodes, rows, device=self.device)
        with self.prompt_tokens.steering(self.model, prompt_rows, buf.prompt_source) if prompt_rows.numel() \
                else nullcontext():
            out = self.decoder(inputs_embeds=embeds[None], attention_mask=mask, position_ids=positions[None],
                               past_key_values=cache, use_cache=True)
        return out.last_hidden_state[0], None

    def _forward_layers(self, cache: DynamicCache, embeds: torch.Tensor, buf: TreeBuffers, past: int,
                        mask: torch.Tensor, positions: torch.Tensor, prune: EarlyPrune | None,
                        node_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's own forward, written out layer by layer (rotary embeddings, layers, norm), with the deep
        prompt tokens' offsets added between layers (registering 29 hooks per step cost ~0.4 ms here). With
        `prune`, the nodes the early predictor rules out are dropped after `prune.layer` layers, with their
        subtrees and prompt tokens: layers before the cut keep every row's keys/values, later layers the
        survivors', and the survivors' rows are returned too (None without pruning)."""
        dec = self.decoder
        h, pos, n = embeds[None], positions[None], buf.n_nodes
        rotary = dec.rotary_emb(h, pos)
        # the deep prompt tokens' per-layer offsets (steering), gathered once a step; prompt rows are the
        # trailing rows (from `first_prompt`), so a layer's offsets are one in-place add on that slice
        steer = self._steering(buf.prompt_source, h.dtype)
        first_prompt = n
        kept = torch.arange(h.shape[1], device=self.device)
        for i, layer in enumerate(dec.layers):
            if prune is not None and i == prune.layer:
                kept = self._early_survivors(dec.norm(h[0, :n]), buf, node_tokens, prune.top_k)
                h, pos, rotary = h[:, kept], pos[:, kept], tuple(x[:, kept] for x in rotary)
                cols = torch.cat([torch.arange(past, device=self.device), past + kept])
                mask = mask[:, :, kept][..., cols]
                first_prompt = int((kept < n).sum())
                steer = self._steering(buf.prompt_source[kept[first_prompt:] - n], h.dtype)
            if i and steer is not None:
                h[:, first_prompt:].add_(steer[i - 1])
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=pos, past_key_values=cache,
                      use_cache=True)
        return dec.norm(h)[0], kept if prune is not None else None

    def _steering(self, source: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
        """Per layer 1.., the deep offsets [R, H] of the prompt rows whose embeddings are `source`; None if none."""
        offsets = self.prompt_tokens.offsets if self.prompt_tokens is not None else None
        if offsets is None or not source.numel():
            return None
        return offsets[:, source].to(dtype).unbind(0)

    def _early_survivors(self, early_hidden: torch.Tensor, buf: TreeBuffers, node_tokens: torch.Tensor,
                         top_k: int) -> torch.Tensor:
        """Rows to keep: nodes whose every ancestor's token is in its parent's early top-k, and their prompt rows."""
        top = self._logits(early_hidden).topk(min(top_k, self.model.config.vocab_size), dim=-1).indices
        likely = torch.ones(buf.n_nodes, dtype=torch.bool, device=self.device)
        likely[1:] = (top[buf.parents[1:]] == node_tokens[1:, None]).any(-1)
        keep = ~(buf.ancestors & ~likely).any(-1)
        return keep[buf.owner].nonzero().flatten()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's LM head on some rows, in float32, through the same few-row matmul as the decoder
        (on CPU: 49152x576 head, 9 rows, 7.7 ms vs MKL's 11.4 ms), in both modes."""
        logits = linear_rows(self.head, hidden).float()
        if self.logit_scale:  # Cohere
            logits = logits * self.logit_scale
        if self.softcap:  # Gemma 2
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _process(self, logits: torch.Tensor, seen: torch.Tensor, path_tokens: torch.Tensor,
                 ancestors: torch.Tensor, settings: Settings) -> torch.Tensor:
        """Deterministic logits processing per node, on that node's own context (in place).

        seen: [V] bool, tokens in the committed context (root included). A node's context adds
        the tokens on its path (ancestors x path_tokens). Only the penalised columns are touched:
        two passes over every node's full vocabulary row cost ~3.7 ms a step for a 9-node tree.
        """
        p = settings.repetition_penalty
        if p == 1.0:
            return logits
        cols = seen.nonzero().flatten()
        sub = logits[:, cols]
        logits[:, cols] = penalise(sub, p)
        rows, at = ancestors.nonzero(as_tuple=True)
        toks = path_tokens[at]
        new = ~seen[toks]  # path tokens not already penalised as context, each (row, token) once
        flat = torch.unique(rows[new] * logits.shape[1] + toks[new])
        if flat.numel():
            rows, toks = flat // logits.shape[1], flat % logits.shape[1]
            logits[rows, toks] = penalise(logits[rows, toks], p)
        return logits

    def _step(self, state: _State, settings: Settings, guesser: Guesser | None,
              buffers: dict[int, TreeBuffers] | None = None) -> tuple[list[int], list[str]]:
        """One forward: returns the tokens it emits (accepted guesses + next root) and their provenance.

        `buffers` overrides the engine's tree (calibration times whole steps of candidate trees)."""
        pl = state.prompt_logits
        use_ppd = settings.ppd and self.prompt_tokens is not None
        d = pl.shape[0] if (use_ppd and pl is not None) else 0
        buf = (buffers or self._buffers)[d] if use_ppd else self._plain
        dynamic = settings.dynamic and d > 0 and self.menu is not None and buffers is None
        table = [torch.tensor([state.root], device=self.device)]
        if d:
            k = self.menu.top_k if dynamic else self.tree.top_k
            guesses = guesser([*state.ids, state.root], d, k) if guesser else torch.topk(pl, k, dim=-1).indices
            guesses = guesses.to(self.device)
            table.append(guesses.reshape(-1))
            if dynamic:  # the candidates' own probabilities -> this step's tree
                q = (pl.gather(1, guesses) - pl.logsumexp(-1, keepdim=True)).exp().to("cpu", torch.float64)
                _, buf = self.menu.choose(state.acceptance.acceptance(q))
        node_tokens = torch.cat(table)[buf.cand_index]
        static = buf  # the prompt-token tree, before any n-gram chain joins it
        from_chain, chain_nodes = [False] * buf.n_nodes, []
        if state.ngram is not None:
            buf, node_tokens, from_chain, chain_nodes = self._add_ngram_chain(state, buf, node_tokens)
        embeds = self.model.get_input_embeddings()(node_tokens)
        if buf.prompt_source.numel():
            embeds = torch.cat([embeds, self.prompt_tokens.embeddings[buf.prompt_source].to(embeds.dtype)])
        past = state.cache.get_seq_length()
        prune = self.early_prune if (settings.early_prune and self.layerwise and buffers is None) else None
        hidden, kept = self._forward(state.cache, embeds, buf, past, prune, node_tokens)
        # verification runs on the nodes that reached the last layer: all of them, or early pruning's survivors
        tree, tokens, survivors = buf, node_tokens, None
        if kept is not None:
            survivors = kept[kept < buf.n_nodes]
            tree, tokens = self._subtree(buf, survivors), node_tokens[survivors]

        # one pass over the LM head for the nodes and every prompt-token row: the head is read from
        # memory once (a second pass for the winning node's prompt rows cost ~10 ms here)
        logits = self._logits(hidden)
        node_logits = self._process(logits[:tree.n_nodes], state.seen, tokens, tree.ancestors, settings)
        if settings.sampling:
            best, next_token = self._verify_sampled(tree, tokens, node_logits, settings, state.rng)
        else:
            pred = node_logits.argmax(-1)
            ok = torch.ones(tree.n_nodes, dtype=torch.bool, device=self.device)
            if tree.n_nodes > 1:
                ok[1:] = tokens[1:] == pred[tree.parents[1:]]
            path_ok = ~(tree.ancestors & ~ok).any(-1)
            # deepest fully accepted node; argmax takes the first of equals
            best = int(torch.argmax(torch.where(path_ok, tree.depth, -1)))
            next_token = int(pred[best])
        rows = tree.prompt_rows[best]  # [attached, m]: the next step's guesses
        state.prompt_logits = (logits[rows.flatten()].view(*rows.shape, -1).mean(1)
                               if (use_ppd and rows.numel()) else None)
        path = tree.path(best)
        if survivors is None:
            self._commit(state.cache, past, path, hidden.shape[0])
        else:  # layers before the cut hold every row, later ones the survivors' only
            path, late = survivors[path], path  # `path` in this step's full tree again
            self._commit(state.cache, past, path, buf.size, (prune.layer, late))

        if dynamic:
            self._learn_acceptance(state.acceptance, static, q, path)
        accepted = path[1:].tolist()
        if chain_nodes:
            state.ngram_stats.update(len(chain_nodes), len(set(accepted) & set(chain_nodes)))
        provenance = ["ngram" if from_chain[i] else "ppd" for i in accepted] + ["model"]
        state.tree_nodes, state.pruned_nodes = buf.n_nodes - 1, buf.n_nodes - tree.n_nodes
        return node_tokens[path[1:]].tolist() + [next_token], provenance

    def _buffers_for(self, key: tuple, build: Callable[[int], TreeBuffers]) -> TreeBuffers:
        """Tree buffers built per step (tree + n-gram chain, pruned subtrees), cached by shape: building them costs
        ~0.5 ms of Python and a conversation reuses a few dozen shapes. `build` gets m (virtual tokens)."""
        buf = self._shapes.get(key)
        if buf is None:
            if len(self._shapes) >= MAX_CACHED_SHAPES:
                self._shapes.clear()
            buf = self._shapes[key] = build(self.prompt_tokens.n_virtual if self.prompt_tokens is not None else 1)
        return buf

    def _subtree(self, buf: TreeBuffers, survivors: torch.Tensor) -> TreeBuffers:
        key = ("pruned", tuple(buf.parents.tolist()), tuple(buf.attached), tuple(survivors.tolist()))
        return self._buffers_for(key, lambda m: buf.subtree(survivors.tolist(), m))

    @staticmethod
    def _learn_acceptance(stats: AcceptanceStats, buf: TreeBuffers, q: torch.Tensor, path: torch.Tensor) -> None:
        """Which of this step's prompt-token candidates were tested (parent accepted) and accepted."""
        n = buf.n_nodes
        if n == 1:
            return
        on_path = torch.zeros(n, dtype=torch.bool)
        on_path[path[path < n].cpu()] = True  # chain-only nodes (index >= n) are the n-gram source's business
        parents, cand = buf.parents[1:].cpu(), buf.cand_index[1:].cpu()
        q_nodes = torch.cat([q.new_ones(1), q.flatten()])[cand]
        stats.update(q_nodes, buf.depth[1:].cpu(), on_path[parents], on_path[1:])

    @staticmethod
    def _verify_sampled(buf: TreeBuffers, node_tokens: torch.Tensor, node_logits: torch.Tensor, settings: Settings,
                        rng: torch.Generator) -> tuple[int, int]:
        """Recursive rejection sampling down the tree: (last accepted node, the token sampled after it).

        Every guess is a point-mass draft (a deterministic top-k or n-gram candidate), so child x of
        node u is accepted with probability p_u(x); on rejection x is removed from p_u, which is
        renormalised, and the next child is tried; when no child is accepted the next token is drawn
        from what is left of p_u. The emitted tokens then follow exactly the distribution of plain
        sampling (the SpecInfer / EAGLE argument), so PPD stays a pure speed switch. Only the nodes
        the walk visits get their distribution computed.
        """
        parents, tokens = buf.parents.tolist(), node_tokens.tolist()
        children: list[list[int]] = [[] for _ in parents]
        for child, parent in enumerate(parents[1:], start=1):
            children[parent].append(child)
        node = 0
        while True:
            probs = sampling_probs(node_logits[node:node + 1], settings)[0]
            # work on the support only (top-p / top-k leave a few dozen tokens of 49k): drawing from the
            # whole vocabulary cost ~1.2 ms per node
            support = probs.nonzero().flatten()
            residual = probs[support].to("cpu", torch.float64)
            support = support.cpu()  # ascending: a child's place in it is found by binary search
            kids = torch.tensor([tokens[c] for c in children[node]], dtype=support.dtype)
            places = torch.searchsorted(support, kids).clamp(max=support.numel() - 1).tolist()
            for child, tok, at in zip(children[node], kids.tolist(), places, strict=True):
                if int(support[at]) != tok:
                    continue  # outside the support: probability 0, nothing to remove
                p = float(residual[at]) / float(residual.sum())
                if p > 0 and (p >= 1.0 or float(torch.rand((), generator=rng, dtype=torch.float64)) < p):
                    node = child
                    break
                residual[at] = 0.0
            else:
                return node, int(support[torch.multinomial(residual, 1, generator=rng)])

    def _add_ngram_chain(self, state: _State, buf: TreeBuffers, node_tokens: torch.Tensor
                         ) -> tuple[TreeBuffers, torch.Tensor, list[bool], list[int]]:
        """Hang the context's continuation guess from the root of this step's tree (shared prefixes merged)."""
        avail, match = state.ngram.continuation(MAX_CHAIN)
        chain = avail[: state.ngram_stats.chain_length(len(avail), match)]
        if not chain:
            return buf, node_tokens, [False] * buf.n_nodes, []
        parents, tokens, attached, from_chain = merge_chain(buf.parents.tolist(), node_tokens.tolist(),
                                                            buf.attached, chain)
        merged = self._buffers_for(("chain", tuple(parents), tuple(attached)), lambda m: TreeBuffers.build(
            parents, list(range(len(tokens))), attached, m, self.device))
        # the chain's own nodes (shared or new), root excluded, in depth order
        chain_nodes, cur = [], 0
        for tok in chain:
            cur = next(i for i in range(1, len(tokens)) if parents[i] == cur and tokens[i] == tok)
            chain_nodes.append(cur)
        return merged, torch.tensor(tokens, device=self.device), from_chain, chain_nodes

    @staticmethod
    def _commit(cache: DynamicCache, past: int, path: torch.Tensor, rows: int,
                late: tuple[int, torch.Tensor] | None = None) -> None:
        """Keep the cache entries of the accepted path (moved next to the prefix), drop the rest.

        `path`: the path's rows in this step's input; with early pruning, `late` = (cut layer, the path's
        rows among the survivors), which is what the layers from the cut on hold."""
        n = path.shape[0]
        if n == rows and n == 1:  # plain step: the one new entry is already in place
            return
        def placement(rows_of_path: torch.Tensor) -> tuple[int, torch.Tensor]:
            # nodes are stored parents first, so the path's head is often in place already (always the root):
            # move only the rest (copying every layer's whole path cost ~2 ms per step here)
            moved = (rows_of_path != torch.arange(n, device=rows_of_path.device)).nonzero()
            first = int(moved[0]) if moved.numel() else n
            return first, past + rows_of_path[first:]

        before_cut = placement(path)
        cut, after_cut = (late[0], placement(late[1])) if late is not None else (len(cache.layers), before_cut)
        for i, layer in enumerate(cache.layers):
            first, keep = before_cut if i < cut else after_cut
            if first < n:
                for kv in (layer.keys, layer.values):
                    kv[..., past + first:past + n, :] = kv[..., keep, :]  # the gather copies before writing
            if isinstance(layer, GrowingLayer):
                layer.keep(past + n)
            else:
                layer.keys, layer.values = layer.keys[..., : past + n, :], layer.values[..., : past + n, :]

    # ------------------------------------------------------------------ the API

    def generate(self, messages: list[dict] | None = None, settings: Settings | None = None,
                 session: Session | None = None, *, prompt_ids: list[int] | None = None,
                 guesser: Guesser | None = None) -> Iterator[Chunk]:
        """Stream a reply. Give chat `messages` (or raw `prompt_ids`); pass a `session` to reuse
        its KV cache across turns. Closing the iterator stops decoding; the session stays usable."""
        settings = settings or Settings()
        settings.validate()
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(messages or [])
        if not ids:
            raise InputError("the prompt is empty")
        room = self.max_context - len(ids) - 1 - (self.tree.budget if settings.ppd else 0)
        if room < 1:
            raise InputError(f"the prompt is {len(ids)} tokens; this model's context holds {self.max_context}. "
                             "Shorten the message or start a new chat.")
        max_new = min(settings.max_new_tokens, room)
        session = session if session is not None else Session()
        with torch.inference_mode():
            yield from self._generate(ids, settings, max_new, session, guesser)

    def _generate(self, ids: list[int], settings: Settings, max_new: int, session: Session,
                  guesser: Guesser | None) -> Iterator[Chunk]:
        counters = Counters(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        state = self._prefill(ids, session, counters)
        state.ngram_stats = session.ngram_stats
        if settings.dynamic and self.prompt_tokens is not None:
            if session.acceptance is None or session.acceptance.tried.shape[0] != self.prompt_tokens.n_tokens:
                session.acceptance = AcceptanceStats.empty(self.prompt_tokens.n_tokens)
            state.acceptance = session.acceptance
        if settings.ngram:
            state.ngram = NgramIndex()
            state.ngram.extend(ids)
        counters.prefill_s = time.perf_counter() - t0
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        state.rng = torch.Generator(device="cpu").manual_seed(seed)  # CPU: the walk draws on the host
        detok = _Detokenizer(self.tokenizer, settings.stop)
        finish = None
        try:
            while finish is None:
                t = time.perf_counter()
                new, sources = self._step(state, settings, guesser)
                counters.forward_passes += 1
                counters.tree_nodes += state.tree_nodes
                counters.pruned_nodes += state.pruned_nodes
                if state.ngram is not None:
                    state.ngram.extend(new)
                out_ids, prov = [], []
                for tok, source in zip(new, sources, strict=True):
                    state.ids.append(state.root)  # the old root is now committed context
                    state.root = tok
                    state.seen[tok] = True
                    if tok in self.eos_ids:
                        finish = "eos"
                        break
                    out_ids.append(tok)
                    prov.append(source)
                    if detok.add(tok):
                        finish = "stop"
                        break
                    if counters.new_tokens + len(out_ids) >= max_new:
                        finish = "length"
                        break
                counters.new_tokens += len(out_ids)
                counters.accepted_guesses += sum(p != "model" for p in prov)
                counters.accepted_ngram += sum(p == "ngram" for p in prov)
                session.cached_ids = state.ids[: state.cache.get_seq_length()]
                counters.peak_memory_mb = max(counters.peak_memory_mb, _peak_memory_mb(self.device))
                counters.decode_s += time.perf_counter() - t
                yield Chunk(detok.flush(finish is not None), out_ids, prov, replace(counters), finish)
        except BaseException:
            if finish is None:  # cancelled or failed mid-reply: keep only what the cache really holds
                session.cached_ids = state.ids[: state.cache.get_seq_length()]
            raise

    def _prefill(self, ids: list[int], session: Session, counters: Counters) -> _State:
        """Reuse the session's cache for the longest common prefix; compute the rest but the last token."""
        if session.cache is None:
            session.cache = growing_cache(self.model.config)
            session.cached_ids = []
        cache = session.cache
        common = 0
        for a, b in zip(session.cached_ids, ids[:-1], strict=False):
            if a != b:
                break
            common += 1
        if cache.get_seq_length() > common:
            cache.crop(common - cache.get_seq_length())
        session.cached_ids = ids[:common]  # true even if the prefill below is interrupted
        todo = ids[common:-1]
        for start in range(0, len(todo), PREFILL_CHUNK):
            chunk = torch.tensor([todo[start:start + PREFILL_CHUNK]], device=self.device)
            pos = torch.arange(common + start, common + start + chunk.shape[1], device=self.device)
            self.model(input_ids=chunk, position_ids=pos[None], past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
        counters.prefill_tokens = len(todo)
        session.cached_ids = ids[:-1]
        seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        seen[torch.tensor(ids, device=self.device)] = True
        # the first step has the last prompt token as root and, in PPD mode, N prompt tokens attached
        return _State(ids=ids[:-1], root=ids[-1], cache=cache, seen=seen, prompt_logits=None)


@dataclass
class _State:
    ids: list[int]  # committed tokens (in the cache), root excluded
    root: int
    cache: DynamicCache
    seen: torch.Tensor  # [V] bool: tokens in ids + root, for the repetition penalty
    prompt_logits: torch.Tensor | None  # [d, V] guesses for the tokens after the root
    ngram: NgramIndex | None = None  # the context (ids + root), indexed for continuation guesses
    ngram_stats: NgramStats | None = None
    acceptance: AcceptanceStats | None = None
    rng: torch.Generator | None = None  # sampling draws, seeded per reply
    tree_nodes: int = 0  # candidate nodes in the last step's tree
    pruned_nodes: int = 0  # of which early pruning dropped


class _Detokenizer:
    """Incremental decoding that never splits a multi-byte character, and stop-string detection."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, tok: int) -> bool:
        """Append a token; True if the text now contains a stop string (the text is cut before it)."""
        self.ids.append(tok)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s, self.sent)  # text before `sent` holds no stop string (flush held it back)
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def flush(self, final: bool) -> str:
        """The text not sent yet, holding back an unfinished character or a possible stop-string start."""
        text = self.text
        if not final:
            text = text.rstrip("\ufffd")
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new
