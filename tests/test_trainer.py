"""The loop's contracts: data order, one teacher pass per batch for N students, non-finite steps."""
import pytest
import torch

from distill.config import StudentConfig
from distill.layout import RunLayout
from distill.train.engines import TorchEngine
from distill.train.loop import LoopConfig, TrainingAborted, batch_indices, train_loop
from distill.train.student import Student, make_optimizer
from losses.signal import TeacherSignal
from students.build import build_model
from students.presets import dense

V, T = 64, 8


def make_student(name="s", **cfg):
    sc = StudentConfig(name=name, model={"preset": "dense"}, optim={"lr": 1e-2, "warmup_steps": 0}, **cfg)
    model = build_model(dense(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              head_dim=16, intermediate_size=64), seed=0)
    opt, sched = make_optimizer(model, sc.optim, 10)
    return Student(sc, model, TorchEngine(model, opt, sched, sc.optim, torch.device("cpu"), "fp32"), 10)


class CountingTeacher:
    """A fake teacher: random but fixed signal; counts forwards."""

    def __init__(self, poison: bool = False):
        self.forward_calls = 0
        self.reads = 0
        self.poison = poison

    def signal(self, batch):
        self.forward_calls += 1
        g = torch.Generator().manual_seed(len(batch.indices))
        logits = torch.randn(*batch.input_ids.shape, V, generator=g)
        sig = TeacherSignal.from_logits(logits, 8)
        if self.poison:
            sig.topk_logprobs[:] = float("nan")
        return sig, torch.ones(batch.input_ids.shape, dtype=torch.bool)


def loop_cfg(steps=3, **kw):
    base = dict(steps=steps, batch_size=4, grad_accum=1, eval_every=0, eval_blocks=2, checkpoint_every=0,
                keep_last=1, max_nonfinite=10, seed=0, run_hash="test")
    return LoopConfig(**{**base, **kw})


def test_batch_indices_cover_each_epoch_once_and_are_deterministic():
    seen = [i for step in range(5) for i in batch_indices(step, 4, 20, seed=1)]
    assert sorted(seen) == list(range(20))
    assert batch_indices(3, 4, 20, 1) == batch_indices(3, 4, 20, 1)
    assert batch_indices(0, 4, 20, 1) != batch_indices(0, 4, 20, 2)
    assert len(batch_indices(4, 8, 20, 1)) == 8  # crosses an epoch boundary


def test_one_teacher_forward_per_batch_for_three_students(tmp_path):
    blocks = torch.randint(0, V, (16, T + 1))
    teacher = CountingTeacher()
    students = [make_student(n) for n in ("a", "b", "c")]
    result = train_loop(students, teacher, blocks, blocks[:2], None, loop_cfg(steps=3), RunLayout(tmp_path),
                        resume=False, progress=False)
    assert result["teacher_forward_calls"] == 3 == teacher.forward_calls
    assert all(s.tokens_seen == 3 * 4 * T for s in students)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    blocks = torch.randint(0, V, (16, T + 1))
    student = make_student()
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    with pytest.raises(TrainingAborted, match="non-finite steps"):
        train_loop([student], CountingTeacher(poison=True), blocks, blocks[:2], None,
                   loop_cfg(steps=5, max_nonfinite=2), RunLayout(tmp_path), resume=False, progress=False)
    assert student.nonfinite_steps == 3
    for k, v in student.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # skipped steps changed no weight
    assert not list((tmp_path / "students").glob("*/checkpoints/step_*"))  # no bad state saved
