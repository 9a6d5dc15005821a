"""wafer.viz: the phases of a simulator run laid out on the mesh, and the KV cache's layouts drawn PE by
PE, checked against the simulator's timeline, the analytic model and the layouts' own counts."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from wafer import collectives as coll  # noqa: E402
from wafer import cost, viz  # noqa: E402
from wafer.hardware import TOY  # noqa: E402
from wafer.inference import kv_rows  # noqa: E402


def test_phase_of_sorts_the_timeline_labels():
    assert viz.phase_of("recv c0") == "receive"
    assert {viz.phase_of(label) for label in ("send c1", "reducesend c2", "reduce c1")} == {"send and reduce"}
    assert viz.phase_of("A @ x") == "compute"


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (6, 3)])
def test_phase_ends_of_a_gemv_follow_the_model(grid):
    p, q = grid  # P rows, Q columns: the mesh is Q wide and P high
    rng = np.random.default_rng(1)
    A, x = rng.standard_normal((4 * p, 4 * q)), rng.standard_normal(4 * q)
    _, report = coll.gemv(A, x, grid=grid)
    model = cost.gemv_cycles(TOY, 4 * p, 4 * q, grid)
    ends = viz.phase_ends(report, q, p)
    assert set(ends) == set(viz.PHASES) and all(e.shape == (p, q) for e in ends.values())
    assert (ends["receive"][0] == -1).all()  # the top row holds x: it receives nothing
    for y in range(1, p):  # x's 4 values reach row y after y hops and 3 more wavelets
        assert (ends["receive"][y] == y * TOY.hop_cycles + 4 - 1).all()
    assert ends["compute"][p - 1, 0] == model.broadcast + model.compute
    assert ends["send and reduce"].max() == report.cycles == model.total


def test_phase_grid_marks_the_pes_without_a_phase():
    _, report = coll.gemv(np.ones((16, 16)), np.ones(16), grid=(4, 4))
    axes = viz.phase_grid(report, 4, 4)
    receive = [t.get_text() for t in axes[0].texts]
    assert receive.count("none") == 4  # row 0 holds x: it receives nothing
    assert all(t.get_text() != "none" for ax in axes[1:] for t in ax.texts)
    plt.close(axes[0].figure)


def test_kv_grid_draws_a_slot_per_stored_token_and_counts_the_overflow():
    side, room, tokens = 4, 2, 7  # shift holds up to 4 x 2 = 8, concatenation 2
    for kind, stored, overflow in (("concat", room, tokens - room), ("shift", tokens, 0)):
        ax = viz.kv_grid(kv_rows(tokens, side, kind), side, room)
        filled = [r for r in ax.patches if isinstance(r, Rectangle) and r.fill]
        assert len(filled) == 2 * side * stored  # a K and a V half per token, in each PE of its row
        texts = [t.get_text() for t in ax.texts]
        assert (f"{overflow} tokens\nrefused" in texts) == (overflow > 0)
        labels = [t for t in texts if t.isdigit()]  # each stored token's number, once in each PE of its row
        assert len(labels) == side * stored
        plt.close(ax.figure)
    ax = viz.kv_grid(kv_rows(9, side, "shift"), side, room)  # one token too many: the bottom row overflows
    assert [t.get_text() for t in ax.texts if "refused" in t.get_text()] == ["1 token\nrefused"]
    plt.close(ax.figure)
