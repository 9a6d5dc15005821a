"""The mesh simulator: hand-counted cycles, conservation under contention, collectives equal to NumPy,
the analytic model against the simulator, and errors for programs the mesh cannot run. The helpers that
both the programs and the model use (tree_chains, reduce_links, assign_colors, straight, the rings and
shifts) are checked against hand counts in test_collectives."""


import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wafer import collectives as coll
from wafer import cost
from wafer.hardware import TOY
from wafer.mesh import Compute, Mesh, MeshError, Recv, Send

L, S = TOY.hop_cycles, TOY.stage_cycles


@pytest.mark.parametrize("h, k", [(1, 1), (3, 5), (7, 10), (31, 64)])
def test_broadcast_takes_h_hops_plus_k_minus_1(h, k):
    mesh = Mesh(h + 1, 1)
    mesh.store((0, 0), "x", np.arange(k))
    report = coll.broadcast(mesh, (0, 0), coll.row(mesh, 0), "x")
    assert report.cycles == h * L + k - 1
    for x in range(h + 1):
        assert np.array_equal(mesh.load((x, 0), "x"), np.arange(k))
    assert report.wavelet_hops == h * k  # one copy per link, however many PEs keep one


@pytest.mark.parametrize("h, k", [(1, 1), (3, 5), (7, 10), (20, 3)])
def test_chain_reduce_takes_h_hops_and_stages_plus_k_minus_1(h, k):
    mesh = Mesh(1, h + 1)  # a column this time
    values = np.random.default_rng(h).standard_normal((h + 1, k))
    for y in range(h + 1):
        mesh.store((0, y), "v", values[y])
    report = coll.reduce(mesh, coll.column(mesh, 0), "v")
    assert report.cycles == h * (L + S) + k - 1
    np.testing.assert_allclose(mesh.load((0, 0), "v"), values.sum(0), rtol=1e-12, atol=1e-12)


def test_compute_waits_for_data_and_takes_its_cycles():
    mesh = Mesh(2, 1)
    mesh.store((0, 0), "x", [1.0, 2.0])
    mesh.route((0, 0), 0, "ramp", "east")
    mesh.route((1, 0), 0, "west", "ramp")
    mesh.program((0, 0), [Send(0, "x")])
    mesh.program((1, 0), [Recv(0, "x", 2), Compute(10, lambda m: m.__setitem__("x", m["x"] * 3), "triple")])
    report = mesh.run()
    assert report.cycles == (L + 1) + 10  # the last wavelet lands at cycle L + 1
    assert mesh.load((1, 0), "x").tolist() == [3.0, 6.0]
    assert ("triple", L + 1, L + 11) in [(label, s, e) for x, y, label, s, e in report.timeline]


flows = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.booleans(), st.integers(0, 5),
                           st.integers(1, 12)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(flows)
def test_conservation_under_contention(spec):
    """Point-to-point flows on a 6 x 6 grid that share links: every wavelet reaches its destination once
    and in order, no link carries two wavelets in one cycle, and each link carries exactly the wavelets
    whose paths cross it."""
    mesh = Mesh(6, 6)
    paths, sizes = [], []
    busy_src, busy_dst = set(), set()
    for x, y, horizontal, to, k in spec:
        src, dst = (x, y), ((to, y) if horizontal else (x, to))
        if src == dst or src in busy_src or dst in busy_dst:
            continue
        busy_src.add(src)
        busy_dst.add(dst)
        paths.append(coll.straight(src, dst))
        sizes.append(k)
    assume(paths)  # every flow drawn clashed with an earlier one
    colors = coll.assign_colors(paths)
    expected = np.zeros((6, 6, 5), dtype=int)
    for n, (path, c, k) in enumerate(zip(paths, colors, sizes)):
        coll.route_path(mesh, path, c)
        mesh.store(path[0], f"out{n}", np.arange(k) + 100.0 * n)
        mesh.program(path[0], [Send(c, f"out{n}")])
        mesh.program(path[-1], [Recv(c, f"in{n}", k)])
        for a, b in zip(path, path[1:]):
            expected[a[1], a[0], coll.direction(a, b)] += k
        expected[path[-1][1], path[-1][0], 0] += k
    report = mesh.run(trace=True)
    for n, (path, k) in enumerate(zip(paths, sizes)):
        assert mesh.load(path[-1], f"in{n}").tolist() == (np.arange(k) + 100.0 * n).tolist()
    sends = [(t, x, y, p) for t, x, y, p in report.trace]
    assert len(sends) == len(set(sends))  # one wavelet per link per cycle
    assert np.array_equal(report.link_wavelets, expected)
    longest = max(len(p) - 1 + k - 1 for p, k in zip(paths, sizes))
    assert report.cycles >= longest  # contention can only delay


@pytest.mark.parametrize("n, k, levels", [(n, k, lv) for n in (2, 5, 16, 33) for k in (1, 16)
                                          for lv in (1, 2, 3)])
def test_reduce_and_allreduce_equal_numpy_and_the_model(n, k, levels):
    rng = np.random.default_rng(n * 100 + k)
    values = rng.standard_normal((n, k))
    for fn, model in ((coll.reduce, cost.reduce_cycles), (coll.allreduce, cost.allreduce_cycles)):
        mesh = Mesh(n, 1)
        for x in range(n):
            mesh.store((x, 0), "v", values[x])
        report = fn(mesh, coll.row(mesh, 0), "v", levels)
        targets = [(0, 0)] if fn is coll.reduce else coll.row(mesh, 0)
        for pe in targets:
            np.testing.assert_allclose(mesh.load(pe, "v"), values.sum(0), rtol=1e-12, atol=1e-12)
        assert abs(model(TOY, n, k, levels) / report.cycles - 1) <= 0.10


@pytest.mark.parametrize("grid, shape, levels", [((2, 2), (8, 8), 1), ((4, 8), (64, 64), 2),
                                                 ((8, 8), (256, 256), 1), ((16, 16), (64, 64), 2),
                                                 ((16, 16), (512, 512), 3), ((3, 5), (9, 25), 2),
                                                 ((1, 4), (8, 8), 1), ((4, 1), (8, 8), 2),
                                                 ((1, 1), (3, 5), 1)])
def test_gemv_equals_numpy_and_the_model(grid, shape, levels):
    rng = np.random.default_rng(sum(shape))
    A, x = rng.standard_normal(shape), rng.standard_normal(shape[1])
    y, report = coll.gemv(A, x, grid, levels=levels)
    np.testing.assert_allclose(y, A @ x, rtol=1e-10, atol=1e-10)
    model = cost.gemv_cycles(TOY, *shape, grid, levels)
    assert abs(model.total / report.cycles - 1) <= 0.10
    assert model.colors == report.colors


@pytest.mark.parametrize("method", coll.GEMM_METHODS)
@pytest.mark.parametrize("grid, m, k, n", [(2, 8, 8, 8), (4, 32, 64, 32), (8, 32, 32, 32), (16, 32, 32, 32),
                                           (5, 10, 15, 20), (1, 3, 4, 5)])
def test_gemm_equals_numpy_and_the_model(method, grid, m, k, n):
    rng = np.random.default_rng(grid + m)
    A, B = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    C, report = coll.gemm(A, B, grid, method)
    np.testing.assert_allclose(C, A @ B, rtol=1e-10, atol=1e-10)
    model = cost.gemm_cycles(TOY, m, k, n, grid, method)
    assert abs(model.total / report.cycles - 1) <= 0.10
    assert model.colors == report.colors
    if method != "summa" and grid > 2:  # a barrier after every shift would only be slower
        assert model.lockstep >= report.cycles


def test_interleaved_ring_neighbours_are_at_most_two_apart():
    for n in range(3, 40):
        ring = coll.interleaved_ring(n)
        assert sorted(ring) == list(range(n))
        assert max(abs(ring[i] - ring[i - 1]) for i in range(n)) <= 2


def test_bad_programs_get_clear_errors():
    mesh = Mesh(4, 4)
    with pytest.raises(MeshError, match="transmits east, which leaves the 4 x 4 grid"):
        mesh.route((3, 1), 0, "west", "east")
    with pytest.raises(MeshError, match=r"PE \(0, 0\) needs color 24, but a TOY PE routes at most 24 colors"):
        mesh.route((0, 0), 24, "ramp", "east")
    crowd = [coll.straight((i, 0), (i + 26, 0)) for i in range(26)]  # 26 paths over PEs 25 and 26
    with pytest.raises(ValueError, match=r"PE \(24, 0\) is crossed by 25 paths that need distinct colors; "
                                         r"a PE routes at most 24"):
        coll.assign_colors(crowd, limit=TOY.colors)
    small = Mesh(4, 4, TOY.with_grid(4, 4))
    with pytest.raises(MeshError, match=r"SRAM overflow at PE \(2, 3\): storing 'A' \(49,156 bytes\) "
                                        r"on top of "
                                        r"0 bytes needs 49,156 bytes, over its 49,152"):
        small.store((2, 3), "A", np.zeros(49_156 // 4))
    loop = Mesh(2, 1)
    loop.route((0, 0), 5, "east", "east")
    loop.route((1, 0), 5, "west", "west")
    with pytest.raises(MeshError, match=r"routes of color 5 form a cycle through PEs "
                                        r"\(\d, 0\) -> \(\d, 0\) -> "
                                        r"\(\d, 0\): a wavelet on it would never drain"):
        loop.run()
    stall = Mesh(2, 1)
    stall.program((1, 0), [Recv(3, "x", 4)])
    with pytest.raises(MeshError, match=r"stalled at cycle 0: PE \(1, 0\) waits in Recv for color 3 "
                                        r"\(0 of 4 wavelets arrived\)"):
        stall.run()
    stray = Mesh(2, 1)
    stray.store((0, 0), "x", [1.0])
    stray.route((0, 0), 1, "ramp", "east")
    stray.program((0, 0), [Send(1, "x")])
    with pytest.raises(MeshError, match=r"color 1 reached PE \(1, 0\) from west at cycle 1, "
                                        r"but the PE has no route"):
        stray.run()
    with pytest.raises(ValueError, match="rows of A=10 must be divisible by the grid's 4"):
        coll.gemv(np.zeros((10, 8)), np.zeros(8), (4, 2))
    with pytest.raises(ValueError, match="method='strassen'"):
        coll.gemm(np.zeros((4, 4)), np.zeros((4, 4)), 2, "strassen")
