"""The compiled mesh simulator (wafer.mesh with wafer.network) against the first edition's pure-Python
simulator (tests/helpers/mesh_reference.py): the same programs give the same cycles, link counts,
timeline, trace and memory, to the bit, and the same errors.

Exact equality is the right bar: both simulate the same machine, event for event, and add the same
float64 values in the same order, so any difference is a bug, not rounding."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mesh_reference import run_reference

from wafer import collectives, network
from wafer.hardware import TOY
from wafer.mesh import Compute, Mesh, MeshError, Recv, Reduce, ReduceSend, Send

BIG = dataclasses.replace(TOY, sram_bytes_per_pe=1 << 20, name="TOY with 1 MiB per PE")
RUNS: list[int] = []


_plain_run = Mesh.run


def same_run(mesh: Mesh, trace: bool = False, max_cycles: int = 10**9):
    """Run ``mesh`` by both simulators (the reference on a deep copy); assert that they agree, or
    raise the same error; return the compiled one's report."""
    ref = copy.deepcopy(mesh)
    try:
        expected = run_reference(ref, trace, max_cycles)
    except MeshError as e:
        with pytest.raises(MeshError) as got:
            _plain_run(mesh, trace, max_cycles)
        assert str(got.value) == str(e)
        raise
    report = _plain_run(mesh, trace, max_cycles)
    assert report.cycles == expected.cycles
    assert np.array_equal(report.link_wavelets, expected.link_wavelets)
    assert report.timeline == expected.timeline
    assert report.trace == expected.trace
    assert report.colors == expected.colors
    for mine, theirs in zip(mesh.memory, ref.memory):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert mine[name].shape == theirs[name].shape and np.array_equal(mine[name], theirs[name]), name
    RUNS.append(report.wavelet_hops)
    return report


@pytest.fixture
def compare(monkeypatch):
    """Every Mesh.run inside the test goes through :func:`same_run`; yields each run's hop count."""
    RUNS.clear()
    monkeypatch.setattr(Mesh, "run", same_run)
    yield RUNS


@pytest.mark.parametrize("grid, levels", [((4, 4), 1), ((8, 8), 2), ((6, 10), 2), ((16, 16), 2)])
def test_gemv(compare, grid, levels):
    rng = np.random.default_rng(1)
    A, x = rng.standard_normal((grid[0] * 8, grid[1] * 8)), rng.standard_normal(grid[1] * 8)
    y, _ = collectives.gemv(A, x, grid, BIG, levels=levels)
    assert np.allclose(y, A @ x) and len(compare) == 1 and compare[0] > 0


@pytest.mark.parametrize("method", collectives.GEMM_METHODS)
def test_gemm(compare, method):
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((16, 12)), rng.standard_normal((12, 8))
    C, _ = collectives.gemm(A, B, 4, method, BIG)
    assert np.allclose(C, A @ B) and compare


@pytest.mark.parametrize("levels", [1, 2])
def test_collectives(compare, levels):
    rng = np.random.default_rng(3)
    mesh = Mesh(9, 3, BIG)
    pes = collectives.row(mesh, 1)
    for pe in pes:
        mesh.store(pe, "v", rng.standard_normal(20))
    collectives.allreduce(mesh, pes, "v", levels)
    mesh.clear_routes()
    collectives.broadcast(mesh, (4, 1), collectives.column(mesh, 4), "v", color=3)
    assert len(compare) == 2


def test_emulated_gpt(compare):
    from minigpt.model import GPT, GPTConfig
    from wafer.emulate import Emulator

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=12)).eval()
    em = Emulator(model)
    em.step(3)
    em.step(5)
    assert len(compare) >= 2


def line(mesh: Mesh, color: int, y: int, x0: int, x1: int) -> None:
    """Route ``color`` from PE (x0, y)'s ramp east or west to PE (x1, y)'s ramp."""
    path = [(x, y) for x in (range(x0, x1 + 1) if x1 >= x0 else range(x0, x1 - 1, -1))]
    collectives.route_path(mesh, path, color)


def test_contention_backlog_and_trace():
    """Two flows share a link (queueing); a Reduce and a ReduceSend start long after their wavelets
    arrived (an inbox backlog, re-sent sums issued more than WHEEL cycles ahead); every wavelet traced."""
    mesh = Mesh(6, 2, BIG)
    n = network.WHEEL + 300
    line(mesh, 0, 0, 0, 5)
    line(mesh, 1, 0, 1, 4)
    line(mesh, 2, 1, 0, 3)
    line(mesh, 3, 1, 3, 5)
    mesh.store((0, 0), "a", np.arange(n) * 0.5)
    mesh.store((1, 0), "b", np.arange(40) + 0.25)
    mesh.store((0, 1), "c", np.linspace(-1, 1, n))
    mesh.store((3, 1), "d", np.full(n, 3.0))
    mesh.program((0, 0), [Send(0, "a")])
    mesh.program((1, 0), [Compute(7), Send(1, "b")])
    mesh.program((5, 0), [Recv(0, "got", n)])
    mesh.program((4, 0), [Compute(100), Reduce(1, "acc", 40)])
    mesh.store((4, 0), "acc", np.ones(40))
    mesh.program((0, 1), [Send(2, "c")])
    mesh.program((3, 1), [Compute(2 * n), ReduceSend(2, 3, "d", n)])
    mesh.program((5, 1), [Recv(3, "sum", n)])
    report = same_run(mesh, trace=True)
    assert report.link_wavelets[0, 3, 3] == n + 40  # both flows crossed the link east of (3, 0)
    assert np.array_equal(mesh.load((5, 1), "sum"), np.linspace(-1, 1, n) + 3.0)


def test_compute_sees_a_stream_under_way():
    """A Compute on another task reads a buffer that a Recv is still filling, and changes a buffer a
    ReduceSend is still reading: it sees and makes the values a direct write would."""
    mesh = Mesh(3, 1, BIG)
    line(mesh, 0, 0, 0, 1)
    line(mesh, 1, 0, 1, 2)
    mesh.store((0, 0), "a", np.arange(50.0))
    mesh.store((1, 0), "r", np.zeros(50))
    mesh.store((1, 0), "s", np.ones(50))

    def peek(mem):
        mem["seen"] = mem["r"].copy()
        mem["s"][25:] = -1.0

    mesh.program((0, 0), [Send(0, "a")])
    mesh.program((1, 0), [Recv(0, "r", 50)])
    mesh.program((1, 0), [Compute(20, peek, "peek")])
    mesh.program((1, 0), [Send(1, values=np.arange(50.0) * 2)])
    mesh.program((2, 0), [Recv(1, "got", 50)])
    same_run(mesh)
    seen = mesh.load((1, 0), "seen")
    assert 0 < np.count_nonzero(seen) < 49  # it saw the Recv half done


@pytest.mark.parametrize("case", ["misrouted", "stall", "cycle", "two receivers", "no buffer"])
def test_errors_are_the_same(case):
    mesh = Mesh(3, 3, BIG)
    mesh.store((0, 0), "a", np.arange(4.0))
    if case == "misrouted":
        mesh.route((0, 0), 0, "ramp", "east")
        mesh.program((0, 0), [Send(0, "a")])
    elif case == "stall":
        line(mesh, 0, 0, 0, 2)
        mesh.program((0, 0), [Send(0, "a")])
        mesh.program((2, 0), [Recv(0, "b", 6)])
    elif case == "cycle":
        mesh.route((0, 0), 1, ["ramp", "west"], "east")
        mesh.route((1, 0), 1, "west", "south")
        mesh.route((1, 1), 1, "north", "west")
        mesh.route((0, 1), 1, "east", "north")
        mesh.route((0, 0), 1, ["ramp", "south"], "east")
    elif case == "two receivers":
        line(mesh, 0, 0, 0, 2)
        mesh.program((2, 0), [Recv(0, "b", 4)])
        mesh.program((2, 0), [Recv(0, "c", 4)])
    else:
        line(mesh, 0, 0, 0, 2)
        mesh.program((0, 0), [Send(0, "a")])
        mesh.program((2, 0), [Reduce(0, "missing", 4)])
    with pytest.raises(MeshError):
        same_run(mesh)


@st.composite
def programs(draw):
    """Random flows along rows of a small grid: each a Send (after a random delay) to a Recv, Reduce
    or ReduceSend-and-Recv at the far end, on its own color, started after a random delay."""
    width, height = draw(st.integers(3, 6)), draw(st.integers(1, 3))
    mesh = Mesh(width, height, BIG)
    color = 0
    for y in range(height):
        for _ in range(draw(st.integers(1, 2))):
            x0, x1 = draw(st.sampled_from([(a, b) for a in range(width) for b in range(width) if a != b]))
            n, kind = draw(st.integers(1, 30)), draw(st.sampled_from(["recv", "reduce"]))
            line(mesh, color, y, x0, x1)
            name = f"v{color}"
            mesh.store((x0, y), name, np.arange(n) + color)
            mesh.program((x0, y), [Compute(draw(st.integers(0, 40))), Send(color, name)])
            wait = Compute(draw(st.integers(0, 60)))
            if kind == "recv":
                mesh.program((x1, y), [wait, Recv(color, f"r{color}", n)])
            else:
                mesh.store((x1, y), f"r{color}", np.full(n, 0.5))
                mesh.program((x1, y), [wait, Reduce(color, f"r{color}", n)])
            color += 1
    return mesh


@given(programs())
def test_random_programs(mesh):
    same_run(mesh, trace=True)
