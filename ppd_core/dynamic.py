"""A tree sized every step (ProPD's dynamic tree, DESIGN §4).

Calibration timed one decoding step of a menu of trees (the best tree of each row budget B, with a
tree for every number d of guesses available). Each step, the prompt tokens' own probabilities for
their candidates, corrected online by how often candidates of that confidence were really accepted,
give every menu tree's expected accepted guesses; the tree with the most expected tokens per second
(1 + expected) / step time runs. Confident steps get a big tree, hopeless ones a minimal one.
Choosing the tree only decides which candidates get verified, so the output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TreeBuffers, TreeSpec

# buckets of a candidate's own probability q; acceptance is calibrated per (depth, bucket)
CONFIDENCE_EDGES = torch.tensor([0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8], dtype=torch.float64)
PRIOR_WEIGHT = 2.0  # pseudo-hits of the prior "q is calibrated"; evidence takes over after a few hits
MAX_ACCEPT = 0.97


@dataclass
class AcceptanceStats:
    """Per depth and confidence bucket: candidates tried (their parent was accepted), hits, and the sum
    of their q (hits expected if q were calibrated). Kept in the session: it carries over turns."""
    tried: torch.Tensor
    hit: torch.Tensor
    expected: torch.Tensor

    @classmethod
    def empty(cls, n_tokens: int) -> AcceptanceStats:
        z = torch.zeros(n_tokens, len(CONFIDENCE_EDGES) + 1, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def acceptance(self, q: torch.Tensor) -> torch.Tensor:
        """q [d, k] (candidate probabilities per depth) -> estimated P(accepted | parent accepted)."""
        d = q.shape[0]
        bucket = torch.bucketize(q, CONFIDENCE_EDGES)
        ratio = (self.hit[:d] + PRIOR_WEIGHT) / (self.expected[:d] + PRIOR_WEIGHT)
        return (q * ratio.gather(1, bucket)).clamp(max=MAX_ACCEPT)

    def update(self, q_nodes: torch.Tensor, depth: torch.Tensor, reached: torch.Tensor, hit: torch.Tensor) -> None:
        """One step's evidence: per candidate node its q, depth (1..), whether its parent was accepted
        (only then was it really tested) and whether it was accepted itself."""
        q, i = q_nodes[reached], depth[reached] - 1
        flat = i * self.tried.shape[1] + torch.bucketize(q, CONFIDENCE_EDGES)
        self.tried.view(-1).index_add_(0, flat, torch.ones_like(q))
        self.hit.view(-1).index_add_(0, flat, hit[reached].to(q.dtype))
        self.expected.view(-1).index_add_(0, flat, q)

    def table(self) -> list[list[tuple[int, float, float]]]:
        """Per depth, per bucket: (tried, hit rate, mean q) -- what the calibration has learnt."""
        return [[(int(t), float(h / t) if t else 0.0, float(e / t) if t else 0.0)
                 for t, h, e in zip(tr, hi, ex, strict=True)]
                for tr, hi, ex in zip(self.tried, self.hit, self.expected, strict=True)]


@dataclass(frozen=True)
class _MenuForD:
    buffers: list[TreeBuffers]  # one per menu tree
    ranks: torch.Tensor  # [all candidate nodes of all trees, d]: rank per depth, k past the node's depth
    owner: torch.Tensor  # [all candidate nodes]: which menu tree the node belongs to
    seconds: torch.Tensor  # [trees] calibrated step time


class TreeMenu:
    """The trees a step may choose from, with their calibrated step times."""

    def __init__(self, trees: dict[int, TreeSpec], step_seconds: dict[tuple[int, int], float], n_virtual: int = 1,
                 device: torch.device | str = "cpu"):
        top_k = {spec.top_k for spec in trees.values()}
        if len(top_k) != 1 or not trees:
            raise ValueError("menu trees must share one top-k")
        self.top_k = top_k.pop()
        self.budgets = sorted(trees)
        n_tokens = trees[self.budgets[0]].n_tokens
        self.by_d: dict[int, _MenuForD] = {}
        for d in range(1, n_tokens + 1):
            buffers, ranks, owner = [], [], []
            for t, b in enumerate(self.budgets):
                nodes = trees[b].trees[d]
                buffers.append(TreeBuffers.from_spec(trees[b], d, n_virtual, device))
                for path, _ in nodes[1:]:
                    ranks.append(list(path) + [self.top_k] * (d - len(path)))
                    owner.append(t)
            self.by_d[d] = _MenuForD(buffers, torch.tensor(ranks, dtype=torch.long).reshape(-1, d),
                                     torch.tensor(owner, dtype=torch.long),
                                     torch.tensor([step_seconds[(b, d)] for b in self.budgets], dtype=torch.float64))

    def choose(self, accept: torch.Tensor) -> tuple[int, TreeBuffers]:
        """accept [d, top_k]: estimated acceptance of each candidate -> (budget, buffers) of the tree with the
        most expected tokens per second this step."""
        d = accept.shape[0]
        menu = self.by_d[d]
        ext = torch.cat([accept, torch.ones(d, 1, dtype=accept.dtype)], dim=1)  # column k: "no node at this depth"
        path_prob = ext.gather(1, menu.ranks.T).prod(0)  # P(every node on the path accepted)
        expected = torch.zeros(len(self.budgets), dtype=accept.dtype).index_add_(0, menu.owner, path_prob)
        best = int(torch.argmax((1.0 + expected) / menu.seconds))
        return self.budgets[best], menu.buffers[best]
