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
                # copy like LZ77: past the end of the context, keep copying the guessed tokens
                # themselves, which extends runs and periodic patterns
                out: list[int] = []
                for j in range(start, start + max_len):
                    out.append(self.tokens[j] if j < len(self.tokens) else out[j - len(self.tokens)])
                return out, n
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
