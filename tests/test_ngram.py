"""The context (n-gram) guess source: matching edge cases and merging into the tree."""

from __future__ import annotations

from ppd_core.ngram import MAX_MATCH, NgramIndex, NgramStats, copy_bound_steps, merge_chain


def index(tokens: list[int]) -> NgramIndex:
    idx = NgramIndex()
    idx.extend(tokens)
    return idx


def test_no_match_gives_no_guess():
    assert index([1, 2, 3, 4]).continuation(5) == ([], 0)
    assert index([]).continuation(5) == ([], 0)
    assert index([7]).continuation(5) == ([], 0)


def test_longest_and_latest_match_wins():
    # suffix (2, 3) occurred twice; the later occurrence (followed by 9) wins; longer beats shorter
    idx = index([1, 2, 3, 4, 5, 2, 3, 9, 8, 7, 2, 3])
    assert idx.continuation(3) == ([9, 8, 7], 2)
    idx = index([5, 2, 3, 6, 1, 3, 4, 1, 5, 2, 3])  # (5, 2, 3) matches at the start: 3 tokens
    assert idx.continuation(2) == ([6, 1], 3)


def test_match_at_the_very_end_gives_what_exists():
    idx = index([4, 5, 6, 4, 5])  # (4, 5) was followed by 6; past the end the copy repeats the pattern
    assert idx.continuation(7) == ([6, 4, 5, 6, 4, 5, 6], 2)


def test_repeated_tokens():
    idx = index([3, 3, 3, 3, 3])
    chain, n = idx.continuation(4)
    assert n == MAX_MATCH and chain == [3, 3, 3, 3]  # a run continues
    idx.extend([7])
    assert idx.continuation(4) == ([], 0)  # 7 never occurred before


def test_matches_across_turns():
    turn1 = [10, 11, 12, 13, 14, 15]
    idx = index(turn1 + [99, 98])  # turn 2 starts with other tokens
    idx.extend([12, 13])
    assert idx.continuation(3) == ([14, 15, 99], 2)


def test_stats_learn_from_acceptance():
    stats = NgramStats()
    start = stats.chain_length(10, 2)
    for _ in range(20):
        stats.update(proposed=6, accepted=6)
    assert stats.chain_length(10, 2) > start
    for _ in range(300):
        stats.update(proposed=6, accepted=0)
    assert stats.chain_length(10, 2) == 0  # the first guess is almost never right: propose none


def test_merge_shares_existing_nodes():
    # tree: root(0) -> 5 (1) -> 6 (2); root -> 7 (3)
    parents, tokens, attached, from_chain = merge_chain([-1, 0, 1, 0], [100, 5, 6, 7], [3, 1, 0, 0], [5, 8, 9])
    assert parents == [-1, 0, 1, 0, 1, 4] and tokens == [100, 5, 6, 7, 8, 9]
    assert from_chain == [False, False, False, False, True, True]
    assert attached == [3, 1, 0, 0, 0, 0]


def test_copy_bound_counts_the_fewest_steps_copying_could_take():
    # a reply that repeats the context: one step finds nothing to match after the context's last token (6),
    # the next copies the rest ([2, 3, 4, 5] accepted, 6 from the model): 6 tokens in 2 steps
    assert copy_bound_steps([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]) == 2
    assert copy_bound_steps([1, 2, 3], [9, 8, 7]) == 3  # nothing to copy: one step a token
    assert copy_bound_steps([1, 2, 3], []) == 0
    # (1, 2) was followed by 3 and, later, by 4: the latest match alone guesses 4 and misses (the step writes 3,
    # the next copies 9 after (1, 2, 3) and writes 5); with two chains the earlier continuation [3, 9] is verified
    # too and one step writes all three
    context, reply = [1, 2, 3, 9, 1, 2, 4, 1, 2], [3, 9, 5]
    assert copy_bound_steps(context, reply, chains=1) == 2
    assert copy_bound_steps(context, reply, chains=2) == 1
    assert copy_bound_steps(context, reply, chains=2, max_len=1) == 2  # one-token guesses: 3 (+ 9), then 5
