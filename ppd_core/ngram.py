"""Guesses from the context: when the last tokens appeared before, guess what followed them then.

Chat copies spans all the time (summarise / rewrite / correct this text, follow-ups that rework an
earlier answer), and there these guesses are long and free. They join the PPD tree as extra chains,
so one forward checks both sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_MATCH = 4  # longest suffix we try to match (tokens)
MAX_CHAIN = 10  # longest chain we propose
MIN_PATH_PROB = 0.12  # stop extending a chain once its estimated acceptance falls below this


@dataclass
class NgramIndex:
    """For each n-gram (n = 1..MAX_MATCH) of the context, where the token after its latest occurrence is."""
    tokens: list[int] = field(default_factory=list)
    follows: dict[tuple[int, ...], int] = field(default_factory=dict)

    def extend(self, new: list[int]) -> None:
        for tok in new:
            p = len(self.tokens)  # position of `tok`
            for n in range(1, MAX_MATCH + 1):
                if p - n >= 0:
                    self.follows[tuple(self.tokens[p - n:p])] = p
            self.tokens.append(tok)

    def continuation(self, max_len: int) -> tuple[list[int], int]:
        """(what followed the longest earlier match of the context's suffix, match length); ([], 0) if none."""
        for n in range(min(MAX_MATCH, len(self.tokens)), 0, -1):
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None:
                return copy_from(self.tokens, start, max_len), n
        return [], 0


@dataclass
class NgramStats:
    """Online acceptance of the n-gram guesses per depth (conditional on the depth above being accepted).

    Kept in the session so the estimates carry over the turns of a conversation.
    """
    tried: list[int] = field(default_factory=lambda: [0] * MAX_CHAIN)
    hit: list[int] = field(default_factory=lambda: [0] * MAX_CHAIN)

    def rate(self, depth: int, match: int) -> float:
        prior = 0.3 + 0.1 * match  # longer matches are more trustworthy before any evidence
        return (self.hit[depth] + 2 * prior) / (self.tried[depth] + 2)

    def chain_length(self, available: int, match: int) -> int:
        """How many of the available guesses are worth a row: while the path probability stays high."""
        prob, length = 1.0, 0
        while length < available:
            prob *= self.rate(length, match)
            if prob < MIN_PATH_PROB:
                break
            length += 1
        return length

    def update(self, proposed: int, accepted: int) -> None:
        for j in range(min(proposed, accepted + 1)):
            self.tried[j] += 1
            self.hit[j] += j < accepted


def copy_from(tokens: list[int], start: int, max_len: int) -> list[int]:
    """`max_len` tokens from `start`, copied like LZ77: past the end of `tokens`, keep copying the copied tokens
    themselves, which extends runs and periodic patterns."""
    out: list[int] = []
    for j in range(start, start + max_len):
        out.append(tokens[j] if j < len(tokens) else out[j - len(tokens)])
    return out


def merge_chain(parents: list[int], tokens: list[int], attached: list[int], chain: list[int]
                ) -> tuple[list[int], list[int], list[int], list[bool]]:
    """Hang `chain` from the root, sharing nodes the tree already has; returns the new node lists and,
    per node, whether it came from the chain (for provenance)."""
    parents, tokens, attached = list(parents), list(tokens), list(attached)
    from_chain = [False] * len(parents)
    children: dict[tuple[int, int], int] = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True))
                                            if i}
    cur = 0
    for tok in chain:
        nxt = children.get((cur, tok))
        if nxt is None:
            nxt = len(parents)
            parents.append(cur)
            tokens.append(tok)
            attached.append(0)
            from_chain.append(True)
            children[(cur, tok)] = nxt
        cur = nxt
    return parents, tokens, attached, from_chain


def copy_bound_steps(context: list[int], reply: list[int], chains: int = 1, max_len: int = MAX_CHAIN) -> int:
    """The fewest decoding steps in which guesses copied from the context could write `reply` (written after
    `context`, as the engine steps: the first step's root is the context's last token). Each step verifies the
    continuations of the `chains` latest earlier occurrences of the longest matching suffixes (the matcher above,
    more than one match allowed), `max_len` tokens each, keeps the longest correct one and pays nothing for the
    rows: an upper bound for this kind of guess source, not a prediction of its speed."""
    if not context or not reply:
        return len(reply)
    full, tokens = list(context) + list(reply), []
    follows: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions of the token after each occurrence
    for tok in full[:len(context)]:
        _index_token(tokens, follows, tok)
    root, steps = len(context) - 1, 0
    while root < len(full) - 1:
        guesses: list[list[int]] = []
        for n in range(min(MAX_MATCH, len(tokens)), 0, -1):
            for start in reversed(follows.get(tuple(tokens[-n:]), [])):
                if len(guesses) == chains:
                    break
                if (out := copy_from(tokens, start, max_len)) not in guesses:
                    guesses.append(out)
        accepted = 0
        for g in guesses:
            a = 0
            while a < len(g) and root + 1 + a < len(full) and g[a] == full[root + 1 + a]:
                a += 1
            accepted = max(accepted, a)
        for tok in full[root + 1:root + 2 + accepted]:
            _index_token(tokens, follows, tok)
        root += accepted + 1
        steps += 1
    return steps


def _index_token(tokens: list[int], follows: dict[tuple[int, ...], list[int]], tok: int) -> None:
    p = len(tokens)
    for n in range(1, MAX_MATCH + 1):
        if p - n >= 0:
            follows.setdefault(tuple(tokens[p - n:p]), []).append(p)
    tokens.append(tok)
