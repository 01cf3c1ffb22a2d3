"""A sparse forward for transformers' `Llama4TextMoe`, over the very same parameters.

Stock `Llama4TextMoe.forward` feeds *every* token to *every* expert: it repeats the
(N, H) token matrix E times, scales each copy by that expert's sigmoid gate (0 for
experts outside the token's top-k) and runs one (E, N, H) @ (E, H, 2I) bmm.  The
compute is E / top_k times what the routing needs.

`SparseLlama4TextMoe` keeps the stock module tree and parameter names
(`router.weight` (E, H), `experts.gate_up_proj` (E, H, 2I), `experts.down_proj`
(E, I, H), `shared_expert.{gate,up,down}_proj`), so `state_dict`, `save_pretrained`
and `from_pretrained` are unchanged; only the forwards of the block and of its
`experts` differ.  It sorts the N*k (token, expert) assignments by expert and runs
each expert on its own tokens only.

Llama 4 semantics, matched exactly (see `Llama4Router` / `Llama4TextMoe.forward`):
  logits = router(x)                       (N, E)
  top-k over the logits                    (N, k) ids
  gate   = sigmoid(top-k logits)           (N, k), computed in fp32
  out    = shared_expert(x) + sum_j expert_{id_j}(x * gate_j)
The gate scales the expert's *input*, not its output.

Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2): a non-persistent
buffer `expert_bias` (E,) is added to the logits for expert *selection* only; gates use
the unbiased logits.  `update_expert_bias` nudges it toward balanced load, from token
counts summed over all data-parallel ranks.  The buffer is not persistent, so
model.safetensors stays stock: the training state carries it (`expert_biases` /
`set_expert_biases`), and export reports what dropping it does to routing
(`routing_changes_without_bias`); stock Llama 4 has no place for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts, Llama4TextMoe

# Choosing the expert kernel.  Padded bmm wastes E*C - M rows of compute (C = max
# tokens per expert, M = N*top_k); the jagged grouped GEMM wastes none.  Expert
# fwd+bwd, H = 256, CPU-ms on 1 thread (median of 5; torch 2.13, AVX-512 EPYC, 2026-12-02,
# bench/moe.py's shapes and smaller; CPU time, which other load on the cores disturbs little):
#                         M      max/mean load   pad   bucket  grouped_mm  loop   dense 2I
#   16 experts x 512      256    1.88             22    32      16          20     10
#                         512    1.34             36     -      27           -      -
#                         2048   1.13             85     -      68           -      -
#                         2048   1.31             97    120     69          78      -
#   128 experts x 128     2048   1.75            109     -      52           -      -
#                         2048   9.0             247     83     35          54     32
# torch's grouped GEMM is the fastest wherever it runs, also when padding would waste
# little (an earlier rule took one padded bmm up to 1.4x / 2x waste: 1.25-2.1x slower
# here, and it is what a balanced router gets).  Without it: one padded bmm while padding
# wastes little, else power-of-two buckets (`bucket`), which never waste more than 2x.
# See `_choose_path`.
_PAD_MAX_WASTE_FEW_EXPERTS = 1.4
_PAD_MAX_WASTE_MANY_EXPERTS = 2.0
_MANY_EXPERTS = 64

PATHS = ("auto", "pad", "bucket", "grouped_mm", "loop")

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_grouped_mm_probe: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's jagged grouped GEMM runs forward *and* backward here.

    torch documents it for bf16 on CUDA sm80+; torch 2.13 also runs it on CPU in fp32.
    Rather than encode those rules, run a tiny case once per (device type, dtype),
    including an empty group, and cache the answer.
    """
    if _grouped_mm is None:
        return False
    key = (device.type, dtype)
    if key not in _grouped_mm_probe:
        try:
            # Probe with grad on and autocast off whatever context the first forward runs in
            # (a no_grad first call must not cache "unavailable").
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                _grouped_mm_probe[key] = _probe_grouped_mm(device, dtype)
        except (RuntimeError, NotImplementedError, TypeError):
            _grouped_mm_probe[key] = False
    return _grouped_mm_probe[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG stream alone
    a = torch.randn(12, 16, device=device, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(3, 16, 8, device=device, generator=gen).to(dtype).requires_grad_()
    offs = torch.tensor([5, 5, 12], device=device, dtype=torch.int32)  # group 1 is empty
    out = _grouped_mm(a, b, offs=offs)  # (12, 8)
    out.backward(torch.ones_like(out))
    ref = torch.cat([a[:5] @ b[0], a[5:] @ b[2]])
    return bool(torch.allclose(out, ref, rtol=1e-2, atol=1e-2))


def route(
    router_logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 routing: (N, E) logits -> gates (N, k) and expert ids (N, k).

    The bias (E,) only moves the selection; the gate is sigmoid of the *unbiased* logit
    (computed in fp32 like `Llama4Router`, then cast back to the logits' dtype).
    """
    select = router_logits if expert_bias is None else router_logits + expert_bias.to(router_logits.dtype)
    _, expert_ids = torch.topk(select.detach(), top_k, dim=-1)  # (N, k)
    chosen = router_logits.gather(1, expert_ids)  # (N, k), carries the router's grad
    gates = torch.sigmoid(chosen.float()).to(router_logits.dtype)
    return gates, expert_ids


def experts_forward(
    xs: torch.Tensor,
    sorted_expert: torch.Tensor,
    counts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    path: str = "auto",
) -> torch.Tensor:
    """Run each expert's SwiGLU on its own rows of `xs`.

    xs:            (M, H) expert inputs, sorted by expert id (M = N * top_k).
    sorted_expert: (M,) the expert id of each row, non-decreasing.
    counts:        (E,) rows per expert; sum(counts) == M.
    gate_up_proj:  (E, H, 2I) stock layout: first I columns gate, last I up.
    down_proj:     (E, I, H).
    Returns (M, H): row r is expert sorted_expert[r] applied to xs[r].
    """
    if path not in PATHS:
        raise ValueError(f"unknown MoE path {path!r}; expected one of {PATHS}")
    if xs.shape[0] == 0:
        return xs.new_zeros(0, gate_up_proj.shape[1])
    if path == "auto":
        path = _choose_path(xs, counts, gate_up_proj)
    if path == "grouped_mm":
        return _grouped_experts(xs, counts, gate_up_proj, down_proj, act_fn)
    if path == "loop":
        return _loop_experts(xs, counts, gate_up_proj, down_proj, act_fn)
    if path == "bucket":
        return _bucket_experts(xs, sorted_expert, counts, gate_up_proj, down_proj, act_fn)
    return _pad_experts(xs, sorted_expert, counts, gate_up_proj, down_proj, act_fn)


def _compute_dtype(xs: torch.Tensor) -> torch.dtype:
    # Under autocast stock's bmm runs in the autocast dtype; the jagged kernel is not on
    # autocast's list, so it gets explicit casts.
    if torch.is_autocast_enabled(xs.device.type):
        return torch.get_autocast_dtype(xs.device.type)
    return xs.dtype


def _grouped_ok(xs: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    dtype = _compute_dtype(xs)
    item = torch.empty(0, dtype=dtype).element_size()
    _, hidden, two_inter = gate_up_proj.shape
    aligned = (hidden * item) % 16 == 0 and (two_inter // 2 * item) % 16 == 0  # 16-byte row strides
    return aligned and grouped_mm_available(xs.device, dtype)


def _choose_path(xs: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor) -> str:
    """torch's jagged grouped GEMM wherever it runs (CUDA or CPU: no padding, no host sync);
    else one padded bmm while padding wastes little, else buckets (see the table above)."""
    if _grouped_ok(xs, gate_up_proj):
        return "grouped_mm"
    num_experts = counts.shape[0]
    waste = num_experts * int(counts.max()) / xs.shape[0]  # padded rows / real rows
    limit = _PAD_MAX_WASTE_MANY_EXPERTS if num_experts >= _MANY_EXPERTS else _PAD_MAX_WASTE_FEW_EXPERTS
    return "pad" if waste <= limit else "bucket"


def _swiglu_bmm(buf: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act_fn) -> torch.Tensor:
    """(G, C, H) rows, (G, H, 2I), (G, I, H) -> (G, C, H)."""
    gate, up = torch.bmm(buf, w1).chunk(2, dim=-1)  # (G, C, I) each
    return torch.bmm(act_fn(gate) * up, w2)


def _pad_experts(xs, sorted_expert, counts, gate_up_proj, down_proj, act_fn) -> torch.Tensor:
    """Scatter rows into an (E, C, H) buffer zero-padded to the largest count C; two bmm's.

    Padding rows are zero in and out (no biases, act(0) * 0 == 0), so they add nothing
    to outputs or gradients.
    """
    num_experts, hidden, _ = gate_up_proj.shape
    num_rows = xs.shape[0]
    capacity = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts  # (E,) first row of each expert
    pos = torch.arange(num_rows, device=xs.device) - starts[sorted_expert]  # (M,) row within its expert
    slot = sorted_expert * capacity + pos  # (M,) row in the flattened buffer
    buf = xs.new_zeros(num_experts * capacity, hidden).index_copy(0, slot, xs)
    out = _swiglu_bmm(buf.view(num_experts, capacity, hidden), gate_up_proj, down_proj, act_fn)  # (E, C, H)
    return out.reshape(num_experts * capacity, hidden)[slot]  # (M, H)


def _bucket_experts(xs, sorted_expert, counts, gate_up_proj, down_proj, act_fn) -> torch.Tensor:
    """Padded bmm's over buckets of experts with similar load.

    Each non-empty expert is padded to the next power of two >= its count (at most 2x
    waste whatever the imbalance), and experts with equal padded size share one bmm.
    That is a handful of large ops where a jagged kernel issues several small GEMMs per
    expert; on CPU those small GEMMs each open a thread-parallel region, which costs
    little on an idle machine but stalls badly when other processes share the cores.
    """
    num_experts, hidden, _ = gate_up_proj.shape
    num_rows = xs.shape[0]
    count_list = counts.tolist()
    buckets: dict[int, list[int]] = {}
    for e, c in enumerate(count_list):
        if c:
            buckets.setdefault(1 << (c - 1).bit_length(), []).append(e)
    caps = sorted(buckets)
    order = [e for cap in caps for e in buckets[cap]]  # non-empty experts, grouped by bucket
    sizes = [len(buckets[cap]) for cap in caps]

    # Slot layout: bucket after bucket, each (experts_in_bucket, cap) row-major.
    slot_base = [0] * num_experts  # first slot of each expert
    base = 0
    for cap in caps:
        for e in buckets[cap]:
            slot_base[e] = base
            base += cap
    device = xs.device
    starts = torch.cumsum(counts, 0) - counts  # (E,) first row of each expert in xs
    pos = torch.arange(num_rows, device=device) - starts[sorted_expert]  # (M,) row within its expert
    row_slot = torch.tensor(slot_base, device=device)[sorted_expert] + pos  # (M,) slot of each row

    buf = xs.new_zeros(base, hidden).index_copy(0, row_slot, xs)  # (S, H), S = sum of padded sizes
    index = torch.tensor(order, device=device)
    # One gather per weight; split (not slicing) so backward is one cat, not a
    # full-size zero tensor per bucket.
    w1s = gate_up_proj.index_select(0, index).split(sizes)
    w2s = down_proj.index_select(0, index).split(sizes)
    bufs = buf.split([size * cap for cap, size in zip(caps, sizes)])
    outs = [
        _swiglu_bmm(rows.view(size, cap, hidden), w1, w2, act_fn).reshape(size * cap, hidden)
        for cap, size, rows, w1, w2 in zip(caps, sizes, bufs, w1s, w2s)
    ]
    return torch.cat(outs)[row_slot]  # (M, H)


def _loop_experts(xs, counts, gate_up_proj, down_proj, act_fn) -> torch.Tensor:
    """One GEMM pair per non-empty expert (reference path; slow with many experts)."""
    # unbind (not w[e]) so backward stacks E grads once instead of materialising a
    # full (E, H, 2I) zero tensor per expert.
    w1s, w2s = gate_up_proj.unbind(0), down_proj.unbind(0)
    outs = []
    for e, rows in enumerate(xs.split(counts.tolist())):
        if rows.shape[0]:
            gate, up = (rows @ w1s[e]).chunk(2, dim=-1)  # (m_e, I) each
            outs.append((act_fn(gate) * up) @ w2s[e])  # (m_e, H)
    return torch.cat(outs)


def _grouped_experts(xs, counts, gate_up_proj, down_proj, act_fn) -> torch.Tensor:
    """torch's jagged grouped GEMM over the expert-sorted rows."""
    if not _grouped_ok(xs, gate_up_proj):
        raise RuntimeError(f"grouped_mm is not usable for {_compute_dtype(xs)} on {xs.device.type}")
    dtype = _compute_dtype(xs)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end row of each expert
    h = _grouped_mm(xs.to(dtype), gate_up_proj.to(dtype), offs=offs)  # (M, 2I)
    gate, up = h.chunk(2, dim=-1)
    return _grouped_mm((act_fn(gate) * up).contiguous(), down_proj.to(dtype), offs=offs)  # (M, H)


def expert_counts(sorted_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(M,) non-decreasing expert ids -> (E,) int64 rows per expert.

    Read off the sorted ids with searchsorted rather than `torch.bincount`: CUDA's bincount
    reads the ids' min and max back to the host to size its output, two syncs per MoE layer
    per forward that stall the launch queue at small steps.  This is all on the device."""
    edges = torch.arange(num_experts + 1, device=sorted_expert.device, dtype=sorted_expert.dtype)
    return torch.searchsorted(sorted_expert, edges).diff()  # first row of expert e+1 - first of e


class SparseLlama4TextExperts(Llama4TextExperts):
    """`Llama4TextExperts` whose forward takes expert-sorted rows (see `experts_forward`).

    The MoE block calls this module rather than reading its weights, so module hooks
    run as in stock: DeepSpeed ZeRO-3 gathers partitioned parameters in a pre-forward
    hook, and a forward hook sees exactly the rows each expert computes.
    """

    def forward(self, xs: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor, path: str = "auto"):
        return experts_forward(xs, sorted_expert, counts, self.gate_up_proj, self.down_proj, self.act_fn, path)


class SparseLlama4TextMoe(Llama4TextMoe):
    """`Llama4TextMoe` with a sparse forward; same parameters, same outputs.

    Per forward it records:
      last_router_logits  (N, E) the router's logits, graph kept (for aux losses);
      last_expert_counts  (E,) int64 tokens routed to each expert (detached);
      counts_since_update (E,) int64 sum of counts over grad-enabled training forwards
                          since the last `update_expert_bias` (so gradient accumulation
                          balances over the whole step, not the last micro-batch).
    `path` picks the expert kernel: "auto" (default), "pad", "bucket", "grouped_mm"
    or "loop" (see `_choose_path`); all give the same result up to float rounding.
    """

    path: str = "auto"

    def __init__(self, config):
        super().__init__(config)
        self._init_sparse_state()

    def _init_sparse_state(self) -> None:
        self.experts.__class__ = SparseLlama4TextExperts
        device = self.router.weight.device
        # Not persistent: the checkpoint stays stock and loads into stock transformers.
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, device=device), persistent=False)
        self.register_buffer(
            "counts_since_update", torch.zeros(self.num_experts, dtype=torch.long, device=device), persistent=False
        )
        self.last_router_logits: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)  # (N, H)
        num_tokens = x.shape[0]
        # Call the stock router module (not just its weight) so transformers' output
        # recorder still sees it (`output_router_logits=True`); we use its logits only.
        _, router_logits = self.router(x)  # (N, E)
        gates, expert_ids = route(router_logits, self.expert_bias, self.top_k)  # (N, k) each

        # Sort the N*k (token, slot) assignments by expert; a stable sort keeps token
        # order inside each expert, so results do not depend on sort internals.
        flat_expert = expert_ids.reshape(-1)  # (M,), index t*k + j
        order = torch.argsort(flat_expert, stable=True)  # (M,)
        sorted_expert = flat_expert[order]  # (M,) non-decreasing
        counts = expert_counts(sorted_expert, self.num_experts)  # (E,)
        sorted_token = order // self.top_k  # (M,) token of each sorted row
        xs = x[sorted_token] * gates.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # (M, H)

        ys = self.experts(xs, sorted_expert, counts, self.path)  # (M, H)
        # Undo the sort with a gather (deterministic, unlike index_add on CUDA).
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        routed = ys[inverse]  # (N*k, H), row t*k + j
        if self.top_k > 1:
            routed = routed.view(num_tokens, self.top_k, -1).sum(dim=1)  # (N, H)

        out = self.shared_expert(x) + routed  # (N, H)

        self.last_router_logits = router_logits
        self.last_expert_counts = counts.detach()
        if self.training and torch.is_grad_enabled():
            self.counts_since_update += counts.detach()
        return out, router_logits


def moe_modules(model: nn.Module) -> list[SparseLlama4TextMoe]:
    """The sparse MoE blocks of `model`, in module (= layer) order."""
    return [m for m in model.modules() if isinstance(m, SparseLlama4TextMoe)]


def enable_sparse_moe(model: nn.Module) -> int:
    """Swap every stock `Llama4TextMoe` in `model` to the sparse forward, in place.

    Only `__class__` changes (of the block and of its `experts`; plus two
    non-persistent buffers), so parameters, optimizer state and hooks stay attached.
    Returns how many blocks were swapped (0 for models without MoE, e.g. Llama or
    dense Llama 4, and on a second call).
    """
    swapped = 0
    for module in model.modules():
        if type(module) is Llama4TextMoe:
            module.__class__ = SparseLlama4TextMoe
            module._init_sparse_state()
            swapped += 1
    return swapped


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float) -> int:
    """One aux-loss-free balancing step per MoE layer (DeepSeek-V3).

    bias_e += rate * sign(mean_load - load_e), with load from `counts_since_update`
    (tokens routed since the last call); underloaded experts become likelier picks.
    sign() makes the step scale-free, so counting a recomputed (activation
    checkpointed) forward twice changes nothing.  Layers with no recorded training
    tokens are left alone.  Returns the number of layers updated.
    """
    updated = 0
    moes = moe_modules(model)
    if moes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank routed its own tokens: sum the counts so every replica takes the same
        # step from the global load (else the biases, and so the routing, drift apart).
        counts = torch.stack([m.counts_since_update for m in moes])  # (L, E) int64
        dist.all_reduce(counts)
        for m, c in zip(moes, counts):
            m.counts_since_update.copy_(c)
    for moe in moes:
        load = moe.counts_since_update.float()  # (E,)
        if load.sum() == 0:
            continue
        # Accumulate in fp32 even if `model.to(bf16)` cast the buffer: bf16 would round
        # away steps of ~1e-3 once the bias reaches ~0.25.
        moe.expert_bias = moe.expert_bias.float() + rate * torch.sign(load.mean() - load)
        moe.counts_since_update.zero_()
        updated += 1
    return updated


def expert_biases(model: nn.Module) -> list[torch.Tensor]:
    """Each MoE layer's selection bias (E,) fp32 on the CPU, in layer order (training state)."""
    return [m.expert_bias.detach().float().cpu().clone() for m in moe_modules(model)]


def routing_counts(model: nn.Module) -> list[torch.Tensor]:
    """Each MoE layer's tokens per expert since the last bias update, (E,) int64 on the CPU
    (training state: a resume continues the count exactly)."""
    return [m.counts_since_update.detach().cpu().clone() for m in moe_modules(model)]


def set_routing_counts(model: nn.Module, counts: list[torch.Tensor]) -> None:
    moes = moe_modules(model)
    if len(counts) != len(moes):
        raise ValueError(f"{len(counts)} routing counts for {len(moes)} MoE layers")
    for m, c in zip(moes, counts):
        m.counts_since_update.copy_(c)


def set_expert_biases(model: nn.Module, biases: list[torch.Tensor]) -> None:
    moes = moe_modules(model)
    if len(biases) != len(moes):
        raise ValueError(f"{len(biases)} expert biases for {len(moes)} MoE layers")
    for m, b in zip(moes, biases):
        m.expert_bias = b.float().to(m.router.weight.device)


@torch.no_grad()
def routing_changes_without_bias(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """After a forward of `model` (biases set), which tokens' experts the bias decided.

    Per MoE layer the same router logits (N, E) pick the top-k with and without the bias.
    Returns (changed (N,) bool: at least one layer picks another expert set without it,
    per_layer (L,) int64: tokens changed in each layer).  Router inputs are the biased
    model's own hidden states, so this isolates the bias's effect at each layer."""
    changed, per_layer = None, []
    for m in moe_modules(model):
        logits = m.last_router_logits.float()  # (N, E)
        with_bias = torch.topk(logits + m.expert_bias.float(), m.top_k, dim=-1).indices.sort(-1).values
        without = torch.topk(logits, m.top_k, dim=-1).indices.sort(-1).values  # (N, k)
        diff = (with_bias != without).any(-1)  # (N,)
        per_layer.append(int(diff.sum()))
        changed = diff if changed is None else changed | diff
    if changed is None:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    return changed, torch.tensor(per_layer)
