"""The helpers that both the simulator's programs and the analytic model use, against hand counts (the
shape of a reduction tree, its hops, colors, rings and shifts), and the model's tree reduction against
closed forms derived by hand from its stated assumptions."""

import dataclasses

import pytest

from wafer import collectives as coll
from wafer import cost
from wafer.hardware import TOY, WSE2
from wafer.mesh import EAST, NORTH, SOUTH, WEST

# hops and stages of other lengths than TOY's (1 and 2), so that a formula that mixes them up cannot pass
LONG_STAGE = dataclasses.replace(TOY, hop_cycles=1, stage_cycles=5, name="TOY, hop 1, stage 5")
LONG_HOP = dataclasses.replace(TOY, hop_cycles=3, stage_cycles=1, name="TOY, hop 3, stage 1")


@pytest.mark.parametrize("n, levels, chains", [
    (1, 1, []),
    (1, 3, []),
    (2, 1, [[[0, 1]]]),
    (2, 2, [[[0, 1]]]),  # a second level would be a chain of one
    (3, 2, [[[0, 1, 2]]]),  # two chains would leave one of a single PE
    (4, 1, [[[0, 1, 2, 3]]]),
    (4, 2, [[[0, 1], [2, 3]], [[0, 2]]]),
    (5, 2, [[[0, 1, 2], [3, 4]], [[0, 3]]]),
    (8, 1, [[[0, 1, 2, 3, 4, 5, 6, 7]]]),
    (8, 2, [[[0, 1, 2], [3, 4, 5], [6, 7]], [[0, 3, 6]]]),  # g = ceil(sqrt 8) = 3: sizes 3, 3, 2
    (8, 3, [[[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2], [4, 6]], [[0, 4]]]),
    (9, 1, [[[0, 1, 2, 3, 4, 5, 6, 7, 8]]]),
    (9, 2, [[[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[0, 3, 6]]]),
])
def test_tree_chains_by_hand(n, levels, chains):
    assert coll.tree_chains(n, levels) == chains


@pytest.mark.parametrize("n, levels, links", [
    (1, 1, []),
    (2, 1, [(1, 0)]),
    (4, 1, [(1, 0), (2, 1), (3, 2)]),
    (4, 2, [(1, 0), (3, 2), (2, 0)]),
    (8, 2, [(1, 0), (2, 1), (4, 3), (5, 4), (7, 6), (3, 0), (6, 3)]),
    (8, 3, [(1, 0), (3, 2), (5, 4), (7, 6), (2, 0), (6, 4), (4, 0)]),
    (9, 2, [(1, 0), (2, 1), (4, 3), (5, 4), (7, 6), (8, 7), (3, 0), (6, 3)]),
])
def test_reduce_links_by_hand(n, levels, links):
    assert coll.reduce_links(n, levels) == links
    assert sorted(a for a, _ in links) == list(range(1, n))  # every position but the root sends once


def test_tree_chains_refuses_bad_sizes():
    with pytest.raises(ValueError, match="levels=0 must be a positive integer"):
        coll.tree_chains(4, 0)
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        coll.tree_chains(0, 1)


def test_paths_by_hand():
    assert coll.direction((2, 3), (5, 3)) == EAST and coll.direction((2, 3), (0, 3)) == WEST
    assert coll.direction((2, 3), (2, 7)) == SOUTH and coll.direction((2, 3), (2, 1)) == NORTH
    assert coll.straight((1, 2), (4, 2)) == [(1, 2), (2, 2), (3, 2), (4, 2)]
    assert coll.straight((0, 3), (0, 1)) == [(0, 3), (0, 2), (0, 1)]
    with pytest.raises(ValueError, match=r"PEs \(0, 0\) and \(1, 1\) are not distinct PEs on one row"):
        coll.straight((0, 0), (1, 1))


def test_assign_colors_by_hand():
    a, b, c = [(0, 0), (1, 0)], [(1, 0), (2, 0)], [(2, 0), (3, 0)]
    far = [(5, 0), (6, 0)]
    long = [(0, 1), (1, 1), (2, 1), (3, 1)]
    inside = [(1, 1), (2, 1)]
    # a and b share (1, 0); b and c share (2, 0); a and c share nothing, nor does far with anyone
    assert coll.assign_colors([a, b, c, far]) == [0, 1, 0, 0]
    assert coll.assign_colors([a, b, c, far], first=3) == [3, 4, 3, 3]
    assert coll.assign_colors([long, inside, a]) == [0, 1, 0]
    assert coll.colors_per_pe([a, b, c, far], [0, 1, 0, 0]) == 2  # at (1, 0) and (2, 0)
    assert coll.colors_per_pe([long, inside, [(2, 1), (2, 2)]], [0, 1, 2]) == 3  # all three at (2, 1)


def test_interleaved_ring_and_shift_paths_by_hand():
    assert coll.interleaved_ring(1) == [0] and coll.interleaved_ring(2) == [0, 1]
    assert coll.interleaved_ring(5) == [0, 2, 4, 3, 1]
    assert coll.interleaved_ring(6) == [0, 2, 4, 5, 3, 1]
    paths, owners = coll.shift_paths([0, 1])
    assert owners == [("A", (0, 0), (1, 0)), ("A", (1, 0), (0, 0)),  # row 0
                      ("B", (0, 0), (0, 1)), ("B", (0, 1), (0, 0)),  # column 0
                      ("A", (0, 1), (1, 1)), ("A", (1, 1), (0, 1)),  # row 1
                      ("B", (1, 0), (1, 1)), ("B", (1, 1), (1, 0))]  # column 1
    assert paths == [[src, dst] for _, src, dst in owners]  # on 2 x 2 every move is one hop
    paths, owners = coll.shift_paths([0, 1, 2])
    assert len(paths) == 2 * 3 * 3  # an A and a B move per PE
    assert owners[0] == ("A", (0, 0), (2, 0)) and paths[0] == [(0, 0), (1, 0), (2, 0)]  # the wrap-around
    assert owners[1] == ("A", (1, 0), (0, 0)) and paths[1] == [(1, 0), (0, 0)]
    assert coll.shift_paths([0]) == ([], [])


# The model's assumptions (wafer.cost): a transfer of k wavelets over h hops through s stages takes
# h * hop + s * stage + k - 1 cycles, and a PE that heads a chain joins the next level when its own sum
# is complete. For n = g^L PEs and L levels, every chain has g PEs: at level l (l = 0 .. L-1) the chains'
# PEs are g^l apart, so the level's transfer covers (g - 1) g^l hops through g - 1 stages (one per PE
# after the tail), and all chains of a level finish together. Summed over the levels the hops add up to
# g^L - 1 = n - 1, so
#     reduce_cycles = (n - 1) hop + L (g - 1) stage + L (k - 1).
@pytest.mark.parametrize("g, levels", [(2, 1), (2, 2), (2, 3), (3, 2), (3, 3), (4, 2), (4, 3), (5, 2),
                                       (8, 2)])
@pytest.mark.parametrize("k", [1, 2, 16])
@pytest.mark.parametrize("wafer", [TOY, LONG_STAGE, LONG_HOP], ids=lambda w: w.name)
def test_tree_reduce_cycles_equal_the_closed_form(g, levels, k, wafer):
    n = g ** levels
    hop, stage = wafer.hop_cycles, wafer.stage_cycles
    expected = (n - 1) * hop + levels * (g - 1) * stage + levels * (k - 1)
    assert cost.reduce_cycles(wafer, n, k, levels) == expected


@pytest.mark.parametrize("wafer", [TOY, LONG_STAGE, LONG_HOP], ids=lambda w: w.name)
@pytest.mark.parametrize("k", [1, 5])
def test_uneven_tree_reduce_cycles_by_hand(wafer, k):
    # n = 5, two levels: chains [0, 1, 2] and [3, 4], then [0, 3]. PE 0's own sum is complete at
    # 2 hop + 2 stage + k - 1, PE 3's at hop + stage + k - 1; PE 3's first wavelet reaches PE 0 three
    # hops later, and PE 0 takes it once its own sum is done; then k - 1 more and a stage.
    hop, stage = wafer.hop_cycles, wafer.stage_cycles
    first = max(hop + stage + (k - 1) + 3 * hop, 2 * hop + 2 * stage + (k - 1))
    assert cost.reduce_cycles(wafer, 5, k, 2) == first + (k - 1) + stage
    # one level is one chain: (n - 1)(hop + stage) + k - 1
    assert cost.reduce_cycles(wafer, 5, k, 1) == 4 * (hop + stage) + k - 1


# The colors of a reduction: every hop is a path from sender to receiver, and a PE routes one color
# per path that touches it. A chain's inner PE sees its incoming and outgoing hop: 2 (a chain of two
# PEs, 1). With n = g^L and g >= 3, PE 1 is an inner PE of the first chain, and the hop from the next
# chain's head at each of the L - 1 upper levels passes over it: L + 1. With g = 2 no chain has an inner
# PE: PE 1 touches its own hop and one passing hop per upper level, L in all. No PE touches more.
@pytest.mark.parametrize("g, levels, colors", [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 5, 5), (3, 1, 2),
                                               (3, 2, 3), (3, 3, 4), (4, 2, 3), (4, 3, 4), (5, 2, 3),
                                               (7, 2, 3)])
def test_reduce_colors_by_hand(g, levels, colors):
    assert cost.reduce_colors(g ** levels, levels) == colors


def test_chain_reduce_colors_by_hand():
    assert [cost.reduce_colors(n) for n in (1, 2, 3, 10, 100)] == [0, 1, 2, 2, 2]


def test_tree_reduce_wins_where_the_closed_form_says():
    # 256 PEs, 4 wavelets: a chain pays 255 stages; a 2-level tree 2 x 15, and a second fill (k - 1)
    chain = cost.reduce_cycles(WSE2, 256, 4, 1)
    tree = cost.reduce_cycles(WSE2, 256, 4, 2)
    assert chain == 255 * (WSE2.hop_cycles + WSE2.stage_cycles) + 3
    assert tree == 255 * WSE2.hop_cycles + 2 * 15 * WSE2.stage_cycles + 2 * 3
    assert tree < chain
