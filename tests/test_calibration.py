"""The PE instruction model (wafer.kernels) and the table of published points (wafer.calibration)."""

import dataclasses
import math

import pytest

from wafer import calibration, cost, inference, kernels
from wafer.hardware import WSE1, WSE2
from wafer.kernels import IDEAL, WSE2_COSTS, PECosts
from wafer.shape import LLAMA3_8B
from wafer.target import Target


def test_instruction_rate_is_simd_or_the_ports():
    # fp16: 4 lanes; 2 reads x 4 x 2 bytes = 16 bytes fill the read ports exactly; a third stream caps
    # the rate at 16 / 6 elements per cycle; a write-heavy op (2 writes) at 8 / 4.
    assert kernels.rate(WSE2, IDEAL, "fp16") == 4
    assert kernels.rate(WSE2, IDEAL, "fp16", reads=3) == pytest.approx(16 / 6)
    assert kernels.rate(WSE2, IDEAL, "fp16", reads=1, writes=2) == 2
    assert kernels.rate(WSE2, IDEAL, "fp32") == 1
    assert kernels.instruction_cycles(40, WSE2, PECosts(op_start_cycles=4), "fp16") == 4 + 10
    assert kernels.instruction_cycles(0, WSE2, WSE2_COSTS, "fp16") == 0


def test_ideal_gemv_equals_the_cost_model_and_the_simulator():
    # With no start-up the kernel is the product at the FMAC peak plus the tree allreduce: the
    # analytic model's pieces, and the simulator's cycles for one row of the grid.
    for n, p in ((4096, 64), (2048, 128)):
        k = kernels.gemv(WSE2, n, p, IDEAL)
        b = n // p
        assert k.total == cost.compute_cycles(b * b, WSE2, "fp16") + cost.allreduce_cycles(
            WSE2, p, cost.wavelets(b, "fp16"), 2)
        simulated = calibration.simulated_row_cycles(p, cost.wavelets(b, "fp16"), 2, "allreduce")
        assert k.total == k.compute + simulated


def test_gemv_start_up_adds_one_per_column():
    base = kernels.gemv(WSE2, 16384, 512, IDEAL)
    four = kernels.gemv(WSE2, 16384, 512, PECosts(op_start_cycles=4))
    assert four.total - base.total == 32 * 4  # 32 columns in a 32 x 32 block
    with pytest.raises(ValueError, match="grid side 500 must divide n=16384"):
        kernels.gemv(WSE2, 16384, 500)


def test_calibration_reproduces_the_sgemm_and_only_it():
    c = kernels.calibrate_fp32_rate()
    assert kernels.summa_gemm(WSE2, 33_000, 750, c).flops_per_s(WSE2) == pytest.approx(349.0e12, rel=1e-9)
    assert 0.2 < c.fp32_fmacs_per_cycle < 0.4
    assert c == WSE2_COSTS
    # a slower clock makes the same rate a larger share of the peak
    slow = kernels.calibrate_fp32_rate(wafer=WSE2.with_clock(0.85e9))
    assert slow.fp32_fmacs_per_cycle > c.fp32_fmacs_per_cycle
    with pytest.raises(ValueError, match="above what the WSE-2 can reach"):
        kernels.calibrate_fp32_rate(published_flops_per_s=5e15)


def test_pe_costs_reject_bad_values():
    with pytest.raises(ValueError, match="fp32_fmacs_per_cycle=1.5"):
        PECosts(fp32_fmacs_per_cycle=1.5)
    with pytest.raises(ValueError, match="op_start_cycles=-1"):
        PECosts(op_start_cycles=-1)
    with pytest.raises(ValueError, match="sram_reserve_bytes=60000 leaves nothing"):
        kernels.with_reserve(WSE2, PECosts(sram_reserve_bytes=60000))


def test_bicgstab_flops_and_bound():
    k = kernels.bicgstab(WSE1, 1536, IDEAL)
    assert k.flops == 46 * 1536 * WSE1.pes
    # 7 instructions of three streams at 8/3 per cycle exceed the 4 x 768 wavelets of the ramp
    assert 7 * 1536 / (8 / 3) > 4 * 768
    assert k.total > k.compute  # the allreduces come on top


def test_decode_kernel_adds_to_the_analytic_step():
    t = Target(WSE2, context=2048)
    base = inference.decode(LLAMA3_8B, t, 360)
    ideal = kernels.decode(LLAMA3_8B, t, 360, IDEAL)
    assert ideal.analytic_s == base.seconds
    assert ideal.products_s == 0  # no start-up: the per-column instructions take ceil(bm / 4) each...
    real = kernels.decode(LLAMA3_8B, t, 360)
    assert real.seconds > base.seconds and real.tokens_per_s == pytest.approx(1 / real.seconds)


def test_cannon_instructions_along_either_side():
    # 2048 x 4096 by 4096 x 4096 on 360 x 360: blocks of 6 x 12 x 12. Down the rows: 12 x 12 instructions
    # of 6 per step; along the outputs: 6 x 12 of 12.
    c = PECosts(op_start_cycles=4)
    m = kernels.cannon_gemm(WSE2, 2048, 4096, 4096, 360, c, along="m")
    n = kernels.cannon_gemm(WSE2, 2048, 4096, 4096, 360, c, along="n")
    assert m.compute == 360 * 144 * (4 + 6 / 4) and n.compute == 360 * 72 * (4 + 12 / 4)
    assert m.communicate == n.communicate
    with pytest.raises(ValueError, match="along='k'"):
        kernels.cannon_gemm(WSE2, 8, 8, 8, 2, c, along="k")


def test_prefill_kernel_ideal_matches_chapter_13():
    t = Target(WSE2, context=2048)
    for side in (180, 360):
        ideal = kernels.prefill(LLAMA3_8B, t, side, IDEAL)
        assert 2048 / ideal.seconds(WSE2) == pytest.approx(inference.prefill(LLAMA3_8B, t, side).tokens_per_s,
                                                           rel=1e-3)
        best = kernels.prefill(LLAMA3_8B, t, side, along="best")
        assert kernels.prefill(LLAMA3_8B, t, side).total > best.total > ideal.total


def test_calibration_table():
    points = calibration.points()
    assert {p.role for p in points} <= set(calibration.ROLES)
    validation = [p for p in points if p.role == "validates"]
    assert len(validation) >= 10
    assert all(calibration.error(p.ratio) <= 2 for p in validation)
    assert calibration.geometric_mean_error(points) <= 1.35
    assert [p.role for p in points if p.quantity.startswith("SGEMM")] == ["calibrates"]
    reduce = next(p for p in points if p.quantity.startswith("reduce"))
    assert math.isclose(reduce.simulated, reduce.model)
    with pytest.raises(ValueError, match="collective='gather'"):
        calibration.simulated_row_cycles(4, 1, 1, "gather")


def test_error_and_geometric_mean():
    assert calibration.error(0.5) == 2 and calibration.error(2.0) == 2
    with pytest.raises(ValueError, match="ratio=0"):
        calibration.error(0)
    p = calibration.Point("q", "s", "u", 1.0, "src", 4.0, 4.0, None, "validates", "wafer timing")
    q = dataclasses.replace(p, model=0.25 * 1.0)
    assert calibration.geometric_mean_error([p, q]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no validation points"):
        calibration.geometric_mean_error([dataclasses.replace(p, role="calibrates")])
    with pytest.raises(ValueError, match="kind='GPU' is not one of"):
        calibration.geometric_mean_error([p], "GPU")
    assert dataclasses.replace(p, unit="us").speed_ratio == 0.25 and p.speed_ratio == 4.0
