"""CopySpec: what it copies for given histories, its options, and its index across chat turns."""

import random

import pytest

from leapdecode.drafters import make_drafter
from leapdecode.drafters.base import RequestContext
from leapdecode.drafters.copy import CopyOptions, CopySpec
from leapdecode.errors import LeapError


@pytest.mark.parametrize(
    "history, options, max_nodes, expected",
    [
        ([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], {}, 64, [5, 6, 1, 2, 3, 4]),
        ([1, 2, 3, 9, 1, 2, 3], {}, 64, []),  # only 3 tokens repeat: gamma is 4
        ([1, 2, 3, 9, 1, 2, 3], {"gamma": 3}, 64, [9, 1, 2, 3]),
        ([1, 2, 3, 4, 7, 1, 2, 3, 4, 8, 1, 2, 3, 4], {}, 64, [8, 1, 2, 3, 4]),  # the latest occurrence
        ([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], {"max_copy": 2}, 64, [5, 6]),
        ([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], {}, 3, [5, 6, 1]),
        ([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], {}, 0, []),
        (list(range(50)) + [0, 1, 2, 3], {}, 64, list(range(4, 36))),  # max_copy=32 by default
        ([1, 2, 3, 4], {}, 64, []),
        ([], {}, 64, []),
    ],
)
def test_proposals(history, options, max_nodes, expected):
    draft = make_drafter("copy", **options).propose(history, max_nodes)
    assert draft.token_ids == expected
    assert draft.parents == list(range(-1, len(expected) - 1))
    assert draft.source == "copy"


def test_defaults():
    d = make_drafter("copy")
    assert isinstance(d, CopySpec) and d.name == "copy" and not d.wants_logits
    assert d.options == CopyOptions(gamma=4, max_copy=32)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gamma": 0}, "gamma"),
        ({"gamma": 1.0}, "gamma"),
        ({"max_copy": 0}, "max_copy"),
        ({"max_copy": None}, "max_copy"),
        ({"copy_len": 8}, "unknown copy option.*copy_len"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(LeapError, match=message):
        make_drafter("copy", **options)


def test_next_turn_copies_from_the_previous_one_and_keeps_the_index():
    d = CopySpec()
    turn1 = [50, 51, 52]
    d.start(RequestContext(turn1))
    context = turn1 + [10, 11, 12, 13, 14, 15, 16]  # the first answer
    assert d.propose(context, 64).token_ids == []
    d.stop()
    kept = d._index[(10, 11, 12, 13)]
    turn2 = context + [60, 61, 10, 11, 12]  # the chat template repeats the answer, a new question follows
    d.start(RequestContext(turn2))
    assert d._index[(10, 11, 12, 13)] is kept  # extended, not rebuilt
    assert d.propose(turn2 + [13], 64).token_ids == [14, 15, 16, 60, 61, 10, 11, 12, 13]


def test_an_unrelated_request_forgets_the_old_context():
    d = CopySpec()
    d.start(RequestContext([1, 2, 3, 4, 5, 6]))
    assert d.propose([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], 64).token_ids == [5, 6, 1, 2, 3, 4]
    d.stop()
    d.start(RequestContext([9, 1, 2, 3, 4]))
    assert d.propose([9, 1, 2, 3, 4], 64).token_ids == []


def test_a_new_request_is_compared_in_full():
    d = CopySpec()
    d.start(RequestContext([1, 2, 3, 4, 5, 6]))
    d.propose([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], 64)
    d.stop()
    # longer than the old context and with the same token (4) at its last index, yet unrelated
    prompt = [8, 8, 8, 8, 8, 8, 8, 8, 8, 4, 1, 2, 3, 4]
    d.start(RequestContext(prompt))
    assert d.propose(prompt, 64).token_ids == []
    assert d._index == reference_index(prompt, 4)


def reference_index(tokens, gamma):
    index = {}
    for s in range(len(tokens) - gamma):
        index.setdefault(tuple(tokens[s : s + gamma]), []).append(s)
    return index


@pytest.mark.parametrize("seed", range(4))
def test_index_follows_extensions_and_divergences(seed):
    rng = random.Random(seed)
    d = CopySpec(gamma=2)
    tokens = [rng.randrange(4) for _ in range(10)]
    for _ in range(40):
        if rng.random() < 0.2:  # cut back (a new turn that differs, or a shorter sequence)
            tokens = tokens[: rng.randrange(len(tokens) + 1)] + [rng.randrange(4)]
            d.start(RequestContext(tokens))
        else:
            tokens = tokens + [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
            d.propose(tokens, 8)
        assert d._seq == tokens
        assert d._index == reference_index(tokens, 2)


def test_a_changed_last_token_is_noticed_between_steps():
    d = CopySpec()
    d.propose([1, 2, 3, 4, 5, 6, 7, 8], 64)
    # same length as the indexed context; the last token differs, so the index is cut back and redone
    assert d.propose([1, 2, 3, 4, 5, 9, 1, 2, 3, 4], 64).token_ids == [5, 9, 1, 2, 3, 4]
    assert d._index == reference_index([1, 2, 3, 4, 5, 9, 1, 2, 3, 4], 4)
