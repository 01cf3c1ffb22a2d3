"""MoE balance terms on hand-built router logits, with hand-computed values.

The logits are logs of small integers so softmax probabilities are simple fractions:
a row [0, ln 3] has probabilities [1/4, 3/4] and logsumexp ln 4.
"""
from __future__ import annotations

import math

import torch

from losses.moe import load_balancing_loss, router_z_loss

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)

# Layer A: both tokens prefer expert 1 with p = [1/4, 3/4].
#   f = [0, 1], P = [1/4, 3/4]  ->  balance = 2 * (0 * 1/4 + 1 * 3/4) = 1.5
#   z = (ln 4)^2 for both tokens  ->  1.9218120557...
LAYER_A = torch.tensor([[0.0, LN3], [0.0, LN3]])
# Layer B: one token per expert, p = [3/4, 1/4] and [1/4, 3/4].
#   f = [1/2, 1/2], P = [1/2, 1/2]  ->  balance = 2 * (1/4 + 1/4) = 1.0 (perfect balance)
LAYER_B = torch.tensor([[LN3, 0.0], [0.0, LN3]])
# Layer C: one token, 3 experts, top-2; p = [1, 2, 5] / 8, top-2 = {2, 1}.
#   f = [0, 1/2, 1/2], P = [1/8, 2/8, 5/8]
#   balance = 3 * (1/2 * 2/8 + 1/2 * 5/8) = 3 * 7/16 = 1.3125
#   z = (ln 8)^2 = 4.3240771...
LAYER_C = torch.tensor([[0.0, LN2, LN5]])


def test_balance_loss_hand_values():
    assert torch.isclose(load_balancing_loss([LAYER_A], top_k=1), torch.tensor(1.5))
    assert torch.isclose(load_balancing_loss([LAYER_B], top_k=1), torch.tensor(1.0))
    # averaged over layers: (1.5 + 1.0) / 2
    assert torch.isclose(load_balancing_loss([LAYER_A, LAYER_B], top_k=1), torch.tensor(1.25))
    assert torch.isclose(load_balancing_loss([LAYER_C], top_k=2), torch.tensor(1.3125))


def test_z_loss_hand_values():
    assert torch.isclose(router_z_loss([LAYER_A]), torch.tensor(1.9218120557))
    assert torch.isclose(router_z_loss([LAYER_C]), torch.tensor(4.3240771))
    assert torch.isclose(router_z_loss([LAYER_A, LAYER_C]), torch.tensor((1.9218120557 + 4.3240771) / 2))


def test_gradients_hand_values():
    # Balance: only P carries gradient; for one token dP_e/dl = p_e (delta - p), so
    #   d/dl = 3 * p * (f - f.p) with f.p = 7/16:
    #   3 * [1/8 * -7/16, 2/8 * 1/16, 5/8 * 1/16] = [-21/128, 6/128, 15/128]
    logits = LAYER_C.clone().requires_grad_()
    load_balancing_loss([logits], top_k=2).backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-21 / 128, 6 / 128, 15 / 128]]))
    # z-loss: d/dl lse^2 = 2 lse * softmax = 2 ln 8 * [1, 2, 5] / 8
    logits = LAYER_C.clone().requires_grad_()
    router_z_loss([logits]).backward()
    torch.testing.assert_close(logits.grad, 2 * math.log(8) * torch.tensor([[1.0, 2.0, 5.0]]) / 8)


def test_empty_list_is_zero_and_low_precision_is_fp32():
    for loss in (load_balancing_loss([], top_k=1), router_z_loss([])):
        assert loss.shape == () and loss.item() == 0.0
    half = LAYER_A.to(torch.bfloat16)
    assert load_balancing_loss([half], top_k=1).dtype == torch.float32
    assert router_z_loss([half]).dtype == torch.float32
