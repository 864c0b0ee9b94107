"""Token Recycling: the adjacency matrix learnt from hand-made logits and the drafts filled from it."""

import pytest
import torch

from leapdecode.draft import Draft, StepResult
from leapdecode.drafters import make_drafter
from leapdecode.drafters.base import RequestContext
from leapdecode.drafters.recycling import DEFAULT_WIDTHS, RecyclingOptions, TokenRecycling, widths_template
from leapdecode.errors import LeapError

VOCAB = 10


def logits_ranking(*rankings: list[int]) -> torch.Tensor:
    """Logits [len(rankings), VOCAB] whose top tokens, best first, are each ranking."""
    out = torch.zeros(len(rankings), VOCAB)
    for row, ranking in enumerate(rankings):
        for rank, token in enumerate(ranking):
            out[row, token] = 10.0 - rank
    return out


def step(tokens: list[int], *rankings: list[int]) -> StepResult:
    draft = Draft.chain(tokens[1:])
    return StepResult(draft, tokens, logits_ranking(*rankings), accepted=[], bonus=0)


def with_rows(rows: dict[int, list[int]], **options) -> TokenRecycling:
    """A drafter whose matrix has exactly these rows (through observe, as the engine would fill it)."""
    d = TokenRecycling(**options)
    tokens = list(rows)
    d.observe(step(tokens, *(rows[t] for t in tokens)))
    return d


def test_defaults():
    d = make_drafter("recycling")
    assert isinstance(d, TokenRecycling) and d.name == "recycling" and d.wants_logits
    assert d.options == RecyclingOptions(k=8, widths=(8, 4, 2, 1, 1, 1), template=None)
    assert DEFAULT_WIDTHS == (8, 4, 2, 1, 1, 1)
    tree = Draft([0] * len(d.template), [p for p, _ in d.template])  # validates parents precede children
    assert len(tree) == 50 and max(tree.depths()) == 6
    assert d.template[:7] == [(-1, 0), (-1, 1), (0, 0), (-1, 2), (0, 1), (1, 0), (2, 0)]
    assert d.matrix is None
    assert RecyclingOptions(k=3).widths == (3, 3, 2, 1, 1, 1)  # the default widths are capped at k


@pytest.mark.parametrize(
    "widths, template",
    [
        ((3,), [(-1, 0), (-1, 1), (-1, 2)]),
        ((2, 1), [(-1, 0), (-1, 1), (0, 0)]),
        # ranks: root children 0, 1; node 0 (rank 0) gets 2 children, node 1 (rank 1) gets 2 - 1 = 1
        ((2, 2), [(-1, 0), (-1, 1), (0, 0), (0, 1), (1, 0)]),
        # cost order (depth + ranks): the rank-0 grandchild (cost 2) precedes the rank-2 root child (cost 3)
        ((3, 1), [(-1, 0), (-1, 1), (0, 0), (-1, 2)]),
        ((1, 0, 1), [(-1, 0)]),  # a zero width ends the tree
    ],
)
def test_widths_template(widths, template):
    assert widths_template(widths) == template


@pytest.mark.parametrize(
    "options, message",
    [
        ({"k": 0}, "option k"),
        ({"k": "8"}, "option k"),
        ({"widths": []}, "widths"),
        ({"widths": [9]}, "widths"),  # wider than k=8
        ({"widths": [2, -1]}, "widths"),
        ({"widths": "ab"}, "widths"),
        ({"template": [(-1, 0), (1, 0)]}, r"template\[1\]"),  # parent not earlier
        ({"template": [(-1, 8)]}, r"template\[0\]"),  # rank >= k
        ({"template": [5]}, "template"),
        ({"topk": 4}, "unknown recycling option.*topk"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(LeapError, match=message):
        make_drafter("recycling", **options)


def test_observe_sets_rows_from_the_logits():
    d = TokenRecycling(k=3)
    d.observe(step([4, 7, 2], [1, 2, 3, 9], [5, 6, 0], [8, 7, 6]))
    assert d.matrix.shape == (VOCAB, 3) and d.matrix.dtype == torch.long
    assert d.matrix[4].tolist() == [1, 2, 3]
    assert d.matrix[7].tolist() == [5, 6, 0]
    assert d.matrix[2].tolist() == [8, 7, 6]
    assert d.matrix[0].tolist() == [-1, -1, -1]  # never an input
    d.observe(step([7], [9, 8, 1]))  # a later step overwrites the row
    assert d.matrix[7].tolist() == [9, 8, 1]
    assert d.matrix[4].tolist() == [1, 2, 3]


def test_observe_a_repeated_input_keeps_its_last_position():
    d = TokenRecycling(k=2)
    d.observe(step([3, 5, 3], [1, 2], [4, 0], [6, 7]))
    assert d.matrix[3].tolist() == [6, 7]


def test_observe_a_new_vocabulary_restarts_the_matrix():
    d = with_rows({1: [2, 3]}, k=2)
    d.observe(StepResult(Draft(), [1], torch.arange(20.0)[None], [], 0))  # another model: vocab 20
    assert d.matrix.shape == (20, 2) and d.matrix[1].tolist() == [19, 18]


ROWS = {0: [1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9], 4: [0, 2, 1], 7: [3, 4, 5]}


@pytest.mark.parametrize(
    "template, max_nodes, tokens, parents",
    [
        ([(-1, 0), (-1, 1), (-1, 2)], 64, [1, 2, 3], [-1, -1, -1]),
        # node 0 is token 1 (row 1 = 4 5 6); node 1 is token 2 (row 2 = 7 8 9); node 3 is 4 (row 4 = 0 2 1)
        ([(-1, 0), (-1, 1), (0, 0), (0, 2), (1, 0), (2, 1)], 64, [1, 2, 4, 6, 7, 2], [-1, -1, 0, 0, 1, 2]),
        ([(-1, 0), (-1, 1), (0, 0), (0, 2), (1, 0), (2, 1)], 3, [1, 2, 4], [-1, -1, 0]),  # template order
        ([(-1, 2), (0, 0), (1, 0)], 64, [3], [-1]),  # row 3 was never seen: nothing below it
        (
            [(-1, 0), (-1, 0), (1, 1), (0, 1)],
            64,
            [1, 5],
            [-1, 0],
        ),  # a duplicate sibling goes, with its subtree
        ([(-1, 0)], 0, [], []),
    ],
)
def test_proposals_from_a_template(template, max_nodes, tokens, parents):
    d = with_rows(ROWS, k=3, template=template)
    draft = d.propose([9, 0], max_nodes)  # root = 0
    assert draft.token_ids == tokens
    assert draft.parents == parents
    assert draft.source == "recycling"


def test_default_template_fills_what_is_known():
    d = with_rows(ROWS, k=3, widths=[3, 2, 1])
    # template (cost order): root children of ranks 0 1 (token 1, 2), the rank-0 child of 1 (4), the rank-2
    # root child (3), the rank-1 child of 1 (5), the rank-0 child of 2 (7), then 4 -> 0 and 7 -> 3
    assert d.template == [(-1, 0), (-1, 1), (0, 0), (-1, 2), (0, 1), (1, 0), (2, 0), (5, 0)]
    draft = d.propose([0], 64)
    assert draft.token_ids == [1, 2, 4, 3, 5, 7, 0, 3]
    assert draft.parents == [-1, -1, 0, -1, 0, 1, 2, 5]


def test_nothing_learnt_or_unknown_root_proposes_nothing():
    assert TokenRecycling().propose([1, 2, 3], 64) == Draft(source="recycling")
    d = with_rows(ROWS, k=3)
    assert len(d.propose([5], 64)) == 0  # row 5 never seen
    assert len(d.propose([VOCAB + 3], 64)) == 0  # outside the vocabulary
    assert len(d.propose([], 64)) == 0


@pytest.mark.parametrize("max_nodes", [1, 7, 20, 50, 100])
def test_respects_max_nodes_and_keeps_a_tree(max_nodes):
    d = TokenRecycling()
    gen = torch.Generator().manual_seed(0)
    vocab = 64
    tokens = list(range(vocab))
    d.observe(StepResult(Draft.chain(tokens[1:]), tokens, torch.randn(vocab, vocab, generator=gen), [], 0))
    draft = d.propose([3], max_nodes)
    assert len(draft) == min(max_nodes, 50)  # every row is known and has distinct candidates
    assert draft.token_ids == d.propose([3], 64).token_ids[: len(draft)]  # a prefix of the full tree


def test_matrix_outlives_requests():
    d = with_rows(ROWS, k=3, template=[(-1, 0)])
    d.stop()
    d.start(RequestContext([5, 6]))
    assert d.propose([5, 6, 0], 64).token_ids == [1]
