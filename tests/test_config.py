"""Config validation: bad input names the key, exits 2, writes nothing."""
import re
import typing
from pathlib import Path

import pytest
import yaml

from distill.config import check_config, load_config, parse_config
from distill.demo import SIZES, demo_config
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def minimal(**over) -> dict:
    cfg = {"data": {"stdlib": True}, "teacher": {"source": "preset", "model": {"preset": "behemoth"}},
           "students": [{"name": "s", "model": {"preset": "dense"}}]}
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[leaf] = value
    return cfg


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as e:
        check_config(parse_config(raw))
    return str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "distill" / "example_config.yaml"],
                         ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.students


@pytest.mark.parametrize("size", sorted(SIZES))
def test_demo_configs_validate(size, tmp_path):
    cfg = parse_config(demo_config(tmp_path, size))
    assert [s.name for s in cfg.students] == ["scout", "maverick", "dense", "dense-baseline"]
    assert cfg.students[3].baseline


@pytest.mark.parametrize("key,value,expect", [
    ("students.0.optim.lr", -1.0, "students.0.optim.lr"),
    ("students.0.model.preset", "gpt5", "unknown preset 'gpt5'"),
    ("students.0.loss.divergence", "hellinger", "unknown divergence 'hellinger'"),
    ("students.0.loss.soft_weight.start", 1.5, "students.0.loss.soft_weight.start"),
    ("students.0.loss.soft_weight.kind", "zigzag", "students.0.loss.soft_weight.kind"),
    ("train.steps", 0, "train.steps"),
    ("train.steps", "many", "train.steps"),
    ("cache.k", 0, "cache.k"),
    ("data.seq_len", 2, "data.seq_len"),
    ("students.0.bogus", 1, "students.0.bogus: unknown key"),
    ("train.mode", "telepathic", "train.mode"),
    # Before 2026-12-05 these passed the config check and failed deep in a run with a traceback:
    ("cache.encoding", "fp8", "cache.encoding: Input should be 'lossless', 'fp16', 'bf16' or 'compact'"),
    ("cache.encoding", "sampled", "cache.encoding: Input should be"),
    ("students.0.optim.betas", [1.5, 2.0], "students.0.optim: betas [1.5, 2.0]: each must be in [0, 1)"),
    ("train.device", "gpu", "train.device: 'gpu' is no device: write auto, cpu, cuda or cuda:N"),
    ("students.0.device", "cuda:1x", "students.0.device: 'cuda:1x' is no device"),
    ("export.max_shard_size", "lots", "export: max_shard_size: 'lots' is not a size"),  # before: ignored
    ("train", {"batch_size": 3, "grad_accum": 2}, "train: batch_size 3 must be divisible by grad_accum 2"),  # before: after the cache pass
    ("students.0.loss.soft_weight", {"kind": "linear", "boundaries": [0.3]}, "boundaries shape a `step` schedule only"),
    ("students.0.init_layers", [0, 1], "students.0: init_layers names the teacher layers a student copies"),
    ("teacher", {"source": "checkpoint", "path": "/models/t", "model": {"preset": "scout"}},
     "teacher.model is the architecture of a preset teacher (source: preset); a checkpoint teacher's is its own"),
])
def test_bad_values_name_the_key(key, value, expect):
    assert expect in error_of(minimal(**{key: value}))


def test_every_refused_key_is_named_one_line_each():
    """Two mistakes in one file: both are said, each on its own line, each blamed on its
    source, so the second is not found only after the first is fixed."""
    raw = minimal(**{"train.stpes": 5, "students.0.optim.lr": -1.0})
    lines = error_of(raw).splitlines()
    assert len(lines) == 2, lines
    assert any("train.stpes: unknown key" in line for line in lines)
    assert any("students.0.optim.lr" in line for line in lines)
    many = minimal(**{f"train.bogus{i}": i for i in range(11)})
    lines = error_of(many).splitlines()
    assert len(lines) == 9 and lines[-1].strip() == "(+3 more)", lines


def test_step_schedule_boundaries_must_increase():
    sched = {"kind": "step", "boundaries": [0.6, 0.3]}
    assert "boundaries" in error_of(minimal(**{"students.0.loss.soft_weight": sched}))


def test_schedule_end_before_start_refused():
    sched = {"kind": "linear", "start": 0.9, "end": 0.1, "warmup_steps": 50, "end_step": 20}
    assert "end_step" in error_of(minimal(**{"students.0.loss.soft_weight": sched}))


def test_duplicate_student_names_refused():
    raw = minimal()
    raw["students"].append(dict(raw["students"][0]))
    assert "duplicate" in error_of(raw)


def test_missing_data_source_refused():
    raw = minimal()
    raw["data"] = {}
    assert "paths" in error_of(raw)


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


def test_config_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  stdlib: true\n  paths: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml line"):
        load_config(p)


def test_overrides_and_relative_paths(tmp_path, monkeypatch):
    """Relative paths in the file are relative to the file, out_dir too (every shipped config
    says so; out_dir followed the working dir before); relative paths given with --set are
    relative to the working dir, where the user typed them."""
    (tmp_path / "configs").mkdir()
    p = tmp_path / "configs" / "c.yaml"
    raw = minimal()
    raw["out_dir"] = "../runs/x"
    raw["data"] = {"paths": ["corpus", "/abs/corpus.jsonl"], "tokenizer": {"path": "tok"}}
    raw["teacher"] = {"source": "checkpoint", "path": "models/teacher"}
    raw["students"][0]["model"] = {"path": "models/student"}
    raw["train"] = {"deepspeed_config": "ds.json"}
    p.write_text(yaml.safe_dump(raw))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(p, {"train.steps": 7})
    assert cfg.train.steps == 7
    here = tmp_path / "configs"
    assert cfg.out_dir.resolve() == (tmp_path / "runs" / "x").resolve()
    assert cfg.data.paths == [here / "corpus", Path("/abs/corpus.jsonl")] and cfg.data.tokenizer.path == here / "tok"
    assert cfg.teacher.path == here / "models/teacher" and cfg.students[0].model.path == here / "models/student"
    assert cfg.train.deepspeed_config == here / "ds.json"
    cfg = load_config(p, {"out_dir": "o", "teacher.path": "t", "students.0.model": {"path": "s"}, "data.paths": ["c/*.txt"]})
    cwd = tmp_path / "elsewhere"
    assert cfg.out_dir == cwd / "o" and cfg.teacher.path == cwd / "t" and cfg.students[0].model.path == cwd / "s"
    assert cfg.data.paths == [cwd / "c/*.txt"]
    # the config reached through a symlinked dir: its "../" is the real dir's parent, as the OS says
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "cfgs").symlink_to(tmp_path / "configs")
    monkeypatch.chdir(tmp_path / "home")
    cfg = load_config(Path("cfgs") / "c.yaml")  # a relative -c path too
    assert cfg.out_dir.resolve() == (tmp_path / "runs" / "x").resolve() and cfg.out_dir.is_absolute()


def test_an_error_in_a_set_value_is_blamed_on_set_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(minimal()))
    for over, said in (({"train.stpes": 5}, "--set: train.stpes: unknown key"),
                       ({"train.steps": "abc"}, "--set: train.steps: Input should be a valid integer"),
                       ({"students.0.optim": {"lr": -1}}, "--set: students.0.optim.lr:")):
        with pytest.raises(UserError) as e:
            load_config(p, over)
        assert str(e.value).startswith(said), str(e.value)
    with pytest.raises(UserError, match=rf"^{p} with --set students.0.loss.soft_weight.end_step, "
                                        r"students.0.loss.soft_weight.warmup_steps, students.0.loss.soft_weight.kind: "
                                        r"students.0.loss.soft_weight: end_step \(1\) must come after"):
        load_config(p, {"students.0.loss.soft_weight.end_step": 1, "students.0.loss.soft_weight.warmup_steps": 3,
                        "students.0.loss.soft_weight.kind": "linear"})
    # the checks made after the schema (registries, model sizes) blame --set the same way, as
    # the CLI loads a config
    from cli import _load
    for sets, said in ((["students.0.loss.divergence=kl_fwd"], "--set: students.0.loss.divergence: unknown divergence"),
                       (["students.0.model.args={num_heads: 3}"], "--set: students.0.model.args.num_heads=3: must be a multiple"),
                       (["train.precision=fp16"], "--set: train.precision=fp16 is refused")):
        with pytest.raises(UserError) as e:
            _load(p, sets)
        assert str(e.value).startswith(said), str(e.value)
    raw = minimal()
    raw["students"][0]["loss"] = {"divergence": "kl_fwd"}
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=rf"^{p}: students.0.loss.divergence: unknown divergence"):
        _load(p, ["train.steps=3"])
    # a check across keys, broken by a --set of one of them: the file with the --set keys, and the
    # check's own key, not "(top level)"
    raw = minimal(**{"train.mode": "online", "train.on_policy": {"share": {"kind": "constant", "start": 0.5}}})
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=rf"^{p} with --set train.mode: train.on_policy.share: on-policy steps need"):
        load_config(p, {"train.mode": "cached"})
    raw = minimal()
    raw["train"] = {"stpes": 5}  # the same mistake in the file is the file's
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=rf"^{p}: train.stpes: unknown key"):
        load_config(p, {"train.steps": 3})


def test_a_deepspeed_json_that_disagrees_with_the_yaml_is_refused(tmp_path):
    """A ds_config JSON's stage silently beat `--set train.zero_stage=3`, its bf16 silently
    made a CPU run's weights bf16 (train.precision auto is fp32 there), and its
    gradient_clipping a student's optim.grad_clip; each is refused naming both places.  What the YAML leaves unsaid, the JSON may say."""
    import torch

    from distill.config import check_inputs_exist

    ds = tmp_path / "ds.json"

    def check(json_text: str, **train):
        ds.write_text(json_text)
        raw = minimal()
        raw["train"] = {"engine": "deepspeed", "deepspeed_config": str(ds), **train}
        check_inputs_exist(parse_config(raw))

    check('{"zero_optimization": {"stage": 3}}')  # train.zero_stage unsaid: the JSON's stage
    check('{"zero_optimization": {"stage": 3}}', zero_stage=3)
    with pytest.raises(UserError, match=rf"^train.zero_stage is 3 but train.deepspeed_config {ds} sets "
                                        r"zero_optimization.stage 2; set the stage in one place"):
        check('{"zero_optimization": {"stage": 2}}', zero_stage=3)
    check('{"bf16": {"enabled": true}}', precision="bf16")
    check('{"bf16": {"enabled": false}}', precision="fp32")
    with pytest.raises(UserError, match=rf"^train.deepspeed_config {ds} sets bf16.enabled false but train.precision "
                                        r"is bf16; set train.precision: fp32, or remove bf16 from the JSON"):
        check('{"bf16": {"enabled": false}}', precision="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"sets bf16.enabled true but train.precision is auto \(auto: fp32 "
                                            r"without a GPU\); set train.precision: bf16"):
            check('{"bf16": {"enabled": true}}')
    # a student's grad_clip: the JSON's gradient_clipping beat it silently (setdefault)
    check('{"gradient_clipping": 0.5}')  # unsaid in the YAML: the JSON's
    ds.write_text('{"gradient_clipping": 0.5}')
    raw = minimal()
    raw["train"] = {"engine": "deepspeed", "deepspeed_config": str(ds)}
    raw["students"][0]["optim"] = {"grad_clip": 0.5}
    check_inputs_exist(parse_config(raw))
    raw["students"][0]["optim"] = {"grad_clip": 2.0}
    with pytest.raises(UserError, match=rf"^students.0.optim.grad_clip is 2 but train.deepspeed_config {ds} sets "
                                        r"gradient_clipping 0.5; set it in one place"):
        check_inputs_exist(parse_config(raw))


def test_readme_job_examples_validate():
    """The worked examples in README's "Four common jobs" stay valid configs."""
    import re

    from distill.config import check_config, parse_config
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Four common jobs"):text.index("## Where artefacts go")]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    assert len(blocks) == 4
    sources = []
    for block in blocks:
        cfg = check_config(parse_config({"data": {"stdlib": True}, **block}))
        sources += [s.model.source for s in cfg.students]
    assert sources == ["pretrained", "from_teacher", "from_teacher", "pretrained", "scout", "maverick", "dense"]


def test_small_top_k_note_names_the_random_init_students_it_concerns():
    """bench/peer.py: random-init students on the top-64 reach 1.7-2.3x the held-out perplexity
    of the full distribution; the run says so, for those students only, and only where it holds."""
    from distill.stages import small_top_k_note

    def note(dense=False, **over):
        raw = minimal(**{"cache.estimator": "topk", **over})
        raw["students"] += [{"name": "ce", "model": {"preset": "dense"}, "baseline": True},
                            {"name": "warm", "model": {"preset": "dense"}, "init": "teacher"},
                            {"name": "cut", "model": {"from_teacher": {"num_layers": 1}}}]
        return small_top_k_note(parse_config(raw), dense)

    cached = note()
    assert cached.startswith("[train] note: s start from random init and learn only the teacher's top-64;")
    assert cached.endswith("consider cache.estimator: sampled with cache.samples: 256, the cached mode's default (1.00-1.02x "
                           "the full distribution's there), or cache.k: 512")  # no online_dense in cached mode
    assert note(dense=True) == cached  # a cached run reads the cache's top-k whatever online_dense says
    assert "train.online_dense: true, " in note(**{"train.mode": "online"})  # online, top-k: auto fell back
    assert note(dense=True, **{"train.mode": "online"}) is None
    # on-policy steps take no sampled signal (refused by the config): the note does not offer one
    on_policy = note(**{"train.mode": "online", "train.on_policy": {"share": {"kind": "constant", "start": 0.5}}})
    assert on_policy.endswith("consider train.online_dense: true, or cache.k: 512"), on_policy
    assert note(**{"cache.k": 512}) is None
    sampled = minimal(**{"cache.estimator": "sampled", "students.0.loss.tail": "sampled"})
    assert small_top_k_note(parse_config(sampled)) is None
    assert small_top_k_note(parse_config(minimal())) is None  # the default: auto chose draws
    assert note(**{"students.0.init": "teacher"}) is None  # then no student is concerned
    # the demo's students learn from a sampled cache: no note there
    assert small_top_k_note(parse_config(demo_config(Path("unused"), "quick"))) is None


def test_online_dense_auto_picks_the_whole_distribution_where_it_fits():
    """train.online_dense: auto (the default) hands students the teacher's dense logits in
    online mode with an in-process top-k teacher when a step's fp32 logits fit in 2 GiB
    (every micro-batch of a step is scored before training: grad_accum does not shrink it);
    a cache, a server teacher, a sampled signal, on-policy steps or a larger step keep the
    top-k; true/false are obeyed, true with a server refused.  The run prints which."""
    from distill.runtime import DENSE_AUTO_BYTES, dense_logits_bytes, dense_signal
    from distill.stages import signal_note

    def cfg(**over):
        return parse_config(minimal(**{"train.mode": "online", **over}))

    assert parse_config(minimal()).train.online_dense == "auto"
    V = 202_048  # Llama 4's: 8 x 256 tokens (the defaults) are 1.66 GB
    assert dense_logits_bytes(cfg(), V) == 8 * 256 * V * 4 <= DENSE_AUTO_BYTES
    assert dense_signal(cfg(), V)
    assert not dense_signal(cfg(**{"data.seq_len": 512}), V)  # 3.3 GB
    assert not dense_signal(cfg(**{"data.seq_len": 512, "train.grad_accum": 2}), V)  # all micro-batches are held
    assert dense_signal(cfg(**{"data.seq_len": 512, "train.batch_size": 4}), V)
    assert not dense_signal(cfg(**{"train.mode": "cached"}), V)
    assert not dense_signal(cfg(**{"cache.estimator": "sampled", "students.0.loss.tail": "sampled"}), V)
    assert not dense_signal(cfg(**{"teacher.source": "server", "teacher.server": {"url": "http://x:1", "model": "m"},
                                   "teacher.model": None}), V)
    on_policy = {"train.on_policy": {"share": {"kind": "constant", "start": 0.5}}}
    assert not dense_signal(cfg(**on_policy), V)  # its signal spans students x prompts x completions
    assert dense_signal(cfg(**on_policy, **{"train.online_dense": True}), V)
    assert dense_signal(cfg(**{"data.seq_len": 4096, "train.online_dense": True}), V)  # asked for: obeyed
    assert not dense_signal(cfg(**{"train.online_dense": False}), V)
    assert signal_note(cfg(), V, True) == ("[train] teacher signal: the whole distribution (train.online_dense: "
                                           "auto; 1.66 GB of fp32 teacher logits a step)")
    assert signal_note(cfg(**{"data.seq_len": 512}), V, False).startswith("[train] teacher signal: top-64 "
                                                                          "(train.online_dense: auto; the whole")
    assert signal_note(cfg(**{"train.online_dense": True}), V, True) is None  # chosen, not picked
    assert signal_note(parse_config(minimal()), V, False) is None  # cached
    assert "keeps the top-k with on-policy steps" in signal_note(cfg(**on_policy), V, False)
    server = {"teacher.source": "server", "teacher.server": {"url": "http://x:1", "model": "m"}, "teacher.model": None}
    said = "[train] teacher signal: top-64 from the server teacher (teacher.source: server; a server returns the top-k"
    assert signal_note(cfg(**server), V, False).startswith(said)  # online and on-policy runs said nothing
    assert signal_note(cfg(**server, **on_policy), V, False).startswith(said)
    assert "a server teacher returns its top-k only" in error_of(minimal(**{"train.mode": "online", **server,
                                                                              "train.online_dense": True}))


def test_entries_per_token_must_fit_the_vocabulary():
    """cache.k, and a sampled cache's exact head plus its draws, against the tokenizer's size:
    one line naming the keys, before any teacher work."""
    from distill.runtime import check_k

    check_k(parse_config(minimal(**{"cache.k": 300})), 300)
    with pytest.raises(UserError, match="cache.k=301 is larger than the vocabulary"):
        check_k(parse_config(minimal(**{"cache.k": 301})), 300)
    sampled = {"cache.estimator": "sampled", "cache.k": 16, "cache.samples": 32, "students.0.loss.tail": "sampled"}
    check_k(parse_config(minimal(**sampled, **{"cache.exact_top": 268})), 300)  # 268 + 32 draws
    with pytest.raises(UserError, match=r"cache.exact_top \+ cache.samples = 301 entries per token"):
        check_k(parse_config(minimal(**sampled, **{"cache.exact_top": 269})), 300)


def test_cache_estimator_auto_draws_where_every_student_can_learn_from_draws():
    """cache.estimator: auto (the default) -> `sampled` in cached mode with an in-process
    teacher when every distilled student takes forward KL at the draws' temperature, else
    `topk`; each loss.tail: auto follows it, and the run names the reason in one line."""
    cfg = parse_config(minimal(**{"students.0.loss.adaptive": "entropy"}))
    assert (cfg.cache.estimator, cfg.cache.samples, cfg.students[0].loss.tail) == ("sampled", 256, "sampled")
    assert cfg.estimator_note == ("teacher signal: 256 draws per token (cache.estimator: auto; every student can "
                                  "learn from draws)")
    baseline = {"name": "ce", "model": {"preset": "dense"}, "baseline": True, "loss": {"divergence": "reverse_kl"}}
    raw = minimal()
    raw["students"].append(baseline)  # a CE-only baseline reads no signal: it never stands in the way
    assert [s.loss.tail for s in parse_config(raw).students] == ["sampled", "sampled"]
    for over, why in [
        ({"students.0.loss.divergence": "reverse_kl"}, "students.0.loss.divergence reverse_kl is not estimated"),
        ({"students.0.loss.divergence": "jsd"}, "students.0.loss.divergence jsd is not estimated"),
        ({"students.0.loss.tail": "renorm"}, "students.0.loss.tail is renorm"),
        ({"students.0.loss.temperature": 2.0}, "students.0.loss.temperature 2 differs from cache.sample_temperature 1"),
        ({"students.0.loss.hard_target": "teacher_argmax"}, "students.0.loss.hard_target is teacher_argmax"),
        ({"students.0.loss.adaptive": "confidence"}, "students.0.loss.adaptive is confidence"),
    ]:
        cfg = check_config(parse_config(minimal(**over)))
        assert cfg.cache.estimator == "topk", over
        assert cfg.estimator_note.startswith(f"teacher signal: the top-64 (cache.estimator: auto; {why}"), over
        assert cfg.students[0].loss.tail in ("bucket", "renorm")
    # the draws' temperature may be set to the students': then draws again
    cfg = parse_config(minimal(**{"students.0.loss.temperature": 2.0, "cache.sample_temperature": 2.0}))
    assert cfg.cache.estimator == "sampled"
    # online: the teacher hands over its whole distribution (or its top-k); nothing to note here
    cfg = parse_config(minimal(**{"train.mode": "online"}))
    assert (cfg.cache.estimator, cfg.students[0].loss.tail, cfg.estimator_note) == ("topk", "bucket", None)
    # a named estimator is kept, and tail: auto follows it
    cfg = parse_config(minimal(**{"cache.estimator": "topk"}))
    assert (cfg.cache.estimator, cfg.students[0].loss.tail, cfg.estimator_note) == ("topk", "bucket", None)
    # a resolved config reads back as itself (what a checkpoint's hash and --resume see)
    again = parse_config(parse_config(minimal()).model_dump(mode="json"))
    assert (again.cache.estimator, again.students[0].loss.tail) == ("sampled", "sampled")
    # exact_top: a sampled cache's head; refused where the signal is a top-k, naming why
    assert parse_config(minimal(**{"cache.exact_top": 8})).cache.estimator == "sampled"
    assert "exact_top: 8 keeps a sampled cache's head exactly; it needs estimator: sampled" in error_of(
        minimal(**{"cache.exact_top": 8, "cache.estimator": "topk"}))
    assert ("cache.exact_top: 8 keeps a sampled cache's head exactly, but cache.estimator: auto chose the top-k "
            "(students.0.loss.divergence tv is not estimated") in error_of(
        minimal(**{"cache.exact_top": 8, "students.0.loss.divergence": "tv"}))


def test_a_server_teacher_gets_the_top_k():
    """A server returns top-k log-probs only: auto takes the top-k, and `sampled` is refused in
    one line (it failed deep in `distill cache` before)."""
    server = {"teacher": {"source": "server", "server": {"url": "http://localhost:1", "model": "m"}}}
    raw = minimal()
    raw["teacher"] = server["teacher"]
    cfg = parse_config(raw)
    assert cfg.cache.estimator == "topk"
    assert cfg.estimator_note.endswith("(cache.estimator: auto; a server teacher returns its top-k log-probs only)")
    raw["cache"] = {"estimator": "sampled"}
    assert "cache.estimator: sampled draws from the teacher's whole distribution, but a server teacher returns " \
           "its top-k log-probs only" in error_of(raw)


def _refused_by_the_cli(raw: dict, tmp_path: Path) -> str:
    """`distill prepare -c` of `raw` as a YAML file: exit 2 and the one line it says."""
    from tests.conftest import run_cli

    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    r = run_cli("prepare", "-c", str(path), "--quiet", "--set", f"out_dir={tmp_path / 'out'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    return lines[0].removeprefix("error: ")


def test_a_model_dir_without_config_json_is_refused_and_an_adapter_named(tmp_path):
    """A teacher or student dir with no config.json is refused at config check, naming the key;
    a PEFT adapter dir (what a LoRA run saves) gets how to merge it (before, a teacher adapter
    dir failed later with 'teacher: X has no config.json')."""
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "base"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    said = _refused_by_the_cli(minimal(**{"teacher": {"source": "checkpoint", "path": str(adapter)}}), tmp_path)
    assert said.startswith(f"teacher.path: {adapter} is not a Hugging Face model dir (no config.json); it is a PEFT "
                           f"adapter (adapter_config.json): merge it into its base model first"), said
    assert said.endswith("and set teacher.path to DIR"), said
    said = _refused_by_the_cli(minimal(**{"students.0.model": {"path": str(adapter)}}), tmp_path)
    assert said.startswith(f"students.0.model.path: {adapter} is not a Hugging Face model dir") and "PEFT" in said
    empty = tmp_path / "empty"
    empty.mkdir()
    said = _refused_by_the_cli(minimal(**{"teacher": {"source": "checkpoint", "path": str(empty)}}), tmp_path)
    assert said == (f"teacher.path: {empty} is not a Hugging Face model dir (no config.json); point it at a dir "
                    f"saved with save_pretrained"), said


def test_a_word_yaml_reads_as_a_boolean_is_named(tmp_path):
    """`name: off` is the boolean False to YAML 1.1: the message said only "Input should be a
    valid string"."""
    text = yaml.safe_dump(minimal()).replace("name: s", "name: off")
    said = _refused_by_the_cli(text, tmp_path)
    assert said == (f"{tmp_path / 'run.yaml'}: students.0.name: Input should be a valid string (YAML reads an "
                    f"unquoted on/off/yes/no/true/false as False; quote the word)"), said


def _choices(model, field: str) -> set[str]:
    """The names a config field's Literal admits."""
    return set(typing.get_args(model.model_fields[field].annotation))


def test_config_names_match_the_registries():
    """Each extension point has one registry (a name -> implementation dict or tuple) and the
    config names its keys again, as a Literal pydantic checks, or in a field's description: a
    name added to a registry and not to the config (or the other way round) is refused, or
    offered and then fails.  The deliberate differences are spelled out here."""
    from distill.config import (CacheConfig, ExportConfig, LossConfig, ModelConfig, OnPolicyConfig, ScheduleConfig,
                                SelectConfig, TeacherConfig)
    from distill.report.export import DTYPES
    from distill.runtime import TEACHER_SOURCES
    from losses.difficulty import STATS
    from losses.divergences import DIVERGENCES, ESTIMATORS
    from losses.hard import HARD_TARGETS
    from losses.schedules import SCHEDULES, WARMUPS
    from losses.weighting import WEIGHTING_MODES
    from students.presets import PRESETS
    from teachers.cache.codec import CODECS

    assert _choices(ScheduleConfig, "kind") == set(SCHEDULES)
    assert _choices(ScheduleConfig, "warmup") == set(WARMUPS)
    assert _choices(LossConfig, "tail") == set(ESTIMATORS) | {"auto"}  # auto: resolve_tail picks one
    assert _choices(LossConfig, "hard_target") == set(HARD_TARGETS)
    assert _choices(LossConfig, "adaptive") == set(WEIGHTING_MODES) - {"uniform"} | {"none"}  # none: uniform weights
    assert _choices(CacheConfig, "encoding") == set(CODECS) - {"sampled"}  # sampled: by cache.estimator only
    assert _choices(TeacherConfig, "source") == set(TEACHER_SOURCES) | {"cache"}  # cache: replays, scores nothing
    assert _choices(SelectConfig, "by") == set(STATS)
    assert _choices(OnPolicyConfig, "divergence") <= set(DIVERGENCES)
    assert _choices(ExportConfig, "dtype") == set(DTYPES)
    # free-form names checked against their registry when a run starts: the description lists them all
    listed = LossConfig.model_fields["divergence"].description
    assert set(re.findall(r"\b[a-z_]+\b", listed.split(":", 1)[1])) >= set(DIVERGENCES), listed
    listed = ModelConfig.model_fields["preset"].description
    assert set(re.findall(r"\b[a-z_0-9]+\b", listed.split(":", 1)[1])) >= set(PRESETS), listed
