"""Prompt lookup: what it proposes for given histories, its options, and its incremental index."""

import random

import pytest

from leapdecode.draft import Draft
from leapdecode.drafters import make_drafter
from leapdecode.drafters.base import RequestContext
from leapdecode.drafters.pld import PLDOptions, PromptLookup
from leapdecode.errors import LeapError


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


@pytest.mark.parametrize(
    "history, options, max_nodes, expected",
    [
        ([1, 2, 3, 9, 1, 2, 3], {}, 64, [9, 1, 2, 3]),  # 3-gram match, continuation runs into the suffix
        ([1, 2, 3, 4], {}, 64, []),  # nothing repeats
        ([5], {}, 64, []),
        ([], {}, 64, []),
        ([1, 2, 5, 1, 2, 6, 1, 2], {}, 64, [6, 1, 2]),  # the most recent earlier match wins
        ([7, 1, 2, 5, 8, 2, 6, 7, 1, 2], {}, 64, [5, 8, 2, 6, 7, 1, 2]),  # the longest n-gram wins
        ([7, 1, 2, 5, 8, 2, 6, 7, 1, 2], {"max_ngram": 1}, 64, [6, 7, 1, 2]),  # only 1-grams: latest "2"
        ([4, 5, 9, 5], {}, 64, [9, 5]),  # a 1-gram is enough by default
        ([4, 5, 9, 5], {"min_ngram": 2}, 64, []),  # ... but not with min_ngram=2
        ([1, 2, 3, 4, 5, 1, 2], {"num_draft": 2}, 64, [3, 4]),
        ([1, 2, 3, 4, 5, 1, 2], {}, 1, [3]),  # max_nodes caps the chain
        ([1, 2, 3, 4, 5, 1, 2], {}, 0, []),
        (list(range(20)) + [0], {}, 64, list(range(1, 11))),  # num_draft=10 by default
        ([3, 3, 3], {}, 64, [3]),  # "3 3" at 0 is followed by one token
    ],
)
def test_proposals(history, options, max_nodes, expected):
    draft = make_drafter("pld", **options).propose(history, max_nodes)
    assert draft.token_ids == expected
    assert draft.parents == chain_parents(len(expected))
    assert draft.source == "pld"


def test_defaults():
    d = make_drafter("pld")
    assert isinstance(d, PromptLookup) and d.name == "pld" and not d.wants_logits
    assert d.options == PLDOptions(max_ngram=3, min_ngram=1, num_draft=10)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_ngram": 0}, "max_ngram"),
        ({"min_ngram": 0}, "min_ngram"),
        ({"num_draft": -1}, "num_draft"),
        ({"num_draft": 2.5}, "num_draft"),
        ({"max_ngram": "3"}, "max_ngram"),
        ({"max_ngram": True}, "max_ngram"),
        ({"min_ngram": 4}, r"min_ngram \(4\) must be <= max_ngram \(3\)"),
        ({"ngram": 2}, "unknown pld option.*ngram"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(LeapError, match=message):
        make_drafter("pld", **options)


def fresh_proposal(tokens, max_nodes=16, **options) -> Draft:
    return PromptLookup(**options).propose(list(tokens), max_nodes)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_index_matches_a_fresh_one(seed):
    rng = random.Random(seed)
    d = PromptLookup(max_ngram=4, min_ngram=2)
    tokens = [rng.randrange(5) for _ in range(5)]
    d.start(RequestContext(tokens))
    for _ in range(60):
        tokens += [rng.randrange(5) for _ in range(rng.randrange(1, 4))]
        assert d.propose(tokens, 16) == fresh_proposal(tokens, max_ngram=4, min_ngram=2)


@pytest.mark.parametrize(
    "first, second",
    [
        ([1, 2, 3, 9, 1, 2, 3], [1, 2]),  # shorter
        ([1, 2, 3, 9, 1, 2, 3], [4, 2, 3, 9, 8, 2, 3, 7, 2, 3]),  # longer, another token where the last was
        ([1, 2, 3, 9, 1, 2, 3], [5, 6, 7, 5, 6]),
    ],
)
def test_another_sequence_rebuilds(first, second):
    d = PromptLookup()
    d.propose(first, 16)
    assert d.propose(second, 16) == fresh_proposal(second)


def test_start_forgets_the_previous_request():
    d = PromptLookup()
    assert d.propose([1, 2, 3, 9, 1, 2, 3], 16).token_ids == [9, 1, 2, 3]
    d.stop()
    d.start(RequestContext([2, 3]))
    # the same length and last token as before, so only start() tells this is another sequence
    assert d.propose([2, 3, 5, 6, 7, 2, 3], 16).token_ids == [5, 6, 7, 2, 3]


@pytest.mark.parametrize("max_nodes", [1, 2, 5, 64])
def test_respects_max_nodes(max_nodes):
    tokens = list(range(40)) + [0, 1, 2]
    draft = PromptLookup(num_draft=50).propose(tokens, max_nodes)
    assert draft.token_ids == tokens[3 : 3 + min(max_nodes, 40)]
