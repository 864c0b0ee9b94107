"""The pure verifier on hand-built logits, and the tree inputs it relies on."""

from __future__ import annotations

import pytest
import torch

from leapdecode.draft import Draft, tree_inputs
from leapdecode.sampling import SamplingParams, target_probs
from leapdecode.verify import accept

V = 6


def onehot_logits(best: list[int]) -> torch.Tensor:
    """Row r prefers token best[r]."""
    logits = torch.zeros(len(best), V)
    logits[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return logits


GREEDY_CASES = [
    # (token_ids, parents, argmax per row [root, node0, ...], accepted, bonus)
    ([], [], [3], [], 3),
    ([1, 2, 3], [-1, 0, 1], [1, 2, 3, 4], [0, 1, 2], 4),
    ([1, 2, 3], [-1, 0, 1], [1, 5, 3, 4], [0], 5),
    ([1, 2, 3], [-1, 0, 1], [0, 2, 3, 4], [], 0),
    ([1, 4, 2, 5], [-1, -1, 1, 1], [4, 0, 5, 0, 1], [1, 3], 1),  # second root child, its second child
    ([1, 1, 2], [-1, -1, 1], [1, 2, 0, 3], [0], 2),  # duplicate siblings: the first one is followed
]


@pytest.mark.parametrize("tokens,parents,best,accepted,bonus", GREEDY_CASES)
def test_greedy_acceptance_table(tokens, parents, best, accepted, bonus):
    got = accept(Draft(tokens, parents), onehot_logits(best), SamplingParams())
    assert got == (accepted, bonus)


def test_tree_inputs_positions_and_mask():
    draft = Draft([7, 8, 9, 10], [-1, 0, -1, 2])
    tokens, positions, mask = tree_inputs(draft, root_token=5, n_cached=3)
    assert tokens.tolist() == [5, 7, 8, 9, 10]
    assert positions.tolist() == [3, 4, 5, 4, 5]
    tree = mask[:, 3:].int().tolist()
    assert tree == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]
    assert mask[:, :3].all()


@pytest.mark.parametrize("tokens", [[], [7], [7, 8, 9]])
def test_tree_inputs_of_a_chain_leave_the_mask_causal(tokens):
    ids, positions, mask = tree_inputs(Draft.chain(tokens), root_token=5, n_cached=3)
    assert ids.tolist() == [5] + tokens and positions.tolist() == list(range(3, 4 + len(tokens)))
    assert mask is None
    assert not Draft([7, 8], [-1, -1]).is_chain() and Draft([7, 8], [-1, 0]).is_chain()


def test_chain_helper_and_validation():
    assert Draft.chain([4, 5, 6]).parents == [-1, 0, 1]
    with pytest.raises(ValueError):
        Draft([1, 2], [-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError):
        Draft([1], [-1, 0])
    with pytest.raises(ValueError):
        accept(Draft([1], [-1]), torch.zeros(3, V), SamplingParams())


def test_sampling_acceptance_rate_is_min_one_p_over_q():
    """Drafted token 1 with p(1) = 0.7: q == p accepts always; a point-mass q accepts 70% of the time."""
    logits = torch.log(torch.tensor([[0.1, 0.7, 0.1, 0.1, 1e-9, 1e-9]] * 2))
    params = SamplingParams(temperature=1.0, seed=0)
    gen = params.generator()
    same = target_probs(logits[:1], params)
    point = torch.nn.functional.one_hot(torch.tensor([1]), V).double()
    hits_same = sum(accept(Draft([1], [-1], same), logits, params, gen)[0] == [0] for _ in range(300))
    hits_point = sum(accept(Draft([1], [-1], point), logits, params, gen)[0] == [0] for _ in range(300))
    assert hits_same == 300
    assert 300 * 0.7 - 40 < hits_point < 300 * 0.7 + 40


@pytest.mark.parametrize(
    "params,kept",
    [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.5), {0}),
        (SamplingParams(temperature=1.0, top_p=0.75), {0, 1}),
    ],
)
def test_target_probs_filters(params, kept):
    logits = torch.log(torch.tensor([0.6, 0.25, 0.1, 0.05]))
    probs = target_probs(logits, params)
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == kept
    assert probs.sum().item() == pytest.approx(1.0)
