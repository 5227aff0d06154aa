import math

import pytest
import torch

from wise_bench.merge import MergeAlg, elect_sign_mean, keep_top_magnitude, merge, slerp_pair

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
# Deltas from BASE: d1 = [3, -1, 2, 0.5], d2 = [-1.5, -4, 1, 0.2].
W1 = BASE + torch.tensor([3.0, -1.0, 2.0, 0.5])
W2 = BASE + torch.tensor([-1.5, -4.0, 1.0, 0.2])


def test_keep_top_magnitude_keeps_int_density_times_numel_entries():
    d = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    assert torch.equal(keep_top_magnitude(d, 0.5), torch.tensor([[3.0, 0.0], [2.0, 0.0]]))
    assert torch.equal(keep_top_magnitude(d, 0.53), torch.tensor([[3.0, 0.0], [2.0, 0.0]]))  # int(2.12) = 2
    assert torch.equal(keep_top_magnitude(d, 0.1), torch.zeros(2, 2))


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    # Trimmed (density 0.5): d1 -> [3, 0, 2, 0], d2 -> [-1.5, -4, 0, 0].
    # Equal weights: sums [1.5, -4, 2, 0] elect [+, -, +, +]; agreeing entries: [3], [-4], [2], none.
    assert torch.allclose(merge("ties", BASE, [W1, W2], [0.5, 0.5], density=0.5), BASE + torch.tensor([3.0, -4.0, 2.0, 0.0]))
    # Weights 0.25 / 0.75: entry 0 sums to 0.75 - 1.125 < 0, so d2's -1.5 wins there.
    assert torch.allclose(merge("ties", BASE, [W1, W2], [0.25, 0.75], density=0.5), BASE + torch.tensor([-1.5, -4.0, 2.0, 0.0]))


def test_sign_election_mean_counts_only_agreeing_nonzero_entries():
    deltas = torch.tensor([[2.0, 0.0, 1.0], [4.0, 0.0, -3.0], [0.0, 0.0, -1.0]])
    w = torch.tensor([1.0, 1.0, 2.0])
    # Entry 0: both positive, weighted mean (2 + 4) / 2; entry 1: 0/0 -> 0; entry 2: sum 1 - 3 - 2 < 0,
    # agreeing -3 (w 1) and -1 (w 2): (-3 - 2) / 3.
    assert torch.allclose(elect_sign_mean(deltas, w), torch.tensor([3.0, 0.0, -5.0 / 3.0]))


def test_sign_merge_is_ties_without_trimming():
    # Sums [1.5, -5, 3, 0.7]: entry 0 keeps 3; entry 1 mean of -1 and -4; entries 2, 3 means of both.
    expected = BASE + torch.tensor([3.0, -2.5, 1.5, 0.35])
    assert torch.allclose(merge("sign", BASE, [W1, W2], [0.5, 0.5]), expected)


def test_linear_is_the_weighted_mean_of_the_deltas():
    expected = BASE + (0.25 * (W1 - BASE) + 0.75 * (W2 - BASE))
    assert torch.allclose(merge("linear", BASE, [W1, W2], [0.25, 0.75]), expected)
    assert torch.allclose(merge("linear", BASE, [W1, W2], [1.0, 3.0]), expected)


def test_dare_drops_and_rescales_reproducibly():
    big = [BASE.repeat(1000) + torch.arange(4000.0) % 7 + 1]  # every delta non-zero
    out = merge("dare", BASE.repeat(1000), big, [1.0], density=0.25, generator=torch.Generator().manual_seed(0))
    delta, full = out - BASE.repeat(1000), big[0] - BASE.repeat(1000)
    kept = delta != 0
    assert torch.allclose(delta[kept], full[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    again = merge("dare", BASE.repeat(1000), big, [1.0], density=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="needs a generator"):
        merge("dare", BASE, [W1], [1.0])


def test_dare_at_density_one_reduces_to_linear_and_sign():
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(merge("dare", BASE, [W1, W2], [0.5, 0.5], 1.0, g), merge("linear", BASE, [W1, W2], [0.5, 0.5]))
    assert torch.allclose(merge("dare_ties", BASE, [W1, W2], [0.5, 0.5], 1.0, g), merge("sign", BASE, [W1, W2], [0.5, 0.5]))


def test_slerp_of_orthogonal_deltas_and_its_colinear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = math.sqrt(0.5)
    assert torch.allclose(slerp_pair(a, b, 0.5), torch.tensor([half, half]))
    assert torch.allclose(slerp_pair(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear
    base = torch.tensor([1.0, 1.0])
    assert torch.allclose(merge("slerp", base, [base + a, base + b], [1.0, 1.0]), base + torch.tensor([half, half]))
    # Three equal weights fold as 1/2 then 1/3 of the way.
    c = torch.tensor([-1.0, 0.0])
    folded = slerp_pair(slerp_pair(a, b, 0.5), c, 1 / 3)
    assert torch.allclose(merge("slerp", base, [base + a, base + b, base + c], [1.0, 1.0, 1.0]), base + folded)


def test_merge_checks_its_arguments():
    with pytest.raises(ValueError, match="one weight per tensor"):
        merge("ties", BASE, [W1, W2], [1.0])
    with pytest.raises(ValueError):
        merge("nope", BASE, [W1], [1.0])
    assert {a.value for a in MergeAlg} == {"ties", "linear", "slerp", "dare", "dare_ties", "sign"}
