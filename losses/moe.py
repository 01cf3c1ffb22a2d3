"""MoE balance terms: pure functions of per-layer router logits (torch only).

Both take `router_logits`: a list with one (N, E) tensor per MoE layer (N tokens,
E experts), e.g. `students.build.collect_router_logits(model)`, and return a scalar
averaged over layers (0 for an empty list, so dense students need no special case).
"""
from __future__ import annotations

import torch


def _zero(router_logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros(()) if not router_logits else router_logits[0].new_zeros((), dtype=torch.float32)


def routed_slots(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """(L, E) fp32: routing slots each expert got, per layer (top-k of the raw logits).

    Summed over data-parallel ranks (and divided by the sum) it gives the fractions f_e of
    the micro-batch all ranks share, which `load_balancing_loss(..., fractions=)` takes."""
    rows = []
    for logits in router_logits:  # (N, E)
        chosen = torch.topk(logits.detach(), top_k, dim=-1).indices.reshape(-1)  # (N*k,)
        # scatter_add, not bincount: CUDA's bincount reads the ids' range back to the host.
        slots = torch.zeros(logits.shape[-1], dtype=torch.long, device=logits.device)  # (E,)
        rows.append(slots.scatter_add_(0, chosen, torch.ones_like(chosen)).float())
    return torch.stack(rows)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        fractions: torch.Tensor | None = None, n_tokens: float | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss, E * sum_e f_e * P_e, averaged over layers.

    f_e: fraction of the N*top_k routing slots that go to expert e (the tokens whose
         top-k includes e, divided by top_k), so sum_e f_e = 1.  Not differentiable.
    P_e: mean over tokens of the router probability of e.  Carries the gradient.
    Equals 1 for perfectly uniform routing and probabilities, up to E when collapsed.
    Fedus et al. 2021, arXiv:2101.03961, eq. 4.

    Llama 4 gates with a per-expert sigmoid, which is not a distribution over experts;
    P uses softmax over the logits instead, so the loss keeps the Switch meaning ("mass
    the router puts on each expert") and its 1-at-balance scale.  The selection for f
    is the top-k of the raw logits (any selection-only `expert_bias` is not seen).

    fractions: (L, E) f_e per layer taken over more tokens than these (the micro-batch as
    every rank together holds it: `routed_slots` all-reduced, normalised).  P_e stays this
    call's own mean, so averaging the ranks' gradients gives the gradient of the loss over
    the whole micro-batch: a MoE update then does not depend on how many ranks split it
    (Qiu et al. 2025, "Demons in the Detail", global-batch balance).

    n_tokens: with `fractions` of a whole training step, the step's token count (every
    micro-batch, every rank): P_e is then this call's SHARE of the step's mean (its sum
    over these N tokens / n_tokens), and the shares of all micro-batches add up to the loss
    of the step as one big batch.  None: P_e is the mean over these N tokens.
    """
    if not router_logits:
        return _zero(router_logits)
    losses = []
    for i, logits in enumerate(router_logits):  # (N, E)
        logits = logits.float()
        num_experts = logits.shape[-1]
        if fractions is None:
            chosen = torch.topk(logits.detach(), top_k, dim=-1).indices  # (N, k)
            slots = torch.zeros_like(logits).scatter_(1, chosen, 1.0)  # (N, E) 1 where routed
            fraction = slots.mean(dim=0) / top_k  # (E,) f_e
        else:
            fraction = fractions[i].to(logits.device)  # (E,)
        prob = torch.softmax(logits, dim=-1).sum(dim=0) / (logits.shape[0] if n_tokens is None else n_tokens)  # (E,) P_e
        losses.append(num_experts * torch.sum(fraction * prob))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: list[torch.Tensor], n_tokens: float | None = None) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, averaged over layers.

    Keeps router logits small so the router stays numerically stable (ST-MoE,
    Zoph et al. 2022, arXiv:2202.08906, eq. 5).  Computed in fp32.  n_tokens: divide the
    sum over these tokens by a whole step's token count instead (this call's share of the
    step's mean; see `load_balancing_loss`).
    """
    if not router_logits:
        return _zero(router_logits)
    losses = [torch.logsumexp(logits.float(), dim=-1).square().sum() / (logits.shape[0] if n_tokens is None else n_tokens)
              for logits in router_logits]
    return torch.stack(losses).mean()
