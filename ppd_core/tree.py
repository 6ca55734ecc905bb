"""Token trees: the JSON spec, the builder, and the buffers one decoding step needs.

A spec holds one tree per `d`, the number of prompt-token guesses available this step (0..N).
Each node is a path of ranks, e.g. (0, 2) = "rank 0 of prompt token 1's top-k, then rank 2 of
prompt token 2's", plus how many prompt tokens ride on that node so that, if verification stops
there, the next step has guesses again. The root is the path ().
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import torch

Path_ = tuple[int, ...]


@dataclass(frozen=True)
class TreeSpec:
    n_tokens: int  # N prompt tokens
    top_k: int  # candidates per depth
    trees: dict[int, list[tuple[Path_, int]]]  # d -> [(path, prompt tokens attached)], root first
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def budget(self) -> int:
        """Largest number of rows a step adds besides the root."""
        return max(len(nodes) - 1 + sum(n for _, n in nodes) for nodes in self.trees.values())

    def to_json(self) -> str:
        trees = {str(d): [[list(p), n] for p, n in nodes] for d, nodes in self.trees.items()}
        return json.dumps({"n_tokens": self.n_tokens, "top_k": self.top_k, "trees": trees, "meta": self.meta})

    @classmethod
    def from_json(cls, text: str) -> TreeSpec:
        raw = json.loads(text)
        trees = {int(d): [(tuple(p), int(n)) for p, n in nodes] for d, nodes in raw["trees"].items()}
        spec = cls(int(raw["n_tokens"]), int(raw["top_k"]), trees, raw.get("meta", {}))
        spec.validate()
        return spec

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> TreeSpec:
        return cls.from_json(Path(path).read_text())

    def validate(self) -> None:
        for d in range(self.n_tokens + 1):
            if d not in self.trees:
                raise ValueError(f"tree spec has no tree for d={d}")
            nodes = self.trees[d]
            paths = {p for p, _ in nodes}
            if nodes[0][0] != () or len(paths) != len(nodes):
                raise ValueError(f"tree d={d}: root must come first and paths must be unique")
            for p, n in nodes:
                if len(p) > d or any(not 0 <= r < self.top_k for r in p) or not 0 <= n <= self.n_tokens:
                    raise ValueError(f"tree d={d}: bad node {p} with {n} prompt tokens")
                if p and p[:-1] not in paths:
                    raise ValueError(f"tree d={d}: node {p} has no parent")


def plain_spec(n_tokens: int = 0) -> TreeSpec:
    """No guesses: plain decoding through the same step (root only)."""
    return TreeSpec(n_tokens, 1, {d: [((), 0)] for d in range(n_tokens + 1)})


# ---------------------------------------------------------------- builder (stage 1 of calibration)

def _best_paths(acc: np.ndarray, depth: int, size: int) -> list[tuple[Path_, float]]:
    """The `size` most probable non-root paths of length <= depth (prefix-closed, as P falls along a path)."""
    top_k = acc.shape[1]
    scored = []
    for length in range(1, depth + 1):
        for ranks in product(range(min(top_k, 12)), repeat=length):
            scored.append((ranks, float(np.prod([acc[i, r] for i, r in enumerate(ranks)]))))
    scored.sort(key=lambda x: (-x[1], len(x[0]), x[0]))
    chosen: list[tuple[Path_, float]] = []
    have: set[Path_] = {()}
    for ranks, prob in scored:
        if len(chosen) == size:
            break
        if ranks[:-1] in have:
            chosen.append((ranks, prob))
            have.add(ranks)
    return chosen


def _stop_probs(paths: list[tuple[Path_, float]]) -> dict[Path_, float]:
    """q(c): probability that verification stops exactly at node c."""
    prob = {(): 1.0, **dict(paths)}
    q = dict(prob)
    for p, pr in paths:
        q[p[:-1]] -= pr
    return q


def stationary(transitions: np.ndarray) -> np.ndarray:
    """Stationary distribution of a row-stochastic matrix (least squares with sum = 1)."""
    n = transitions.shape[0]
    a = np.vstack([transitions.T - np.eye(n), np.ones((1, n))])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0].clip(min=0)
    return pi / pi.sum()


def steady_state(spec: TreeSpec, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pi, value): how often each tree d is active in the long run, and E[accepted guesses | tree d].

    Which tree runs next depends on how many prompt tokens ride on the node where verification
    stops, so the active d follows a Markov chain whose transition d -> k sums the stop
    probabilities of the nodes carrying k prompt tokens.
    """
    n = spec.n_tokens
    value = np.zeros(n + 1)
    trans = np.zeros((n + 1, n + 1))
    for d, nodes in spec.trees.items():
        paths = [(p, float(np.prod([acc[i, r] for i, r in enumerate(p)]))) for p, _ in nodes[1:]]
        value[d] = sum(pr for _, pr in paths)
        attached = dict(nodes)
        for p, q in _stop_probs(paths).items():
            trans[d, attached[p]] += q
    return stationary(trans), value


def expected_tokens_per_step(spec: TreeSpec, acc: np.ndarray) -> float:
    """Tokens per forward pass in steady state: 1 + sum_d pi_d * E[accepted | tree d]."""
    pi, value = steady_state(spec, acc)
    return 1.0 + float(pi @ value)


def tree_rows(spec: TreeSpec, d: int, n_virtual: int = 1) -> int:
    """Rows of tree d in one forward: nodes + attached prompt tokens (x m virtual each)."""
    nodes = spec.trees[d]
    return len(nodes) + n_virtual * sum(n for _, n in nodes)


def build_tree(acc: np.ndarray, budget: int, n_tokens: int | None = None) -> TreeSpec:
    """Best tree within `budget` rows (candidates + attached prompt tokens, root excluded).

    acc[i, r] = P(rank r of prompt token i+1 is right | path above is right). For each d the rows
    are split between candidates and prompt tokens; prompt tokens go, one at a time, where they add
    most expected acceptance next step (stop probability x value of one more depth). The split is
    chosen by the steady-state tokens per step over the chain of which d is active.
    """
    n = acc.shape[0] if n_tokens is None else n_tokens
    top_k = acc.shape[1]

    def tree_for(d: int, n_cand: int, value: np.ndarray) -> list[tuple[Path_, int]]:
        paths = _best_paths(acc, d, n_cand) if d else []
        q = _stop_probs(paths)
        attached = {p: 0 for p in q}
        for _ in range(budget - len(paths)):
            gains = {p: q[p] * (value[k + 1] - value[k]) for p, k in attached.items() if k < n}
            if not gains:
                break
            best = max(gains, key=lambda p: (gains[p], -len(p)))
            if gains[best] <= 0 and attached[best] > 0:
                break
            attached[best] += 1
        return [((), attached[()])] + [(p, attached[p]) for p, _ in paths]

    # V(d): expected accepted tokens from d guesses with all rows spent on candidates (first guess)
    value = np.array([0.0] + [sum(pr for _, pr in _best_paths(acc, d, budget // 2)) for d in range(1, n + 1)])
    trees: dict[int, list] = {d: tree_for(d, min(budget // 2, _max_paths(d, top_k)), value) for d in range(n + 1)}
    best_score = expected_tokens_per_step(TreeSpec(n, top_k, trees), acc)
    for _ in range(2):  # coordinate search over the candidate/prompt split of each tree
        for d in range(1, n + 1):
            for n_cand in sorted({max(1, budget * f // 8) for f in range(1, 8)} | {budget}):
                if n_cand > _max_paths(d, top_k):
                    continue
                trial = {**trees, d: tree_for(d, n_cand, value)}
                score = expected_tokens_per_step(TreeSpec(n, top_k, trial), acc)
                if score > best_score + 1e-9:
                    trees, best_score = trial, score
        value = np.array([sum(float(np.prod([acc[i, r] for i, r in enumerate(p)])) for p, _ in trees[d][1:])
                          for d in range(n + 1)])
    return TreeSpec(n, top_k, trees, meta={"budget": budget, "expected_tau": round(best_score, 4)})


def _max_paths(d: int, top_k: int) -> int:
    return sum(min(top_k, 12) ** length for length in range(1, d + 1))


# Per-rank accuracies assumed before calibration: the shape measured in the feasibility run
# (top-1 20/9/7 %, top-10 54/36/30 % for the tokens 2/3/4 ahead).
PRIOR_ACCURACY = np.array([
    [0.20, 0.08, 0.05, 0.04, 0.035, 0.03, 0.025, 0.025, 0.02, 0.02],
    [0.09, 0.05, 0.04, 0.03, 0.03, 0.025, 0.025, 0.02, 0.02, 0.02],
    [0.07, 0.04, 0.03, 0.03, 0.025, 0.02, 0.02, 0.02, 0.015, 0.015],
])


def default_tree(n_tokens: int = 3, budget: int = 16) -> TreeSpec:
    acc = PRIOR_ACCURACY[:n_tokens]
    return build_tree(acc, budget)


# ---------------------------------------------------------------- buffers

@dataclass(frozen=True)
class TreeBuffers:
    """Everything a step needs for one tree shape, built once.

    Rows are ordered [nodes (root first, parents before children), prompt-token rows].
    """
    parents: torch.Tensor  # [n_nodes] parent node index, -1 for the root
    depth: torch.Tensor  # [n_nodes]
    ancestors: torch.Tensor  # [n_nodes, n_nodes] bool: column is on the row's path (self included)
    cand_index: torch.Tensor  # [n_nodes] index into [root, topk(pl_1), ..., topk(pl_d)]
    prompt_source: torch.Tensor  # [n_prompt_rows] row of PromptTokens.embeddings for each prompt row
    prompt_rows: list[torch.Tensor]  # per node: [n_attached, m] rows whose logits give next guesses
    allow: torch.Tensor  # [T, T] bool: row may attend to column
    offsets: torch.Tensor  # [T] position relative to the root
    attached: list[int]  # per node: prompt tokens riding on it
    owner: torch.Tensor  # [T] node each row belongs to (a node row: itself; a prompt row: its node)

    @property
    def n_nodes(self) -> int:
        return self.parents.shape[0]

    @property
    def size(self) -> int:
        return self.allow.shape[0]

    def path(self, node: int) -> torch.Tensor:
        """Node indices from the root to `node`, in depth order."""
        return self.ancestors[node].nonzero().flatten()  # parents precede children

    @classmethod
    def build(cls, parents: list[int], cand_index: list[int], attached: list[int], n_virtual: int = 1,
              device: torch.device | str = "cpu") -> TreeBuffers:
        n_nodes = len(parents)
        depth = [0] * n_nodes
        anc = torch.zeros(n_nodes, n_nodes, dtype=torch.bool)
        for i, p in enumerate(parents):
            if i and not 0 <= p < i:
                raise ValueError("parents must precede children")
            anc[i] = anc[p] if i else anc[i]
            anc[i, i] = True
            depth[i] = depth[p] + 1 if i else 0
        # prompt rows: (node, j, v); virtual token v of prompt token j sees the node's path and the
        # earlier prompt tokens j' < j of the same node and ensemble member v
        rows: list[tuple[int, int, int]] = [(c, j, v) for c in range(n_nodes) for j in range(attached[c])
                                            for v in range(n_virtual)]
        t = n_nodes + len(rows)
        allow = torch.zeros(t, t, dtype=torch.bool)
        allow[:n_nodes, :n_nodes] = anc
        offsets = torch.tensor(depth + [depth[c] + j + 1 for c, j, _ in rows])
        index = {r: n_nodes + k for k, r in enumerate(rows)}
        prompt_rows = [torch.tensor([[index[(c, j, v)] for v in range(n_virtual)] for j in range(attached[c])],
                                    dtype=torch.long).reshape(attached[c], n_virtual) for c in range(n_nodes)]
        for (c, j, v), row in index.items():
            allow[row, :n_nodes] = anc[c]
            for jj in range(j + 1):
                allow[row, index[(c, jj, v)]] = True
        return cls(
            parents=torch.tensor(parents, device=device),
            depth=torch.tensor(depth, device=device),
            ancestors=anc.to(device),
            cand_index=torch.tensor(cand_index, device=device),
            prompt_source=torch.tensor([j * n_virtual + v for _, j, v in rows], dtype=torch.long, device=device),
            prompt_rows=[r.to(device) for r in prompt_rows],
            allow=allow.to(device),
            offsets=offsets.to(device),
            attached=list(attached),
            owner=torch.tensor(list(range(n_nodes)) + [c for c, _, _ in rows], dtype=torch.long, device=device),
        )

    def subtree(self, keep: list[int], n_virtual: int = 1) -> TreeBuffers:
        """The tree of the kept nodes (each kept with its whole path), renumbered in the same order; rows come
        in the order the kept rows had in this tree, so a forward over those rows matches it row for row."""
        new = {old: i for i, old in enumerate(keep)}
        parents = self.parents.tolist()
        return TreeBuffers.build([new[parents[c]] if i else -1 for i, c in enumerate(keep)], list(range(len(keep))),
                                 [self.attached[c] for c in keep], n_virtual, self.parents.device)

    @classmethod
    def from_spec(cls, spec: TreeSpec, d: int, n_virtual: int = 1, device: torch.device | str = "cpu"
                  ) -> TreeBuffers:
        nodes = spec.trees[d]
        where = {p: i for i, (p, _) in enumerate(nodes)}
        parents = [where[p[:-1]] if p else -1 for p, _ in nodes]
        cand = [1 + (len(p) - 1) * spec.top_k + p[-1] if p else 0 for p, _ in nodes]
        return cls.build(parents, cand, [n for _, n in nodes], n_virtual, device)
