"""The verification's figures against a hand computation on a three-token example (no model involved).

Logits over a 2-token vocabulary, chosen so every softmax is a simple fraction:
    original  a: [ln 1, ln 3], [ln 2, ln 2], [0, 0]   → p = (1/4, 3/4), (1/2, 1/2), (1/2, 1/2)
    converted b: [ln 1, ln 1], [ln 1, ln 4], [0, 0]   → q = (1/2, 1/2), (1/5, 4/5), (1/2, 1/2)
    token ids 0, 1, 0 (labels: the next token, so positions 0 and 1 are scored: 1 then 0)
"""

import math

import pytest
import torch

from netmorph.verify.compare import compare_logits

LN = math.log
A = torch.tensor([[LN(1), LN(3)], [LN(2), LN(2)], [0.0, 0.0]], dtype=torch.float64)
B = torch.tensor([[LN(1), LN(1)], [LN(1), LN(4)], [0.0, 0.0]], dtype=torch.float64)
IDS = torch.tensor([[0, 1, 0]])


def kl(p, q):
    return sum(pi * LN(pi / qi) for pi, qi in zip(p, q))


def test_figures_equal_the_hand_computation():
    figures = compare_logits(A, B, IDS, "hand")
    differences = [0, LN(3), LN(2), LN(2) - LN(4), 0, 0]  # a − b, element by element
    assert figures.tokens == 3
    assert figures.max_abs_logit_diff == pytest.approx(LN(3), abs=1e-12)
    assert figures.mean_abs_logit_diff == pytest.approx(sum(map(abs, differences)) / 6, abs=1e-12)
    # KL(original ‖ converted), averaged over the three positions
    expected_kl = (kl((1 / 4, 3 / 4), (1 / 2, 1 / 2)) + kl((1 / 2, 1 / 2), (1 / 5, 4 / 5)) + 0) / 3
    assert figures.mean_kl == pytest.approx(expected_kl, abs=1e-12)
    assert figures.mean_kl != pytest.approx((kl((1 / 2, 1 / 2), (1 / 4, 3 / 4)) + kl((1 / 5, 4 / 5), (1 / 2, 1 / 2))) / 3)
    # next-token losses: position 0 predicts token 1, position 1 predicts token 0
    assert figures.loss_original == pytest.approx((-LN(3 / 4) - LN(1 / 2)) / 2, abs=1e-12)
    assert figures.loss_converted == pytest.approx((-LN(1 / 2) - LN(1 / 5)) / 2, abs=1e-12)
    assert figures.perplexity_original == pytest.approx(math.exp((-LN(3 / 4) - LN(1 / 2)) / 2), abs=1e-12)
    assert figures.perplexity_converted == pytest.approx(math.exp((-LN(1 / 2) - LN(1 / 5)) / 2), abs=1e-12)
