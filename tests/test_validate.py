"""Held-out metrics are chunked over tokens like training: same figures as the full
(B, T, V) logits, without ever holding them."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill.train.validate import evaluate_model
from losses import DIVERGENCES
from losses.signal import TeacherSignal
from students.build import build_model
from students.presets import dense, scout


class TopKTeacher:
    """A fixed random top-k signal (B, T, k), built without any (B, T, V) tensor."""

    def __init__(self, vocab: int, k: int = 8):
        self.vocab, self.k = vocab, k

    def signal(self, batch):
        g = torch.Generator().manual_seed(sum(batch.indices))
        shape = (*batch.input_ids.shape, self.k)
        ids = torch.stack([torch.randperm(self.vocab, generator=g)[: self.k] for _ in range(shape[0] * shape[1])])
        logprobs = torch.log_softmax(torch.randn(shape, generator=g), -1) - 0.5  # top-k holds e^-0.5 of the mass
        valid = torch.rand(shape[:2], generator=g) > 0.2
        return TeacherSignal(ids.reshape(shape), logprobs), valid


def reference(model, blocks, teacher):
    """The metrics from full (N, T, V) logits, as evaluation computed them before chunking."""
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1]).logits.float()  # (N, T, V)
    labels = blocks[:, 1:]
    from teachers import Batch

    sig, valid = teacher.signal(Batch.of(blocks, list(range(len(blocks)))))
    flat = logits.reshape(-1, logits.shape[-1])
    kl = DIVERGENCES["forward_kl"](flat, sig.flatten(), temperature=1.0, tail="bucket")
    return {"val_ce": float(torch.nn.functional.cross_entropy(flat, labels.reshape(-1))),
            "teacher_top1_agreement": float(((logits.argmax(-1) == sig.most_likely()) & valid).sum() / valid.sum()),
            "kl_to_teacher": float((kl * valid.reshape(-1)).sum() / valid.sum())}


def test_chunked_metrics_equal_full_logits():
    V = 96
    model = build_model(scout(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                              intermediate_size=32, num_experts=4, attention_chunk_size=8), seed=0)
    blocks = torch.randint(0, V, (6, 13), generator=torch.Generator().manual_seed(0))
    teacher = TopKTeacher(V)
    # one batch of all 6 blocks: the reference sees the same teacher rows (seeded by indices)
    got = evaluate_model(model, blocks, teacher, batch_size=6, chunk_size=7)  # 72 tokens, chunks of 7
    for key, value in reference(model, blocks, teacher).items():
        assert abs(got[key] - value) < 1e-5, (key, got[key], value)
    assert [sum(layer) for layer in got["expert_load"]] == [6 * 12]  # top-1: every held-out token routed


class LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_eval_memory_does_not_scale_with_batch_times_vocab():
    V, B, T, chunk = 50_000, 8, 32, 32
    model = build_model(dense(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                              intermediate_size=32), seed=0)
    blocks = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    with LargestOutput() as mode:
        evaluate_model(model, blocks, TopKTeacher(V), batch_size=B, chunk_size=chunk)
    # (chunk, V) logits and their softmax temporaries, never (B, T, V) = 8x more
    assert mode.largest <= chunk * V, (mode.largest, B * T * V)


class OwnSamplesTeacher:
    """The model's own distribution at T = 1 as a sampled signal of n draws a token: the
    teacher's row of a report with a sampled cache, where KL(teacher || student) is 0 and the
    estimate shows only its noise."""

    def __init__(self, model, n: int, seed: int):
        self.model, self.n, self.seed = model, n, seed

    def signal(self, batch):
        from losses.signal import sample_signal

        with torch.no_grad():
            logits = self.model(input_ids=batch.input_ids).logits.float()  # (B, T, V)
        keys = torch.arange(logits.shape[0] * logits.shape[1]).view(logits.shape[:2])
        return sample_signal(logits, self.n, 1.0, self.seed, keys), torch.ones(logits.shape[:2], dtype=torch.bool)


def test_a_sampled_kl_estimate_is_reported_as_it_is_not_clamped_at_zero():
    """A sampled signal's KL is an unbiased estimate: against the model's own draws it
    scatters around 0, below it too.  It was clamped at 0, biasing every near-zero figure up
    (and the teacher's own row, which the report says shows the noise, read exactly 0)."""
    V = 64
    model = build_model(dense(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                              intermediate_size=32), seed=0)
    blocks = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(0))
    from teachers import Batch

    estimates = []
    for seed in range(6):
        teacher = OwnSamplesTeacher(model, n=8, seed=seed)
        got = evaluate_model(model, blocks, teacher, batch_size=4, chunk_size=16)["kl_to_teacher"]
        with torch.no_grad():
            flat = model(input_ids=blocks[:, :-1]).logits.float().reshape(-1, V)
        sig, _ = teacher.signal(Batch.of(blocks, list(range(len(blocks)))))
        want = float(DIVERGENCES["forward_kl"](flat, sig.flatten(), temperature=1.0, tail="sampled").mean())
        assert abs(got - want) < 1e-5, (seed, got, want)
        estimates.append(got)
    assert min(estimates) < 0 < max(estimates), estimates  # noise on both sides of the true 0


def test_an_exports_training_counts_are_its_own_or_the_runs_when_it_has_none():
    """report.json's train_tokens / train_targets: the scored export's own counts (an export of an
    earlier step must not show the run's last ones); an export made before exports recorded
    counts shows the run's; one whose checkpoint predates the target count shows no targets."""
    from distill.report.report import _trained_counts

    run = {"tokens_seen": 900, "targets_seen": 300}
    assert _trained_counts({"step": 3, "tokens_seen": 96, "targets_seen": 40}, run) == (96, 40)
    assert _trained_counts({"step": 3}, run) == (900, 300)
    assert _trained_counts({"step": 3, "tokens_seen": 96}, run) == (96, None)
    assert _trained_counts({}, {}) == (None, None)
