"""The student model family against stock transformers (fp32, CPU, tiny sizes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration
from transformers import Llama4TextConfig
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from students import sparse_moe
from students.build import build_model, collect_router_logits, expert_load, load_causal_lm
from students.init import init_from_teacher
from students.presets import PRESETS, PUBLISHED, PUBLISHED_COUNTS, param_counts
from students.sparse_moe import SparseLlama4TextExperts, SparseLlama4TextMoe, enable_sparse_moe, update_expert_bias

transformers.logging.set_verbosity_error()

VOCAB, SEQ = 64, 12
# 4 layers: layer 3 is NoPE (full attention, temperature tuning is non-trivial with
# floor_scale=2), layers 0-2 use RoPE with chunked attention (chunk 4 < SEQ).
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)
LLAMA4_TINY = dict(TINY, attention_chunk_size=4, floor_scale=2)
SIZES = {
    "behemoth": dict(LLAMA4_TINY, intermediate_size=16, intermediate_size_mlp=48, num_experts=16),
    "scout": dict(LLAMA4_TINY, intermediate_size=16, intermediate_size_mlp=48, num_experts=8),
    "maverick": dict(LLAMA4_TINY, intermediate_size=8, intermediate_size_mlp=48, num_experts=16),
    "dense": dict(TINY, num_layers=2, intermediate_size=48),
    "dense_llama4": dict(LLAMA4_TINY, intermediate_size_mlp=48),
}
MOE_LAYERS = {"behemoth": 4, "scout": 4, "maverick": 2, "dense": 0, "dense_llama4": 0}


def tiny(name: str, **overrides):
    return PRESETS[name](**(SIZES[name] | overrides))


def stock_model(config, seed: int = 0):
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else Llama4ForCausalLM
    return cls(config)


def sparse_copy(stock):
    model = build_model(stock.config)
    model.load_state_dict(stock.state_dict())  # strict: same names and shapes
    return model


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


# ---- parity with stock transformers -----------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_logits_and_grads_match_stock(name):
    config = tiny(name)
    if isinstance(config, Llama4TextConfig):
        # The parity run must exercise both attention kinds and (for Maverick) both FFN kinds.
        assert set(config.layer_types) == {"chunked_attention", "full_attention"}
        assert config.attention_chunk_size < SEQ
    stock = stock_model(config)
    sparse = sparse_copy(stock)
    assert sum(isinstance(m, SparseLlama4TextMoe) for m in sparse.modules()) == MOE_LAYERS[name]
    assert not any(isinstance(m, SparseLlama4TextMoe) for m in stock.modules())

    ids = tokens()
    out_stock, out_sparse = stock(ids, labels=ids), sparse(ids, labels=ids)
    torch.testing.assert_close(out_sparse.logits, out_stock.logits, rtol=0, atol=1e-5)
    out_stock.loss.backward()
    out_sparse.loss.backward()
    g_stock, g_sparse = grads(stock), grads(sparse)
    for pname, g in g_stock.items():
        torch.testing.assert_close(g_sparse[pname], g, rtol=1e-4, atol=1e-6, msg=pname)
    if MOE_LAYERS[name]:  # the comparison covered live router / expert gradients
        routed = [n for n in g_stock if "router" in n or "experts." in n]
        assert routed and all(g_stock[n].abs().sum() > 0 for n in routed)


def _moe_pair(top_k: int, num_experts: int = 8, hidden: int = 32, inter: int = 16):
    config = PRESETS["scout"](hidden_size=hidden, intermediate_size=inter, num_experts=num_experts, top_k=top_k)
    torch.manual_seed(0)
    stock = Llama4TextMoe(config)
    with torch.no_grad():  # a bare block is not post_init'ed: experts start as zeros / torch.empty
        stock.experts.gate_up_proj.normal_(0, 0.2)
        stock.experts.down_proj.normal_(0, 0.2)
    sparse = SparseLlama4TextMoe(config)
    sparse.load_state_dict(stock.state_dict())
    return stock, sparse


@pytest.mark.parametrize("path", ["pad", "bucket", "loop", "grouped_mm", "auto"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_every_expert_path_matches_stock_block(path, top_k):
    if path == "grouped_mm" and not sparse_moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("torch has no CPU grouped_mm")
    stock, sparse = _moe_pair(top_k)
    sparse.path = path
    # 5 tokens over 8 experts: some experts get none, load is uneven.
    x = torch.randn(5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (out_s, logits_s), (out_p, logits_p) = stock(x), sparse(x2)
    torch.testing.assert_close(out_p, out_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_p, logits_s)
    out_s.square().sum().backward()
    out_p.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(stock.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("path", ["pad", "bucket", "loop", "grouped_mm"])
def test_expert_paths_under_bf16_autocast(path):
    # CPU autocast stands in for CUDA's: the jagged kernel needs explicit casts.
    if path == "grouped_mm" and not sparse_moe.grouped_mm_available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("torch has no CPU bf16 grouped_mm")
    stock, sparse = _moe_pair(top_k=2)
    sparse.path = path
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = stock(x)[0], sparse(x)[0]
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _reference_moe(moe, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Llama 4 MoE written token by token: shared(x) + sum_j expert_j(x * sigmoid(logit_j))."""
    logits = x @ moe.router.weight.T  # (N, E)
    select = logits if bias is None else logits + bias
    w1, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
    inter = w2.shape[1]
    rows = []
    for t in range(x.shape[0]):
        out = moe.shared_expert(x[t])
        for e in torch.topk(select[t], moe.top_k).indices.tolist():
            z = x[t] * torch.sigmoid(logits[t, e])
            h = z @ w1[e]
            out = out + (F.silu(h[:inter]) * h[inter:]) @ w2[e]
        rows.append(out)
    return torch.stack(rows)


def test_top2_matches_handwritten_reference():
    _, sparse = _moe_pair(top_k=2)
    x = torch.randn(7, 32)
    out, _ = sparse(x)
    torch.testing.assert_close(out, _reference_moe(sparse, x), rtol=0, atol=1e-6)
    assert int(sparse.last_expert_counts.sum()) == 7 * 2


def test_expert_bias_moves_selection_not_gates():
    _, sparse = _moe_pair(top_k=1)
    x = torch.randn(6, 32)
    bias = torch.zeros(8)
    bias[3] = 100.0  # every token must now pick expert 3, gated by its *unbiased* logit
    sparse.expert_bias.copy_(bias)
    out, _ = sparse(x)
    assert sparse.last_expert_counts.tolist() == [0, 0, 0, 6, 0, 0, 0, 0]
    torch.testing.assert_close(out, _reference_moe(sparse, x, bias), rtol=0, atol=1e-6)
    assert "expert_bias" not in sparse.state_dict()  # checkpoints stay stock


# ---- the sparse path only computes assigned tokens ---------------------------------

def test_experts_see_exactly_their_tokens():
    _, sparse = _moe_pair(top_k=2)
    seen = {}
    # The block calls its `experts` module (as stock does), so a forward hook sees the
    # rows each expert computes: (xs (M, H), sorted_expert (M,), counts (E,), path).
    sparse.experts.register_forward_hook(lambda mod, args, out: seen.update(zip(("xs", "ids", "counts"), args)))
    x = torch.randn(5, 32)
    sparse(x)
    logits = x @ sparse.router.weight.T
    top_vals, top_ids = torch.topk(logits, 2)
    # M = N * top_k rows reach the experts (stock: E * N).
    assert seen["xs"].shape == (10, 32)
    assert torch.equal(seen["counts"], torch.bincount(top_ids.reshape(-1), minlength=8))
    expected = {}
    for t in range(5):
        for j in range(2):
            expected.setdefault(int(top_ids[t, j]), []).append(x[t] * torch.sigmoid(top_vals[t, j]))
    for e in range(8):
        rows = seen["xs"][seen["ids"] == e]
        want = torch.stack(expected[e]) if e in expected else torch.zeros(0, 32)
        torch.testing.assert_close(rows, want)


def test_sparse_block_reads_nothing_back_to_the_host():
    """On a GPU a value the forward reads to the host (`.item()`, `.tolist()`, or an op whose
    output size depends on values, like CUDA's bincount sizing itself from the ids' max) stalls
    the launch queue once per MoE layer.  Under FakeTensorMode tensors carry no values, so any
    such read raises: the grouped-GEMM forward (bf16, as on a GPU) and the balance loss's
    routing counts run through it whole."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from losses.moe import routed_slots

    if not sparse_moe.grouped_mm_available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("torch has no CPU bf16 grouped_mm")
    _, sparse = _moe_pair(top_k=2)
    sparse.to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, logits = sparse(x)
        slots = routed_slots([logits], top_k=2)
    assert out.shape == (5, 32) and slots.shape == (1, 8)
    # And the counts are those of the real forward.
    _, real_logits = sparse(x)
    top_ids = torch.topk(real_logits, 2).indices.reshape(-1)
    assert torch.equal(routed_slots([real_logits], 2)[0], torch.bincount(top_ids, minlength=8).float())


def test_expert_counts_are_the_bincount_of_the_sorted_ids():
    ids = torch.tensor([0, 0, 3, 3, 3, 7])  # experts 1, 2, 4-6 empty, the last one used
    assert torch.equal(sparse_moe.expert_counts(ids, 8), torch.bincount(ids, minlength=8))
    assert torch.equal(sparse_moe.expert_counts(torch.zeros(0, dtype=torch.long), 8), torch.zeros(8, dtype=torch.long))


def test_expert_flops_scale_with_assignments_not_experts():
    stock, sparse = _moe_pair(top_k=1)
    sparse.path = "loop"  # the jagged kernels are not in the FLOP counter's table
    x = torch.randn(10, 32)
    counted = []
    for module in (sparse, stock):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counted.append(counter.get_total_flops())
    n, h, i, e = 10, 32, 16, 8
    router, shared = 2 * n * h * e, 3 * 2 * n * h * i
    routed = 2 * n * h * (2 * i) + 2 * n * i * h  # gate_up then down, for N*top_k rows
    assert counted == [router + shared + routed, router + shared + e * routed]


def test_unassigned_expert_gets_exactly_zero_grad():
    _, sparse = _moe_pair(top_k=1)
    x = torch.randn(3, 32)  # 3 tokens, 8 experts: at least 5 idle
    out, _ = sparse(x)
    out.sum().backward()
    idle = (sparse.last_expert_counts == 0).nonzero().flatten()
    busy = (sparse.last_expert_counts > 0).nonzero().flatten()
    assert len(idle) >= 5
    assert torch.count_nonzero(sparse.experts.gate_up_proj.grad[idle]) == 0
    assert torch.count_nonzero(sparse.experts.down_proj.grad[idle]) == 0
    assert all(sparse.experts.down_proj.grad[e].abs().sum() > 0 for e in busy)


# ---- records, balancing, generation -----------------------------------------------

def test_router_records_match_stock_output_recorder():
    model = build_model(tiny("maverick"), seed=0)
    ids = tokens()
    out = model(ids, output_router_logits=True)
    recorded = collect_router_logits(model)
    assert len(recorded) == len(out.router_logits) == 2
    for mine, theirs in zip(recorded, out.router_logits):
        assert mine.shape == (2 * SEQ, 16) and mine.requires_grad
        torch.testing.assert_close(mine, theirs)
    assert [int(c.sum()) for c in expert_load(model)] == [2 * SEQ, 2 * SEQ]


def test_update_expert_bias_moves_toward_balance():
    _, sparse = _moe_pair(top_k=1, num_experts=4)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) + 1.0
    with torch.no_grad():
        sparse.router.weight[0] += 0.02  # skew the load (64 tokens, 4 experts)
    sparse.train()
    sparse(x)
    load = sparse.counts_since_update.float()
    assert int(load.max() - load.min()) >= 20
    assert update_expert_bias(sparse, rate=0.01) == 1
    torch.testing.assert_close(sparse.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert int(sparse.counts_since_update.sum()) == 0
    with torch.no_grad():  # eval-style forwards are not counted
        sparse(x)
    assert update_expert_bias(sparse, rate=0.01) == 0

    for _ in range(40):
        sparse(x)
        update_expert_bias(sparse, rate=0.02)
    sparse(x)
    last = sparse.last_expert_counts
    assert int(last.max() - last.min()) <= 4
    sparse.to(torch.bfloat16)  # casts the buffer; the next update goes back to fp32
    sparse(x.bfloat16())
    update_expert_bias(sparse, rate=0.02)
    assert sparse.expert_bias.dtype == torch.float32


def test_sparse_generate_matches_stock():
    stock = stock_model(tiny("scout"))
    sparse = sparse_copy(stock)
    prompt = tokens(batch=1)[:, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


# ---- checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["scout", "maverick", "dense"])
def test_save_then_stock_from_pretrained(tmp_path, name):
    model = build_model(tiny(name), seed=0)
    model.save_pretrained(tmp_path)
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any(isinstance(m, SparseLlama4TextMoe) for m in stock.modules())
    reloaded = load_causal_lm(tmp_path)
    assert sum(isinstance(m, SparseLlama4TextMoe) for m in reloaded.modules()) == MOE_LAYERS[name]
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(stock(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=0, atol=0)


def test_load_text_tower_of_multimodal_checkpoint(tmp_path):
    text = tiny("scout", num_layers=2).to_dict()
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16, projector_output_dim=16)
    torch.manual_seed(0)
    full = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision))
    full.save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path)
    assert type(model) is Llama4ForCausalLM and len(collect_router_logits(model)) == 0
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, full.language_model(ids).logits, rtol=0, atol=1e-5)
    assert len(collect_router_logits(model)) == 2


def test_inspect_describes_a_multimodal_llama4_dir_by_its_text_model(tmp_path, cli):
    """Llama 4 as Meta ships it (a Llama4Config holding text and vision configs): `inspect`
    read `vocab_size` from the top-level config and crashed with a traceback, exit 1."""
    text = tiny("scout", num_layers=2).to_dict()
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16, projector_output_dim=16)
    Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).save_pretrained(tmp_path)
    r = cli("inspect", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    total, active = param_counts(load_causal_lm(tmp_path).config)
    for want in ("llama4 (its text model, llama4_text, counted)", f"vocab_size │ {VOCAB}", f"{total:,}", f"{active:,}"):
        assert want in out, (want, out)


def test_broken_model_dirs_raise_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path)
    build_model(tiny("dense"), seed=0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors") as err:
        load_causal_lm(tmp_path)
    assert "\n" not in str(err.value)
    weights.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors"):
        load_causal_lm(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_causal_lm(tmp_path)
    # A checkpoint lacking tensors must not load with silently random weights.
    from safetensors.torch import load_file, save_file
    weights.write_bytes(good)
    state = load_file(weights)
    state.pop("model.norm.weight")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight"):
        load_causal_lm(tmp_path)


# ---- build, init, counts ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_total_is_numel(name):
    config = tiny(name)
    model = build_model(config)
    total, active = param_counts(config)
    assert total == sum(p.numel() for p in model.parameters())
    idle = sum(
        (m.num_experts - m.top_k) * m.experts.gate_up_proj[0].numel() * 3 // 2 for m in sparse_moe.moe_modules(model)
    )
    assert active == total - idle


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "mixtral"])
def test_param_counts_of_other_families_as_their_configs_come(kind):
    """A stock config as transformers makes it, with no head_dim or attention_bias field (a
    default Qwen2Config has neither): counted from a weightless model, biases included."""
    from transformers import AutoModelForCausalLM, MistralConfig, MixtralConfig, Qwen2Config

    make = {"qwen2": Qwen2Config, "mistral": MistralConfig, "mixtral": MixtralConfig}[kind]
    config = make(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, **({"num_local_experts": 4, "num_experts_per_tok": 2} if kind == "mixtral" else {}))
    total, active = param_counts(config)
    assert total == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert (active < total) == (kind == "mixtral")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_of_published_shapes(name):
    total, active = param_counts(PRESETS[name](**PUBLISHED[name]))
    want_active, want_total = PUBLISHED_COUNTS[name]
    # Announced counts are rounded and Scout's 109B includes its vision tower.
    assert abs(total / want_total - 1) < 0.02 and abs(active / want_active - 1) < 0.02


def test_build_model_seed_dtype_and_scaled_init():
    config = tiny("scout")
    rng = torch.get_rng_state()
    a, b = build_model(config, seed=3), build_model(config, seed=3, scaled_init=True)
    assert torch.equal(torch.get_rng_state(), rng)  # seeding did not touch the global RNG
    factor = (2 * config.num_hidden_layers) ** -0.5
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in pa:
        scaled = n.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
        torch.testing.assert_close(pb[n], pa[n] * factor if scaled else pa[n], rtol=0, atol=0, msg=n)
    assert build_model(config, seed=3, dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_init_from_teacher_copies_what_it_reports():
    teacher = build_model(tiny("behemoth"), seed=0)  # 4 layers, 16 experts
    student = build_model(tiny("scout", num_layers=2), seed=1)  # 2 layers, 8 experts
    report = init_from_teacher(student, teacher)
    names = {n for n, _ in student.named_parameters()}
    assert set(report["copied"]) | set(report["skipped"]) == names
    assert not report["skipped"]  # same widths: everything has a source
    s, t = dict(student.named_parameters()), dict(teacher.named_parameters())
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    # default layer map: evenly spaced, first and last -> [0, 3]
    assert torch.equal(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(s["model.layers.0.feed_forward.shared_expert.down_proj.weight"],
                       t["model.layers.0.feed_forward.shared_expert.down_proj.weight"])
    for leaf in ("experts.gate_up_proj", "experts.down_proj", "router.weight"):
        src = t[f"model.layers.3.feed_forward.{leaf}"]
        torch.testing.assert_close(s[f"model.layers.1.feed_forward.{leaf}"], src[:8], rtol=0, atol=0)
    assert report["copied"]["model.layers.1.feed_forward.router.weight"].startswith("model.layers.3.")


def test_init_from_teacher_skips_what_does_not_fit():
    teacher = build_model(tiny("behemoth"), seed=0)
    with torch.no_grad():  # norms init to 1 in both models: shift so every copy shows
        for p in teacher.parameters():
            p.add_(1.0)
    # Maverick student: layers 0, 2 dense (teacher has MoE there), experts narrower.
    student = build_model(tiny("maverick"), seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    report = init_from_teacher(student, teacher, layers=[0, 1, 2, 3])
    skipped = report["skipped"]
    dense_in_student = "model.layers.0.feed_forward.gate_proj.weight"
    assert skipped[dense_in_student] == f"teacher has no {dense_in_student}"
    assert skipped["model.layers.1.feed_forward.experts.down_proj"].startswith("shape")
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) == (n in skipped), n
    # Across families only embeddings, lm_head and final norm move.
    llama = build_model(tiny("dense"), seed=2)
    report = init_from_teacher(llama, teacher)
    assert sorted(report["copied"]) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    with pytest.raises(ValueError, match="layers must give 2"):
        init_from_teacher(llama, teacher, layers=[0])


def test_enable_sparse_moe_is_in_place_and_idempotent():
    model = stock_model(tiny("scout"))
    params = {n: p for n, p in model.named_parameters()}
    assert enable_sparse_moe(model) == 4
    assert enable_sparse_moe(model) == 0
    assert all(type(m.experts) is SparseLlama4TextExperts for m in sparse_moe.moe_modules(model))
    assert all(p is params[n] for n, p in model.named_parameters())
    assert set(model.state_dict()) == set(stock_model(tiny("scout")).state_dict())


def test_presets_take_raw_config_fields_and_reject_typos():
    assert PRESETS["scout"](moe_layers=[0, 2]).moe_layers == [0, 2]
    assert PRESETS["maverick"](num_layers=6).moe_layers == [1, 3, 5]
    assert PRESETS["dense_llama4"]().moe_layers == []
    with pytest.raises(TypeError, match="num_expert"):
        PRESETS["scout"](num_expert=4)
    with pytest.raises(TypeError, match="moe_layers"):
        PRESETS["dense"](moe_layers=[0])


def test_llama4_configs_name_their_moe_layers_as_vllm_reads_them():
    """vLLM takes layer i as MoE when interleave_moe_layer_step > 0 and (i + 1) % step == 0;
    transformers reads moe_layers.  Every preset writes both alike; a config whose moe_layers
    no step can name (a student cut to irregular MoE layers) is said to be unservable."""
    from students.presets import align_moe_step, dense_llama4, maverick, scout

    for make, step in ((scout, 1), (maverick, 2), (dense_llama4, 0)):
        c = make(num_layers=6)
        assert c.interleave_moe_layer_step == step
        assert [i for i in range(6) if step > 0 and (i + 1) % step == 0] == c.moe_layers
    old = maverick(num_layers=6)
    old.interleave_moe_layer_step = 1  # as exports made before 2026-12-05 said
    assert align_moe_step(old) is None and old.interleave_moe_layer_step == 2
    old.moe_layers = [0, 3]
    assert "follow no fixed interval" in align_moe_step(old)
