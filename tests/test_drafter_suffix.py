"""SuffixDecoding: tree drafts for given histories, its options, and the global index across requests."""

import random

import pytest
import torch

from leapdecode.draft import Draft, StepResult
from leapdecode.drafters import make_drafter
from leapdecode.drafters.base import RequestContext
from leapdecode.drafters.suffix import SuffixDecoding, SuffixOptions, _Trie
from leapdecode.errors import LeapError

# "1 2 3" occurs twice before the end, both times followed by 4, then once by 5 and once by 6.
FORK = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 6, 7, 1, 2, 3]
# "7" is followed by 1 three times and by 2 once.
SKEWED = [7, 1, 7, 1, 7, 1, 7, 2, 7]


@pytest.mark.parametrize(
    "history, options, max_nodes, tokens, parents",
    [
        # match "1 2 3" (3 tokens, so 3 nodes): 4 (p=1), then 5 and 6 (p=1/2 each) as siblings
        (FORK, {}, 64, [4, 5, 6], [-1, 0, 0]),
        # 12 nodes: both branches grow, equally likely, alternately (ties go to the first seen)
        (
            FORK,
            {"factor": 4.0},
            64,
            [4, 5, 6, 9, 7, 1, 1, 2, 2, 3, 3, 4],
            [-1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        ),
        (FORK, {"factor": 4.0, "max_spec": 2}, 64, [4, 5], [-1, 0]),
        (FORK, {"factor": 4.0}, 2, [4, 5], [-1, 0]),
        (FORK, {"factor": 4.0}, 0, [], []),
        (FORK, {"factor": 4.0, "min_prob": 0.6}, 64, [4], [-1]),  # the 1/2 branches fall below min_prob
        (FORK, {"max_depth": 2}, 64, [4, 5], [-1, 0]),  # match "2 3" only: 2 nodes
        (SKEWED, {}, 64, [1], [-1]),  # match "7": the likelier continuation (3/4)
        # 1 (3/4), 7 (3/4), 1 (3/4 * 2/3), 7 (1/2) beat the 2 after the root (1/4)
        (SKEWED, {"factor": 4.0}, 64, [1, 7, 1, 7], [-1, 0, 1, 2]),
        (SKEWED, {"factor": 4.0, "min_prob": 0.8}, 64, [], []),
        ([1, 2, 1, 3, 1, 2], {"factor": 4.0}, 64, [1, 3, 1, 2], [-1, 0, 1, 2]),
        ([5, 5, 5, 5], {"factor": 4.0}, 64, [5], [-1]),  # "5 5 5" occurred once before, then one more 5
        ([1, 2, 3, 4], {}, 64, [], []),  # nothing repeats
        ([3], {}, 64, [], []),
        ([], {}, 64, [], []),
    ],
)
def test_proposals(history, options, max_nodes, tokens, parents):
    draft = make_drafter("suffix", **options).propose(history, max_nodes)
    assert draft.token_ids == tokens
    assert draft.parents == parents
    assert draft.source == "suffix"


def test_defaults():
    d = make_drafter("suffix")
    assert isinstance(d, SuffixDecoding) and d.name == "suffix" and not d.wants_logits
    assert d.options == SuffixOptions(
        max_depth=32, max_spec=32, factor=1.0, min_prob=0.1, max_global_nodes=300_000
    )
    assert d.global_trie.depth == 64


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_depth": 0}, "max_depth"),
        ({"max_spec": 1.5}, "max_spec"),
        ({"max_global_nodes": -1}, "max_global_nodes"),
        ({"factor": 0}, "factor"),
        ({"factor": "2"}, "factor"),
        ({"min_prob": 1.5}, "min_prob"),
        ({"min_prob": -0.1}, "min_prob"),
        ({"depth": 8}, "unknown suffix option.*depth"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(LeapError, match=message):
        make_drafter("suffix", **options)


def run_request(d: SuffixDecoding, prompt: list[int], output: list[int]) -> None:
    d.start(RequestContext(prompt))
    d.propose(prompt + output, 8)
    d.stop()


def test_global_index_helps_the_next_request():
    output = [10, 11, 12, 13, 14, 15]
    context = [2, 10, 11, 12]
    assert len(SuffixDecoding().propose(context, 64)) == 0  # on its own, nothing repeats
    d = SuffixDecoding()
    run_request(d, [1], output)
    d.start(RequestContext([2]))
    draft = d.propose(context, 64)
    assert (draft.token_ids, draft.parents) == ([13, 14, 15], [-1, 0, 1])


def test_global_index_holds_outputs_not_prompts():
    d = SuffixDecoding()
    run_request(d, [20, 21, 22, 23, 24], [30])
    d.start(RequestContext([5]))
    assert len(d.propose([5, 20, 21, 22], 64)) == 0


def test_global_counts_add_up_over_requests():
    d = SuffixDecoding(factor=4.0)
    for output in ([1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 5]):
        run_request(d, [0], output)
    draft = d.propose([9, 1, 2], 64)  # budget 8; after "1 2": 3, then 5 (2/3) and 4 (1/3)
    assert (draft.token_ids, draft.parents) == ([3, 5, 4], [-1, 0, 0])


def test_the_stronger_of_the_two_indexes_wins():
    d = SuffixDecoding()
    run_request(d, [0], [10, 11, 12, 13, 14, 15, 16])
    d.start(RequestContext([12, 99]))
    # this request: "12" -> 99 (1 node, 1 expected token); earlier output: "10 11 12" -> 13 14 15 (3)
    assert d.propose([12, 99, 10, 11, 12], 64).token_ids == [13, 14, 15]


def test_observe_adds_the_last_committed_tokens_to_the_output():
    d = SuffixDecoding()
    d.start(RequestContext([0]))
    tokens = [0, 40, 41]
    draft = d.propose(tokens, 8)
    logits = torch.zeros(1 + len(draft), 50)
    d.observe(StepResult(draft, [41] + draft.token_ids, logits, accepted=[], bonus=42))
    d.stop()  # no propose after the last step: only observe saw the 42
    assert d.outputs[-1] == [40, 41, 42]
    assert d.propose([7, 41], 64).token_ids == [42]


def test_old_outputs_are_evicted_past_the_node_budget():
    d = SuffixDecoding(max_global_nodes=40)
    run_request(d, [0], [10, 11, 12, 13, 14, 15])
    assert d.global_trie.nodes <= 40 and len(d.outputs) == 1
    run_request(d, [0], list(range(20, 56)))  # 36 fresh windows, 43 nodes: over budget, the oldest goes
    assert [o[0] for o in d.outputs] == [20]
    d.start(RequestContext([0]))
    assert len(d.propose([0, 10, 11, 12], 64)) == 0
    assert d.propose([0, 21, 22, 23], 64).token_ids == [24, 25, 26]


def trie_counts(trie: _Trie) -> dict[tuple[int, ...], int]:
    """Every string in the trie with its count, tails spelled out (their tokens count 1 each)."""
    out = {}
    stack = [((), trie.root)]
    while stack:
        prefix, node = stack.pop()
        if node.seq is not None:
            tail = node.seq[node.pos : min(node.lim, len(node.seq))]
            for i in range(1, len(tail) + 1):
                out[prefix + tuple(tail[:i])] = 1
        for token, kid in (node.kids or {}).items():
            out[prefix + (token,)] = kid.count
            stack.append((prefix + (token,), kid))
    return out


def node_objects(trie: _Trie) -> int:
    stack, n = [trie.root], 0
    while stack:
        node = stack.pop()
        n += 1
        stack.extend((node.kids or {}).values())
    return n


def window_counts(seqs: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    """What the trie must hold: each position's next `depth` tokens, every prefix counted once."""
    out = {}
    for seq in seqs:
        for p in range(len(seq)):
            for end in range(p + 1, min(p + depth, len(seq)) + 1):
                out[tuple(seq[p:end])] = out.get(tuple(seq[p:end]), 0) + 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_live_trie_counts_every_window(seed):
    rng = random.Random(seed)
    d = SuffixDecoding(max_depth=3, max_spec=2)  # windows of 5 tokens
    tokens = []
    for _ in range(30):
        tokens += [rng.randrange(3)] * rng.randrange(1, 4)  # runs: windows share long prefixes
        d.propose(tokens, 8)
        assert trie_counts(d._live.trie) == window_counts([tokens], 5)


@pytest.mark.parametrize("seed", range(4))
def test_global_trie_counts_every_window(seed):
    rng = random.Random(seed)
    trie = _Trie(depth=6)
    seqs = [[rng.randrange(3) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    for seq in seqs:
        trie.insert(seq)
    assert trie_counts(trie) == window_counts(seqs, 6)
    assert trie.nodes == node_objects(trie)
    for seq in seqs[:3]:
        trie.remove(seq)
    assert trie_counts(trie) == window_counts(seqs[3:], 6)
    assert trie.nodes == node_objects(trie)


@pytest.mark.parametrize("seed", range(3))
def test_removing_every_output_empties_the_trie(seed):
    rng = random.Random(seed)
    trie = _Trie(depth=6)
    seqs = [[rng.randrange(4) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    for seq in seqs:
        trie.insert(seq)
    for seq in seqs[::2] + seqs[1::2]:
        trie.remove(seq)
    assert trie.nodes == 1 and not trie.root.kids


def fresh(tokens, max_nodes, **options) -> Draft:
    return SuffixDecoding(**options).propose(list(tokens), max_nodes)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_index_matches_a_fresh_one(seed):
    rng = random.Random(seed)
    options = {"factor": 3.0, "max_depth": 5, "max_spec": 6}  # small tries: tails split and depth caps bite
    d = SuffixDecoding(**options)
    tokens = [rng.randrange(3) for _ in range(4)]
    d.start(RequestContext(tokens))
    for _ in range(50):
        tokens += [rng.randrange(3) for _ in range(rng.randrange(1, 3))]
        assert d.propose(tokens, 16) == fresh(tokens, 16, **options)


def test_another_sequence_rebuilds():
    d = SuffixDecoding()
    d.propose(FORK, 64)
    other = [8, 1, 2, 3, 7, 8, 1, 2, 3]  # shorter, and what was indexed no longer applies
    assert d.propose(other, 64) == fresh(other, 64)
    # "8 1 2 3 7" occurred at 0 (5 tokens, so 5 nodes): what followed it, up to the end
    assert d.propose(other + [7], 64).token_ids == [8, 1, 2, 3, 7]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_nodes", [1, 3, 8])
def test_drafts_are_bounded_paths_seen_before(seed, max_nodes):
    rng = random.Random(seed)
    history = [rng.randrange(3) for _ in range(40)]
    draft = SuffixDecoding(factor=4.0, max_spec=6).propose(history, max_nodes)
    assert 0 < len(draft) <= min(max_nodes, 6)
    text = " " + " ".join(map(str, history)) + " "
    for node in range(len(draft)):
        path = [history[-1]] + [draft.token_ids[i] for i in draft.path_to(node)]
        assert " " + " ".join(map(str, path)) + " " in text  # the root and its path occurred earlier
