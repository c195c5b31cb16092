"""The split-K variants' exact sums (csrc/gptq/splitk_sum.cuh), checked on the host.

Each K block's fp16 share becomes an integer number of 2^-27 units (or a flag
for NaN/inf), the blocks add those integers, and the total is rounded to fp16
once. Integer addition is exact, so the order the blocks arrive in cannot
matter; what can be wrong is the encoding and the one rounding. Both are plain
integer code compiled for host and device, so here they are compiled for the
host with nvcc or hipcc and compared with numpy: every fp16 encoding, every
rounding boundary between neighbouring fp16 values, overflow, the flags.
No GPU is needed; a missing compiler skips with the reason.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import find_tool

ROOT = Path(__file__).resolve().parents[1]
UNIT = 2.0**-27  # one step of the fixed-point sums
FLAG_NAN, FLAG_POS_INF, FLAG_NEG_INF = 1, 2, 4

DRIVER = r"""
#include <cstdio>
#include "gptq/splitk_sum.cuh"
// stdin: "T <fp16 bits>" -> "A <term>" (add) or "O <flag>" (or); "S <sum>" -> "<fp16 bits>".
int main()
{
    char op[2];
    unsigned long long x;
    while (std::scanf("%1s %llu", op, &x) == 2) {
        if (op[0] == 'T') {
            unsigned long long term;
            const bool add = o4g::splitk_term(static_cast<uint16_t>(x), term);
            std::printf("%c %llu\n", add ? 'A' : 'O', term);
        } else {
            std::printf("%u\n", static_cast<unsigned>(o4g::splitk_total(x)));
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module", params=["nvcc", "hipcc"])
def driver(request, tmp_path_factory):
    compiler = find_tool(request.param)
    if compiler is None:
        pytest.skip(f"{request.param} is not installed")
    work = tmp_path_factory.mktemp(request.param)
    (work / "driver.cu").write_text(DRIVER)
    command = [compiler, "-std=c++17", f"-I{ROOT / 'csrc'}", "-o", str(work / "driver"), str(work / "driver.cu")]
    env = dict(os.environ)
    if request.param == "nvcc":
        home = Path(compiler).resolve().parents[1]
        command[1:1] = ["-x", "cu"] + [f"-L{home / lib}" for lib in ("lib", "lib64") if (home / lib).is_dir()]
    else:
        env["HIP_PLATFORM"] = "amd"  # hipcc picks NVIDIA when it sees nvcc on PATH
        command[1:1] = ["-x", "hip", "--offload-arch=gfx906"]
    subprocess.run(command, check=True, capture_output=True, env=env)
    return work / "driver"


def run(driver: Path, lines: list) -> list:
    result = subprocess.run([str(driver)], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)
    return result.stdout.split("\n")[:-1]


def terms(driver: Path, half_bits) -> list:
    """(is_add, value) for each fp16 bit pattern."""
    return [(out[0] == "A", int(out[2:])) for out in run(driver, [f"T {int(b)}" for b in half_bits])]


def totals(driver: Path, sums) -> np.ndarray:
    """The fp16 result of each int64 workspace value (given as Python ints, any sign)."""
    lines = [f"S {int(s) % 2**64}" for s in sums]
    return np.array([int(out) for out in run(driver, lines)], dtype=np.uint16).view(np.float16)


def signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def expected(sums) -> np.ndarray:
    """Round-to-nearest-even of sum * 2^-27 (exact in float64 below 2^53; above, beyond fp16)."""
    with np.errstate(over="ignore"):
        return np.array([np.float16(float(s) * UNIT) if abs(s) < 2**53 else np.float16(np.inf if s > 0 else -np.inf)
                         for s in sums], dtype=np.float16)


ALL_HALVES = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


def test_every_finite_share_is_its_exact_value_in_units_and_the_rest_are_flags(driver):
    values = ALL_HALVES.view(np.float16).astype(np.float64)
    for bits, value, (is_add, term) in zip(ALL_HALVES, values, terms(driver, ALL_HALVES)):
        if np.isnan(value):
            assert (is_add, term) == (False, FLAG_NAN), hex(bits)
        elif np.isinf(value):
            assert (is_add, term) == (False, FLAG_POS_INF if value > 0 else FLAG_NEG_INF), hex(bits)
        else:
            assert is_add and signed(term) == int(value / UNIT) and signed(term) % 8 == 0, hex(bits)


def test_a_single_share_comes_back_unchanged(driver):
    finite = ALL_HALVES[np.isfinite(ALL_HALVES.view(np.float16))]
    sums = [signed(term) for _, term in terms(driver, finite)]
    got = totals(driver, sums)
    want = finite.view(np.float16).copy()
    want[want == 0] = 0  # -0 has no integer: the sum is +0, as fp16 adds starting from +0 give
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_every_rounding_boundary_between_neighbouring_halves(driver):
    # Totals are multiples of 8 units (2^-24). Around each midpoint between two
    # neighbouring positive finite fp16 values: just below, on it (a tie: to
    # even), just above; mirrored for negative totals.
    positive = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    low, high = positive[:-1] / UNIT, positive[1:] / UNIT
    middle = ((low + high) / 2).astype(np.int64)
    sums = np.concatenate([middle - 8, middle, middle + 8])
    sums = sums[(sums % 8 == 0) & (sums >= 0)]
    sums = np.concatenate([sums, -sums]).tolist()
    assert np.array_equal(totals(driver, sums).view(np.uint16), expected(sums).view(np.uint16))


def test_overflow_rounds_to_infinity_like_fp16(driver):
    # 65504 is the largest fp16; 65520 (the midpoint to 2^16) and above round to inf.
    edge = int(65520 / UNIT)
    sums = [edge - 8, edge, edge + 8, 2**43, 3 * 2**42, 2**53 - 8, 2**53, 2**62]
    sums += [-s for s in sums]
    got = totals(driver, sums)
    assert got[0] == 65504 and got[8] == -65504
    assert np.array_equal(got.view(np.uint16), expected(sums).view(np.uint16))


def test_random_sums_of_shares_round_once(driver):
    # Up to 512 blocks (K = 64k rows) of shares of many magnitudes: the integer
    # sum is the exact sum of the shares, and it is rounded once.
    rng = np.random.default_rng(0)
    finite = ALL_HALVES[np.isfinite(ALL_HALVES.view(np.float16))]
    term_of = dict(zip(finite.tolist(), (signed(t) for _, t in terms(driver, finite))))
    sums, exact = [], []
    for _ in range(4000):
        blocks = int(rng.integers(1, 513))
        scale = float(2.0 ** rng.integers(-20, 12))
        shares = (rng.standard_normal(blocks) * scale).astype(np.float16)
        sums.append(sum(term_of[int(b)] for b in shares.view(np.uint16)))
        exact.append(sum(shares.astype(np.float64)))  # exact: multiples of 2^-24 below 2^29
    assert sums == [round(e / UNIT) for e in exact]
    assert np.array_equal(totals(driver, sums).view(np.uint16), expected(sums).view(np.uint16))


@pytest.mark.parametrize("flags, finite, want", [
    (FLAG_NAN, 0, np.nan),
    (FLAG_NAN | FLAG_POS_INF, 8, np.nan),
    (FLAG_POS_INF | FLAG_NEG_INF, 0, np.nan),  # inf + (-inf)
    (FLAG_POS_INF, -int(60000 / UNIT), np.inf),
    (FLAG_NEG_INF, int(60000 / UNIT), -np.inf),
    (FLAG_POS_INF, 0, np.inf),
])
def test_non_finite_shares_give_what_ieee_addition_gives(driver, flags, finite, want):
    # A non-finite share ORs its flag into the low bits, which finite terms
    # (multiples of 8) never touch: flags and sums meet in any order.
    got = totals(driver, [finite | flags])[0]
    if np.isnan(want):
        assert np.isnan(got)
    else:
        assert got == want
