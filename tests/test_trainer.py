"""The loop's contracts: data order, one teacher pass per batch for N students, student failures."""
import json

import pytest
import torch

from distill.config import StudentConfig
from distill.layout import RunLayout
from distill.train.engines import TorchEngine
from distill.train.loop import LoopConfig, TrainingAborted, train_loop
from distill.train.selection import batch_indices
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
    return Student(sc, TorchEngine(model, opt, sched, sc.optim, torch.device("cpu"), "fp32"), 10)


class CountingTeacher:
    """A fake teacher: random but fixed signal; counts forwards."""

    def __init__(self, poison: bool = False):
        self.forward_calls = 0
        self.reads = 0
        self.poison = poison
        self.prefetched: list[tuple] = []

    def prefetch(self, batches):
        self.prefetched.extend(tuple(b.indices) for b in batches)

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


def test_the_optimizer_is_fused_adamw_where_torch_has_it_and_steps_as_the_foreach_one():
    """Fused AdamW (one kernel; 4.5-5x the foreach step on CPU) is the default where torch has
    the kernel for the device the student trains on; it moves the weights as the foreach AdamW
    does, weight decay groups and all.  A device without the kernel (meta here; torch would
    only fail at the first step, not at construction) gets foreach, decided up front."""
    sc = StudentConfig(name="s", model={"preset": "dense"}, optim={"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1})

    def model():
        return build_model(dense(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                 head_dim=16, intermediate_size=64), seed=0)

    def trained(decided_for: torch.device | None) -> dict:
        student = model()
        opt, sched = make_optimizer(student, sc.optim, 10, decided_for)
        fused = decided_for is None or decided_for.type == "cpu"
        assert bool(opt.defaults.get("fused")) is fused and bool(opt.defaults.get("foreach")) is not fused
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            ids = torch.randint(0, V, (2, T), generator=g)
            student(input_ids=ids, labels=ids).loss.backward()
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    fused, foreach = trained(None), trained(torch.device("meta"))
    assert trained(torch.device("cpu")).keys() == fused.keys()
    moved = max(float((fused[k] - v).abs().max()) for k, v in model().state_dict().items())
    assert moved > 1e-3  # the steps did move the weights
    for k in fused:
        torch.testing.assert_close(fused[k], foreach[k], rtol=1e-5, atol=1e-6)
    on_meta = torch.nn.Linear(8, 4, device="meta")
    opt, _ = make_optimizer(on_meta, sc.optim, 10)  # parameters on a device without the kernel
    assert not opt.defaults.get("fused") and opt.defaults.get("foreach")


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
    # Each step announced the next step's blocks ahead of time (a cache decodes them meanwhile).
    assert teacher.prefetched == [tuple(batch_indices(s, 4, 16, 0)) for s in (1, 2)]


def poison(student):
    """NaN in one weight: every loss of this student is non-finite (the others are untouched)."""
    with torch.no_grad():
        student.model.lm_head.weight[0, 0] = float("nan")


def ckpt_steps(root, name):
    return [p.name for p in sorted((root / "students" / name / "checkpoints").glob("step_*"))]


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    """on_student_failure=stop: the healthy student is checkpointed after the failing step,
    the failed one at its last good step (skipped steps changed none of its weights)."""
    blocks = torch.randint(0, V, (16, T + 1))
    healthy, student = make_student("ok"), make_student("bad")
    poison(student)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    with pytest.raises(TrainingAborted, match="non-finite steps"):
        train_loop([healthy, student], CountingTeacher(), blocks, blocks[:2], None,
                   loop_cfg(steps=5, max_nonfinite=2, keep_last=5), RunLayout(tmp_path), resume=False, progress=False)
    assert student.nonfinite_steps == 3
    for k, v in student.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)  # skipped steps changed nothing
    assert ckpt_steps(tmp_path, "ok") == ["step_00000003"] and ckpt_steps(tmp_path, "bad") == ["step_00000002"]
    assert json.loads((tmp_path / "students" / "bad" / "failed.json").read_text())["step"] == 2


def test_a_failing_student_is_dropped_the_others_finish_and_it_stays_dropped(tmp_path):
    """on_student_failure=drop: an exception (out of memory) in one student's step and a
    diverging student each cost that student only; a resume keeps both dropped."""
    blocks = torch.randint(0, V, (16, T + 1))

    def trio():
        a, b, c = make_student("a"), make_student("b"), make_student("c")
        poison(c)
        calls = {"b": 0}
        step_b = b.train_step

        def oom_at_second_step(step, mbs, recipe=None):
            calls["b"] += 1
            if step == 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            return step_b(step, mbs, recipe)

        b.train_step = oom_at_second_step
        return [a, b, c], calls

    loop = loop_cfg(steps=4, max_nonfinite=0, checkpoint_every=2, keep_last=5, on_student_failure="drop")
    students, _ = trio()
    result = train_loop(students, CountingTeacher(), blocks, blocks[:2], None, loop, RunLayout(tmp_path),
                        resume=False, progress=False)
    assert ckpt_steps(tmp_path, "a") == ["step_00000001", "step_00000002", "step_00000004"]  # at each failure too
    assert ckpt_steps(tmp_path, "b") == ["step_00000001"]  # its last good step
    assert ckpt_steps(tmp_path, "c") == ["step_00000000"]
    assert set(result["failed"]) == {"b", "c"}
    assert result["failed"]["b"]["reason"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "non-finite" in result["failed"]["c"]["reason"]
    assert "oom_at_second_step" in result["failed"]["b"]["traceback"]  # where it raised, for a bug report
    rows = [json.loads(l) for l in (tmp_path / "students" / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "failed" and rows[-1]["step"] == 2 and "out of memory" in rows[-1]["reason"]

    # A crash after step 2, then --resume: b and c stay dropped, a alone goes on.
    import shutil

    shutil.rmtree(tmp_path / "students" / "a" / "checkpoints" / "step_00000004")
    students, calls = trio()
    result = train_loop(students, CountingTeacher(), blocks, blocks[:2], None, loop, RunLayout(tmp_path),
                        resume=True, progress=False)
    assert result["start_step"] == 2 and calls["b"] == 0
    assert ckpt_steps(tmp_path, "a")[-1] == "step_00000004" and ckpt_steps(tmp_path, "b") == ["step_00000001"]
    assert set(result["failed"]) == {"b", "c"}
    # The dropped students' counts are their last checkpoint's, not 0 (the run summary shows them).
    b, c = students[1], students[2]
    assert b.tokens_seen == students[0].tokens_seen // 4 > 0 and c.tokens_seen == 0 and c.nonfinite_steps == 1


def test_report_marks_a_failed_student():
    from distill.report.report import render_markdown

    report = {"students": {"ok": {"kind": "dense", "val_ppl": 3.0},
                           "bad": {"kind": "dense", "val_ppl": 9.0,
                                   "failed": {"step": 1, "failed_at_step": 2, "reason": "RuntimeError: out of memory"}}}}
    md = render_markdown(report)
    assert "| bad (failed) |" in md and "failed at step 2: RuntimeError: out of memory (checkpoint: step 1)" in md
    assert "| ok |" in md


def test_report_says_what_agreement_and_kl_are_measured_against():
    """The teacher's own row reads 1 and 0 only against an exact or top-k signal; a sampled one
    shows its noise there, and report.md says which."""
    from types import SimpleNamespace

    from distill.config import CacheConfig
    from distill.report.report import render_markdown, signal_description

    assert signal_description(CacheConfig(k=16), object()) == "the teacher's top 16 log-probs, the rest of its mass as one outcome"
    assert signal_description(CacheConfig(k=16), SimpleNamespace(keep_dense=True)) == "the teacher's whole distribution (exact)"
    sampled = signal_description(CacheConfig(estimator="sampled", samples=8, sample_temperature=0.5), SimpleNamespace(keep_dense=False))
    assert sampled.startswith("8 draws a token from the teacher at T = 0.5 ") and "own row shows the estimate's noise" in sampled
    # a cache is described by what it holds, not by what the config now says (an older top-k cache)
    old_cache = SimpleNamespace(reader=SimpleNamespace(sampling=None, manifest={"k": 8}))
    assert signal_description(CacheConfig(estimator="sampled"), old_cache).startswith("the teacher's top 8 log-probs")
    md = render_markdown({"students": {"ok": {"kind": "dense"}}, "teacher_signal": sampled})
    assert f"Agreement and KL to the teacher are measured against {sampled}." in md
    assert "measured against" not in render_markdown({"students": {"ok": {"kind": "dense"}}})  # an older report.json


def test_report_md_escapes_control_characters_of_completions():
    """A model's byte tokens decode to NUL, \\x0b, ...: report.md held them raw (grep called it a
    binary file).  They are escaped; a prompt keeps its newlines and tabs."""
    from distill.report.report import render_markdown

    stats = {"reverse_kl": 0.5, "mean_length": 3.0}
    gen = {"prompts": 1, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0,
           "teacher": {"mean_length": 3.0}}
    sample = {"prompt": "line 1\n\tline 2\x00", "student": "a\x00b\x0bc\nd`e", "teacher": "ok\x1d\u2028"}
    report = {"students": {"s": {"kind": "dense", "generation": {"greedy": stats, "sampled": stats,
                                                                 "samples": [sample]}}}, "generation": gen}
    md = render_markdown(report)
    assert all(ch in "\n\t" or ch.isprintable() for ch in md), repr(md)
    assert "line 1\n\tline 2\\x00\n" in md
    assert "   - student: `a\\x00b\\x0bc\\nd'e`" in md and "   - teacher: `ok\\x1d\\u2028`" in md
