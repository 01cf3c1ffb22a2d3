"""Issue 17: the teacher's difficulty statistics (cache, live teacher) and data selection
(config, determinism, resume, per-student views from one cache, the report)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from common.errors import UserError
from distill.config import SelectConfig, parse_config
from distill.train.selection import plan_views, select_blocks
from losses.difficulty import STATS, hardness, sequence_difficulty, token_difficulty
from teachers import LiveTeacher
from teachers.cache import write_cache
from teachers.cache.format import Sampling
from teachers.cache.reader import CacheReader
from teachers.protocol import Batch, token_ids, untrained
from tests.conftest import run_cli


def reference_difficulty(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same three statistics from torch.nn.functional / torch.distributions, in fp64."""
    x = logits.double().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    nll = F.cross_entropy(x, t, reduction="none")
    entropy = torch.distributions.Categorical(logits=x).entropy()
    top1 = F.softmax(x, dim=-1).max(-1).values
    return torch.stack([nll, entropy, top1], -1).reshape(*targets.shape, 3)


# ----------------------------------------------------------------------------- the statistics


def test_token_difficulty_matches_torch_references():
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 8.0):  # near-uniform, ordinary and peaked teachers
        logits = torch.randn(37, 50) * scale
        targets = torch.randint(0, 50, (37,))
        got = token_difficulty(logits, targets)
        assert got.dtype == torch.float32 and got.shape == (37, 3)
        torch.testing.assert_close(got.double(), reference_difficulty(logits, targets), rtol=1e-5, atol=1e-5)
    # a masked vocab entry (-inf) is a valid distribution; a NaN row is flagged NaN
    logits[0, 3] = float("-inf")
    logits[1, 0] = float("nan")
    got = token_difficulty(logits, torch.full((37,), 3))
    assert got[0, 0] == float("inf") and torch.isfinite(got[0, 1:]).all()
    assert torch.isnan(got[1]).all()
    assert torch.isfinite(got[2:]).all()
    # the top-k pass computes the same numbers alongside the signal (NaN rows included)
    from losses.signal import topk_logprobs

    _, _, fused = topk_logprobs(logits, 5, torch.full((37,), 3))
    torch.testing.assert_close(fused, got, equal_nan=True)


def test_sequence_difficulty_averages_trained_finite_positions_only():
    stats = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    stats[0, 1] = float("nan")
    trained = torch.tensor([[True, True, False, True], [False, False, False, False]])
    out = sequence_difficulty(stats, trained)
    torch.testing.assert_close(out[0, :3], (stats[0, 0] + stats[0, 3]) / 2)
    assert out[0, 3] == 2 and out[1, 3] == 0 and torch.isnan(out[1, :3]).all()
    # a block with no scored target is the easiest by every statistic
    assert all(hardness(out, s)[1] == float("-inf") for s in STATS)


# ----------------------------------------------------------------------------- stored in the cache


def _teacher_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("estimator", ["topk", "sampled", "logits"])
def test_cached_statistics_equal_dense_recomputation(tmp_path, estimator):
    """Per token (fp16 in the shard) and per sequence (fp32, over training targets only)."""
    vocab, T = 64, 12
    model = _teacher_model(vocab)
    g = torch.Generator().manual_seed(1)
    blocks = {s: torch.randint(0, vocab, (n, T + 1), generator=g) for s, n in (("train", 10), ("val", 3))}
    blocks["train"][2, 1:6] = untrained(blocks["train"][2, 1:6])  # a chat-like prompt: no training target
    blocks["train"][4, 1:] = untrained(blocks["train"][4, 1:])  # a block with no target at all
    splits = {s: token_ids(b[:, :-1]) for s, b in blocks.items()}  # the teacher reads plain ids
    targets = {s: b[:, 1:] for s, b in blocks.items()}
    sampling = Sampling(n=8) if estimator == "sampled" else None
    teacher = LiveTeacher(model, k=8, vocab_size=vocab, device=torch.device("cpu"), sampling=sampling)
    teacher.chunk_tokens = 7  # the chunked lm_head: chunks that straddle sequences
    fn = {"topk": teacher.topk, "sampled": teacher.sample,
          "logits": lambda x: teacher.logits(x)}[estimator]  # a plain fn: the writer computes the stats
    import teachers.live as live

    name = "sample_signal" if estimator == "sampled" else "topk_logprobs"
    reduce, seen = getattr(live, name), []
    with pytest.MonkeyPatch.context() as mp:  # count the rows that reach the top-k or the draws
        mp.setattr(live, name, lambda logits, *a, **kw: seen.append(logits.shape[0]) or reduce(logits, *a, **kw))
        write_cache(tmp_path, fn, splits, identity={"vocab_size": vocab}, k=8, batch_size=4, shard_sequences=4,
                    encoding="sampled" if sampling else "lossless", sampling=sampling, targets=targets, progress=False)
    if estimator != "logits":  # the live teacher skips the positions the cache does not store
        assert sum(seen) == sum(int((t >= 0).sum()) for t in targets.values())
    with torch.no_grad():
        dense = {s: model(input_ids=x).logits for s, x in splits.items()}
    for split in splits:
        reader = CacheReader(tmp_path, split, verify=True)
        plain = torch.where(targets[split] < 0, -targets[split] - 1, targets[split])
        want = reference_difficulty(dense[split], plain)
        sig, _ = reader.read(range(len(reader)))
        trained = targets[split] >= 0
        torch.testing.assert_close(sig.difficulty.double()[trained], want[trained], rtol=2e-3, atol=2e-3)  # fp16 storage
        assert torch.isnan(sig.difficulty[~trained]).all()  # only training targets are stored
        per_seq = reader.sequence_stats()
        for i in range(len(reader)):
            if trained[i].any():
                torch.testing.assert_close(per_seq[i, :3].double(), want[i][trained[i]].mean(0), rtol=1e-4, atol=1e-5)
            else:
                assert torch.isnan(per_seq[i, :3]).all()
            assert per_seq[i, 3] == trained[i].sum()


def test_online_signal_carries_the_same_statistics():
    vocab = 64
    model = _teacher_model(vocab)
    blocks = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(2))
    batch = Batch.of(blocks, range(3))
    with torch.no_grad():
        want = reference_difficulty(model(input_ids=batch.input_ids).logits, batch.labels)
    for kw in ({}, {"keep_dense": True}, {"sampling": Sampling(n=4)}):
        sig, _ = LiveTeacher(model, k=8, vocab_size=vocab, device=torch.device("cpu"), **kw).signal(batch)
        torch.testing.assert_close(sig.difficulty.double(), want, rtol=1e-4, atol=1e-5)


def test_a_cache_without_statistics_says_how_to_get_them_and_is_upgraded_on_demand(tmp_path):
    splits = {"train": torch.randint(0, 16, (4, 5))}
    teacher = lambda x: torch.randn(*x.shape, 16, generator=torch.Generator().manual_seed(int(x.sum())))
    write_cache(tmp_path, teacher, splits, identity={"vocab_size": 16}, k=4, progress=False)
    reader = CacheReader(tmp_path, "train")
    assert not reader.has_difficulty and reader.read([0])[0].difficulty is None
    with pytest.raises(UserError, match="overwrite"):
        reader.sequence_stats()
    with pytest.raises(UserError, match="data.select.*overwrite"):
        plan_views([("a", "data.select", SelectConfig(keep_hardest=0.5))], None, 4)
    # a complete cache is kept as it is unless the run needs the statistics
    write_cache(tmp_path, teacher, splits, identity={"vocab_size": 16}, k=4, progress=False, targets=splits)
    assert not CacheReader(tmp_path, "train").has_difficulty
    write_cache(tmp_path, teacher, splits, identity={"vocab_size": 16}, k=4, progress=False, targets=splits,
                upgrade=True)
    reader = CacheReader(tmp_path, "train", verify=True)
    assert reader.has_difficulty and reader.sequence_stats().shape == (4, 4)


# ----------------------------------------------------------------------------- selection rules


def _stats(nll, entropy=None, top1=None, count=None):
    n = len(nll)
    cols = [torch.tensor(nll, dtype=torch.float32),
            torch.tensor(entropy if entropy is not None else [1.0] * n, dtype=torch.float32),
            torch.tensor(top1 if top1 is not None else [0.5] * n, dtype=torch.float32),
            torch.tensor(count if count is not None else [10.0] * n)]
    return torch.stack(cols, -1)


def test_selection_rules_pick_the_hardest_deterministically():
    stats = _stats([3.0, 1.0, 5.0, 5.0, float("nan"), 2.0, 4.0, 0.5],
                   top1=[0.1, 0.9, 0.2, 0.05, 0.5, 0.3, 0.6, 0.7])
    keep = lambda **kw: select_blocks(SelectConfig(**kw), stats, "data.select").tolist()
    assert keep(keep_hardest=0.25) == [2, 3]  # the two highest nll
    assert keep(keep_hardest=0.125) == [2]  # a tie at 5.0: the lower block index ranks first
    assert keep(drop_easiest=0.5) == [0, 2, 3, 6]  # the NaN block (no target) is the easiest
    assert keep(by="top1", keep_hardest=0.25) == [0, 3]  # low top-1 probability = hard
    assert keep(min=2.0, max=4.0) == [0, 5, 6]
    assert keep(by="top1", max=0.2) == [0, 2, 3]
    # a pure function of stats and rule: the same answer every time, whatever the order of calls
    assert all(keep(drop_easiest=0.5) == [0, 2, 3, 6] for _ in range(3))


@pytest.mark.parametrize("rule", [{"keep_hardest": 0.01}, {"min": 9.0}, {"by": "top1", "max": 0.01}])
def test_a_selection_that_keeps_nothing_names_its_key(rule):
    with pytest.raises(UserError, match=r"students\.1\.select: .*keeps none of the 8 training blocks"):
        select_blocks(SelectConfig(**rule), _stats([3.0, 1.0, 5.0, 5.0, 2.0, 2.0, 4.0, 0.5]), "students.1.select")


def test_select_config_needs_exactly_one_rule_and_a_cache():
    base = {"data": {"stdlib": True}, "teacher": {"source": "cache"},
            "students": [{"name": "s", "model": {"preset": "dense"}}]}
    for bad, msg in (({}, "exactly one"), ({"keep_hardest": 0.5, "drop_easiest": 0.5}, "exactly one"),
                     ({"min": 3, "max": 2}, "no block could be kept"), ({"keep_hardest": 1.5}, "less than or equal")):
        with pytest.raises(UserError, match=msg):
            parse_config({**base, "data": {"stdlib": True, "select": bad}})
    online = {**base, "teacher": {"source": "checkpoint", "path": "/t"}, "train": {"mode": "online"}}
    online["students"] = [{"name": "s", "model": {"preset": "dense"}, "select": {"keep_hardest": 0.5}}]
    with pytest.raises(UserError, match=r"students\.0\.select: .*train.mode: cached"):
        parse_config(online)


def test_students_with_one_rule_share_a_view():
    stats = _stats([3.0, 1.0, 5.0, 4.0])
    rule = SelectConfig(drop_easiest=0.5)
    views = plan_views([("a", "data.select", rule), ("b", "students.1.select", SelectConfig(keep_hardest=0.25)),
                        ("c", "data.select", rule), ("d", "students.3.select", SelectConfig(drop_easiest=0)),
                        ("e", "data.select", None)], stats, 4)
    assert [v.students for v in views] == [["a", "c"], ["b"], ["d", "e"]]
    assert [v.summary["blocks_kept"] for v in views] == [2, 1, 4]
    assert views[0].blocks.tolist() == [2, 3] and views[2].blocks is None
    assert views[0].summary["tokens_kept"] == 20 and sum(views[1].summary["difficulty"]["nll"]["counts"]) == 1


# ----------------------------------------------------------------------------- over the CLI


@pytest.fixture(scope="module")
def selection_run(online_setup, tmp_path_factory):
    """One cache with statistics; three students with three selections trained from it."""
    work, base = online_setup
    tmp = tmp_path_factory.mktemp("select")
    cfg = yaml.safe_load(base.read_text())
    student = cfg["students"][0]
    cfg.update(out_dir=str(tmp / "run"))
    cfg["data"]["select"] = {"by": "entropy", "drop_easiest": 0.5}
    cfg["students"] = [dict(student, name="dense"),
                       dict(student, name="hard", select={"by": "nll", "keep_hardest": 0.25}),
                       dict(student, name="all", select={"drop_easiest": 0}),
                       dict(student, name="dyn", select={"by": "nll", "drop_easiest": 0.5, "rescore_every": 3,
                                                              "rescore_temperature": 0.001})]
    cfg["train"].update(mode="cached", steps=6, checkpoint_every=2, keep_last=5)
    path = tmp / "select.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_cli("cache", "-c", str(path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", "-c", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, path, r


def _kept(out, name):
    return json.loads((out / "students" / name / "data.json").read_text())


def test_per_student_selections_from_one_cache_one_teacher_pass(selection_run):
    tmp, path, r = selection_run
    out = tmp / "run"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["teacher_forward_calls"] == 0  # training ran no teacher: the cache was its one pass
    reader = CacheReader(out / "cache", "train")
    stats = reader.sequence_stats()
    n = len(reader)
    # logged: what each student keeps
    assert f"[data] dense: drop the easiest 50% by entropy: {n - round(n / 2):,} of {n:,} training blocks" in r.stderr
    assert f"[data] hard: keep the hardest 25% by nll: {round(n / 4):,} of {n:,}" in r.stderr
    assert f"[data] all: every block: {n:,} of {n:,}" in r.stderr
    assert _kept(out, "hard")["blocks_kept"] == round(n / 4) and _kept(out, "all")["fraction_kept"] == 1.0
    # each student's batches came from its own selection: every step's mean teacher nll is at
    # least the easiest kept block's (every block here has the same number of targets; the
    # per-token statistics the loop logs are fp16, hence the slack)
    floor = float(stats[select_blocks(SelectConfig(by="nll", keep_hardest=0.25), stats, "x"), 0].min())
    def step_nll(name):
        rows = [json.loads(l) for l in (out / "students" / name / "metrics.jsonl").read_text().splitlines()]
        return [row["teacher_nll"] for row in rows if row["kind"] == "train"]
    assert len(step_nll("hard")) == 6 and min(step_nll("hard")) >= floor - 3e-3
    assert min(step_nll("all")) < floor - 3e-3


def test_selection_resumes_exactly_and_a_changed_one_is_refused(selection_run):
    tmp, path, _ = selection_run
    out, crashed = tmp / "run", tmp / "crashed"
    shutil.copytree(out, crashed, ignore=shutil.ignore_patterns("cache"))
    for name in ("dense", "hard", "all", "dyn"):  # a crash after step 4: the step-6 checkpoint never happened
        shutil.rmtree(crashed / "students" / name / "checkpoints" / "step_00000006")
    sets = ["--set", f"out_dir={crashed}", "--set", f"cache.dir={out / 'cache'}"]
    # a changed selection is refused, naming the student and both selections; nothing is touched,
    # the report's record of what each student saw included
    saw = {name: _kept(crashed, name) for name in ("dense", "hard", "all", "dyn")}
    r = run_cli("train", "-c", str(path), "--quiet", "--resume", *sets, "--set", "data.select.drop_easiest=0.25")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "student dense: its data selection changed" in r.stderr and "drop the easiest 25%" in r.stderr
    assert not (crashed / "students" / "dense" / "checkpoints" / "step_00000006").exists()
    assert {name: _kept(crashed, name) for name in saw} == saw
    r = run_cli("train", "-c", str(path), "--quiet", "--resume", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    # dyn resumes inside its second window (steps 3-5): its gap table and that window's weights
    # came back with its checkpoint; they are not uniform any more
    state = torch.load(crashed / "students" / "dyn" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    weights, seen = state["data_view"]["weights"], state["data_view"]["seen"]
    assert int(seen.sum()) >= 4 and float(weights.max() / weights.min()) > 1.5
    for name in ("dense", "hard", "all", "dyn"):
        a = load_file(str(out / "students" / name / "checkpoints" / "step_00000006" / "model.safetensors"))
        b = load_file(str(crashed / "students" / name / "checkpoints" / "step_00000006" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_reports_and_inspect_shows_what_each_student_saw(selection_run):
    tmp, path, _ = selection_run
    for name in ("dense", "hard", "all", "dyn"):
        student = tmp / "run" / "students" / name
        assert run_cli("export", str(student), "--out", str(student / "export")).returncode == 0
    r = run_cli("eval", "-c", str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "What data each student saw" in r.stdout and "- **hard**: keep the hardest 25% by nll" in r.stdout
    # each model's scoring shows progress (a long held-out split took minutes with nothing said)
    assert re.search(r"^eval: student hard (\d+)/\1 \(100%\)", r.stdout, re.M), r.stdout[:2000]
    report = json.loads((tmp / "run" / "report.json").read_text())
    assert report["students"]["hard"]["data_kept"] == pytest.approx(0.25, abs=0.02)
    assert report["students"]["all"]["data"]["difficulty"]["nll"]["counts"]
    r = run_cli("inspect", str(tmp / "run" / "cache"))
    assert r.returncode == 0 and "teacher difficulty per sequence, split train" in r.stdout
    assert "nll histogram" in r.stdout and "entropy histogram" in r.stdout


def test_a_selection_keeping_nothing_is_refused_before_training(selection_run):
    tmp, path, _ = selection_run
    out = tmp / "nothing"
    r = run_cli("train", "-c", str(path), "--quiet", "--set", f"out_dir={out}", "--set",
                f"cache.dir={tmp / 'run' / 'cache'}", "--set", "students.1.select={by: nll, min: 1000.0}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert "students.1.select" in line and "keeps none" in line
    assert not list((out / "students").glob("*/checkpoints/step_*"))


# ----------------------------------------------------------------------------- dynamic selection


def _dynamic_view(n=8, every=2, temperature=0.5):
    from distill.train.selection import DataView

    rule = SelectConfig(drop_easiest=0, rescore_every=every, rescore_temperature=temperature)
    return DataView(rule, "data.select", None, ["s"], n_total=n)


def test_dynamic_selection_draws_the_blocks_students_find_hard_more_often():
    view = _dynamic_view()
    assert view.weights.tolist() == [1 / 8] * 8  # nothing measured yet: uniform
    view.record([0, 1, 2, 3, 4, 5], torch.tensor([0.1, 0.1, 2.0, 0.1, float("nan"), 0.1]))
    view.reweigh(1)  # not a window start: unchanged
    assert view.weights.tolist() == [1 / 8] * 8
    view.reweigh(2)
    w = view.weights
    assert float(w.sum()) == pytest.approx(1.0) and int(w.argmax()) == 2
    assert w[2] > 0.5 and w.min() >= 0.25 / 8  # the uniform share keeps every block reachable
    # unseen blocks (4: no scored target, 6, 7: never drawn) count as the mean seen gap
    assert w[4] == w[6] == w[7] and w[0] < w[6] < w[2]
    counts = torch.bincount(torch.tensor([i for step in range(2, 200) for i in view.global_indices(step, 2, 0)]),
                            minlength=8)
    assert int(counts.argmax()) == 2 and counts[2] > 3 * counts[0]


def test_dynamic_gaps_land_on_the_blocks_of_a_selection():
    from distill.train.selection import DataView

    view = DataView(SelectConfig(keep_hardest=0.5, rescore_every=1), "data.select", torch.tensor([2, 5, 7, 9]), ["s"],
                    n_total=10)
    view.record([7, 2, 9], torch.tensor([1.0, float("inf"), 0.5]))
    assert view.gaps.tolist() == [0.0, 0.0, 1.0, 0.5] and view.seen.tolist() == [False, False, True, True]
    view.reweigh(1)
    assert all(i in (2, 5, 7, 9) for step in range(1, 20) for i in view.global_indices(step, 3, 0))


def test_dynamic_selection_state_round_trips_to_the_same_draws():
    a, b = _dynamic_view(), _dynamic_view()
    a.record([1, 5], torch.tensor([1.0, 3.0]))
    a.reweigh(2)
    b.load_state_dict(a.state_dict())
    assert [a.global_indices(s, 3, 7) for s in range(2, 6)] == [b.global_indices(s, 3, 7) for s in range(2, 6)]
    with pytest.raises(UserError, match="gap table has 8 blocks"):
        _dynamic_view(n=9).load_state_dict(a.state_dict())


def test_sample_seed_is_the_cache_draws_seed_not_the_run_seed():
    """cache.sample_seed lets students be rerun with other seeds from one sampled cache."""
    from distill.runtime import sampling_of

    base = {"seed": 5, "data": {"stdlib": True}, "teacher": {"source": "cache"},
            "cache": {"estimator": "sampled"},
            "students": [{"name": "s", "model": {"preset": "dense"}, "loss": {"tail": "sampled"}}]}
    assert sampling_of(parse_config(base)).seed == 5
    assert sampling_of(parse_config({**base, "cache": {"estimator": "sampled", "sample_seed": 0}})).seed == 0
    assert sampling_of(parse_config({**base, "cache": {"estimator": "sampled", "sample_seed": 0}})).identity() == \
        sampling_of(parse_config({**base, "seed": 9, "cache": {"estimator": "sampled", "sample_seed": 0}})).identity()


def test_rescoring_needs_label_hard_targets_and_opting_out_is_fine_online():
    base = {"data": {"stdlib": True}, "teacher": {"source": "checkpoint", "path": "/t"},
            "students": [{"name": "s", "model": {"preset": "dense"}, "loss": {"hard_target": "teacher_argmax"},
                          "select": {"drop_easiest": 0.5, "rescore_every": 10}}]}
    with pytest.raises(UserError, match=r"students\.0\.select\.rescore_every: .*teacher_argmax"):
        parse_config(base)
    online = {**base, "train": {"mode": "online"},
              "students": [{"name": "s", "model": {"preset": "dense"}, "select": {"drop_easiest": 0}}]}
    assert parse_config(online).students[0].select.keeps_all


def test_old_checkpoints_keep_their_run_identity():
    """A student without `select` (or `on_policy_share`) hashes as before the key existed."""
    from distill.config import StudentConfig
    from distill.stages import student_identity

    sc = StudentConfig(name="s", model={"preset": "dense"})
    assert "select" not in student_identity(sc) and "on_policy_share" not in student_identity(sc)
    later = ("select", "on_policy_share")
    assert student_identity(sc) == {k: v for k, v in sc.model_dump(mode="json").items() if k not in later}
    assert student_identity(StudentConfig(name="s", model={"preset": "dense"}, select={"keep_hardest": 0.5}))["select"]


@pytest.mark.parametrize("temperature", [0.001, 0.5, 50.0])
def test_rescore_temperature_sets_how_sharply_the_hard_blocks_are_preferred(temperature):
    """Weights = 3/4 softmax(gap / rescore_temperature) + 1/4 uniform: near 0 the hardest block
    takes the whole 3/4 (0.78 with its uniform share), at 50 the draw is all but uniform."""
    gaps = torch.tensor([0.1, 0.1, 2.0, 0.1, 0.5, 0.1, 0.1, 0.1], dtype=torch.float64)
    view = _dynamic_view(temperature=temperature)
    view.record(list(range(8)), gaps.float())
    view.reweigh(2)
    want = 0.75 * torch.softmax(gaps.float().double() / temperature, dim=0) + 0.25 / 8
    torch.testing.assert_close(view.weights, want)
    top = float(view.weights[2])
    assert {0.001: top == pytest.approx(0.78125), 0.5: 0.55 < top < 0.7, 50.0: top < 0.14}[temperature], top
