"""A pretrained student from a local Hugging Face dir (`model: {path: DIR}`): every
stock family loads and trains, vocabularies are checked, tied embeddings stay tied, and
the export keeps the student's own architecture and config fields."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.errors import UserError
from distill.config import LossConfig, parse_config
from distill.runtime import check_student_vocab
from distill.train.student import distill_loss
from students.build import load_causal_lm
from students.sparse_moe import SparseLlama4TextMoe
from teachers import LiveTeacher
from teachers.protocol import Batch
from tests.hf_models import make_tokenizer, save_model


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "llama4"])
def test_every_family_loads_and_learns_from_the_teacher(kind, hf_family, tmp_path):
    n = hf_family["vocab"]
    model = load_causal_lm(save_model(kind, n, tmp_path / kind, num_hidden_layers=1))
    assert any(isinstance(m, SparseLlama4TextMoe) for m in model.modules()) == (kind == "llama4")
    teacher = LiveTeacher(load_causal_lm(hf_family["teacher"]), 8, n, torch.device("cpu"))
    ids = torch.randint(0, n, (2, 13), generator=torch.Generator().manual_seed(0))
    batch = Batch.of(ids, [0, 1])
    signal, valid = teacher.signal(batch)
    out = distill_loss(model, batch.input_ids, batch.labels, signal, valid, LossConfig(), 0.5, baseline=False)
    out.total.backward()
    assert torch.isfinite(out.total) and out.stats["soft"] > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,head", [("gemma2", {"final_logit_softcapping": 2.0}), ("cohere", {"logit_scale": 0.5}),
                                       ("granite", {"logits_scaling": 4.0})])
def test_a_capped_or_scaled_head_is_trained_and_scored_as_the_model_computes(kind, head, hf_family, tmp_path):
    """Gemma 2/3 soft-cap their logits, Cohere and Granite scale them, after the lm_head.
    Training (the chunked losses over the lm_head) and validation gave the bare lm_head's
    logits before: another function than the one the export computes (a Gemma 2 student
    scored 1,269 where stock transformers measured 1,320).  The per-token losses, their
    gradients and the validation CE now equal those of the model's own logits."""
    from distill.train.student import student_forward
    from distill.train.validate import evaluate_model
    from losses import DIVERGENCES
    from distill.train.setup import check_head

    n = hf_family["vocab"]
    model = load_causal_lm(save_model(kind, n, tmp_path / kind, num_hidden_layers=1, **head))
    with torch.no_grad():  # logits of a trained model's size (random init gives |z| ~ 0.1, where a cap is linear)
        model.lm_head.weight.mul_(60.0)
    check_head(model)
    teacher = LiveTeacher(load_causal_lm(hf_family["teacher"]), 8, n, torch.device("cpu"))
    ids = torch.randint(0, n, (2, 13), generator=torch.Generator().manual_seed(0))
    batch = Batch.of(ids, [0, 1])
    signal, valid = teacher.signal(batch)
    mask = valid.reshape(-1)
    for temperature in (1.0, 2.0):
        cfg = LossConfig(temperature=temperature)
        model.zero_grad()
        hard, soft = student_forward(model, batch.input_ids, batch.labels, signal, mask, cfg, baseline=False)
        (hard.sum() + soft.sum()).backward()
        got = [p.grad.clone() for p in (model.lm_head.weight, model.model.norm.weight)]
        model.zero_grad()
        logits = model(input_ids=batch.input_ids, use_cache=False).logits.reshape(-1, n)  # the model's own
        want_hard = torch.nn.functional.cross_entropy(logits, batch.labels.reshape(-1), reduction="none")
        want_soft = DIVERGENCES["forward_kl"](logits, signal.flatten(), temperature=temperature, tail="bucket",
                                              mask=mask)
        (want_hard.sum() + want_soft.sum()).backward()
        torch.testing.assert_close(hard, want_hard, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(soft, want_soft, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, (model.lm_head.weight.grad, model.model.norm.weight.grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    blocks = torch.randint(0, n, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1], use_cache=False).logits
        raw = model.lm_head(model.model(input_ids=blocks[:, :-1], use_cache=False).last_hidden_state)
    assert (logits - raw).abs().max() > 0.5  # the head bends these logits
    want_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, n), blocks[:, 1:].reshape(-1))
    assert evaluate_model(model, blocks)["val_ce"] == pytest.approx(float(want_ce), rel=1e-5)


def test_a_head_the_toolkit_does_not_know_is_refused(hf_family, tmp_path):
    """An architecture whose logits are more than its lm_head's output, in a way
    `head_transform` does not know, would train and be scored as another function: refused
    by name when the student is built."""
    from transformers import LlamaForCausalLM

    from distill.train.setup import check_head

    class DoubledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = load_causal_lm(hf_family["student"])
    check_head(model)  # a plain head
    model.__class__ = DoubledLogits
    with pytest.raises(ValueError, match="its logits are not its lm_head's output .* a llama head this toolkit "
                                         "does not know"):
        check_head(model)


def test_an_encoder_is_refused_as_a_teacher_or_student(hf_family, tmp_path):
    """A BERT dir loads as `BertLMHeadModel` with bidirectional attention: position 0's logits
    change with token 3, so its signal would see the answer.  Refused unless its config says
    it is a decoder; a causal LM of an encoder-decoder family (BART's decoder) is not."""
    from transformers import BartConfig, BartForCausalLM, BertConfig, BertForMaskedLM

    from teachers.live import load_teacher_model

    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(BertConfig(**small)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match=r"teacher: .*bert: a bert model attends to the tokens after each position "
                                        r"\(an encoder, not a causal LM\)"):
        load_teacher_model(tmp_path / "bert")
    BertForMaskedLM(BertConfig(**small, is_decoder=True)).save_pretrained(tmp_path / "bert-decoder")
    model = load_causal_lm(tmp_path / "bert-decoder")
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(logits[0, :3], logits[1, :3], atol=1e-6)  # what the check lets through is causal
    BartForCausalLM(BartConfig(vocab_size=64, d_model=16, decoder_layers=1, encoder_layers=1, decoder_attention_heads=2,
                               encoder_attention_heads=2, decoder_ffn_dim=32, encoder_ffn_dim=32)).save_pretrained(tmp_path / "bart")
    load_causal_lm(tmp_path / "bart")


@pytest.mark.parametrize("command,mode", [("train", "online"), ("run", "cached")])
def test_a_student_with_non_finite_weights_is_refused_by_name(hf_family, tmp_path, cli, command, mode):
    """One NaN in a pretrained student's lm_head: refused naming the weight, not misread as an
    unknown head architecture (its logits' difference to the head's output is NaN); by
    `distill run` before the teacher pass, not after it (no cache is written)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.hf_models import chat_rows, write_jsonl

    damaged = tmp_path / "damaged"
    shutil.copytree(hf_family["student"], damaged)
    weights = load_file(str(damaged / "model.safetensors"))
    head = next(k for k in weights if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"))
    weights[head][3, 5] = float("nan")
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"out_dir": str(tmp_path / "out"), "data": {"paths": [str(write_jsonl(chat_rows(), tmp_path / "c.jsonl"))],
                                                      "seq_len": 64},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
           "students": [{"name": "s", "model": {"path": str(damaged)}}],
           "train": {"mode": mode, "steps": 1, "batch_size": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = cli(command, "-c", str(tmp_path / "run.yaml"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    where = "students.0.model" if command == "train" else f"students.0.model.path {damaged}"
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {where}: its weights hold NaN or inf ({head}: 1 of {weights[head].numel():,}): a damaged "
        f"or wrongly converted checkpoint; replace it"), r.stderr
    assert not list((tmp_path / "out").glob("cache/**/*.bin")) and not (tmp_path / "out" / "cache").exists()


@pytest.mark.parametrize("command", ["cache", "run"])
def test_a_student_of_another_tokenizer_is_refused_before_the_teacher_pass(hf_family, tmp_path, cli, command):
    """`distill run` wrote the whole cache (hours, at scale) before the student was built and
    its tokenizer refused; `distill cache` wrote it and said nothing.  Now both stop first,
    naming the lowest-id token that differs (the example changed from run to run)."""
    from tests.hf_models import chat_rows, write_jsonl

    tok = make_tokenizer(["abc def " * 50], tmp_path / "other", alphabet="reversed")  # same size, other ids
    other = save_model("llama", hf_family["vocab"], tmp_path / "other", tok, seed=3)
    run = hf_family["tokenizer"].get_vocab()
    first = min((t for t, i in run.items() if tok.get_vocab().get(t) != i), key=run.get)
    cfg = {"out_dir": str(tmp_path / "out"), "data": {"paths": [str(write_jsonl(chat_rows(), tmp_path / "c.jsonl"))],
                                                      "seq_len": 64},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
           "students": [{"name": "own", "model": {"path": str(hf_family["student"])}},
                        {"name": "other", "model": {"path": str(other)}}],
           "train": {"mode": "cached", "steps": 2, "batch_size": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = cli(command, "-c", str(tmp_path / "run.yaml"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: student other: its tokenizer ({other}) is not the run's ({hf_family['teacher']}): "
        f"{sum(tok.get_vocab().get(t) != i for t, i in run.items())} of {len(run)} tokens have other ids (e.g. "
        f"{first!r}); distil between models of one tokenizer"), r.stderr
    assert not (tmp_path / "out" / "cache").exists() and not (tmp_path / "out" / "data").exists()


def test_other_tokenizer_is_refused_naming_both(hf_family, tmp_path, capsys):
    cfg = parse_config({"out_dir": str(tmp_path), "data": {"stdlib": True, "tokenizer": {"path": str(hf_family["teacher"])}},
                        "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
                        "students": [{"name": "s", "model": {"path": str(tmp_path / "other")}}]})
    tok, n = hf_family["tokenizer"], hf_family["vocab"]
    # Same specials and size, other ids for the byte alphabet: a truly different tokenizer.
    make_tokenizer(["abc def " * 50], tmp_path / "other", alphabet="reversed")
    with pytest.raises(UserError, match=rf"student s: its tokenizer \({tmp_path / 'other'}\) is not the run's "
                                        rf"\({hf_family['teacher']}\)"):
        check_student_vocab(cfg, "s", tmp_path / "other", n, tok)
    with pytest.raises(UserError, match=rf"embedding has {n - 1} rows but the run's tokenizer .* has {n} tokens"):
        check_student_vocab(cfg, "s", hf_family["student"], n - 1, tok)
    check_student_vocab(cfg, "s", hf_family["student"], n + 4, tok)  # padding: said, not refused
    assert f"embedding has {n + 4} rows for the run tokenizer's {n} tokens; the 4 padding rows" in capsys.readouterr().err
    # A chat student's own special tokens (ids past the run's): not padding, and its export would
    # ship the run's tokenizer without them, so the run says so and how to keep them.
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(str(hf_family["student"]))
    own.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    own.save_pretrained(str(tmp_path / "own"))
    check_student_vocab(cfg, "s", tmp_path / "own", n + 4, tok)
    err = capsys.readouterr().err
    assert (f"student s: its tokenizer ({tmp_path / 'own'}) has 2 tokens the run's lacks ('<think>', '</think>'); "
            f"the run never produces them, and its export ships the run's tokenizer, without them "
            f"(`distill export CKPT --tokenizer {tmp_path / 'own'}` ships the student's own)") in err, err
    assert f"embedding has {n + 4} rows for the run tokenizer's {n} tokens and the 2 of its own; the 2 padding rows " \
           f"are never targets" in err, err


def test_init_teacher_on_a_pretrained_student_is_refused(hf_family, tmp_path):
    from distill.config import check_config

    cfg = parse_config({"data": {"stdlib": True}, "teacher": {"source": "checkpoint", "path": str(tmp_path)},
                        "students": [{"name": "s", "model": {"path": str(tmp_path)}, "init": "teacher"}]})
    with pytest.raises(UserError, match="students.0.init: 'teacher' would overwrite the pretrained weights"):
        check_config(cfg)
    with pytest.raises(UserError, match="give exactly one of preset, path or from_teacher"):
        parse_config({"data": {"stdlib": True}, "teacher": {"source": "cache"},
                      "students": [{"name": "s", "model": {"preset": "dense", "path": str(tmp_path)}}]})


@pytest.fixture(scope="module")
def pretrained_run(hf_family, stdlib_corpus, tmp_path_factory):
    from tests.conftest import run_cli

    work = tmp_path_factory.mktemp("pretrained")
    cfg = {"out_dir": str(work / "run"), "seed": 1, "data": {"paths": [str(stdlib_corpus)], "seq_len": 32},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "llama", "model": {"path": str(hf_family["student"])},
                         "optim": {"lr": 1e-2, "warmup_steps": 1}}],
           "train": {"mode": "online", "steps": 3, "batch_size": 2, "eval_every": 0, "eval_blocks": 2,
                     "checkpoint_every": 0}}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(work / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "run", r


def test_pretrained_student_run_trains_and_says_the_padding(pretrained_run, hf_family):
    run, r = pretrained_run
    assert "student llama: embedding has" in r.stderr and "4 padding rows are never targets" in r.stderr
    # `distill run` resumes by default; on a fresh out_dir it still says how the run is set up
    assert "[train] teacher signal: " in r.stdout, r.stdout
    report = json.loads((run / "report.json").read_text())["students"]["llama"]
    assert report["kind"] == "pretrained" and report["init"]["architecture"] == "LlamaForCausalLM"
    assert "pretrained" in (run / "report.md").read_text()
    # It trained from the pretrained weights: moved, but not far (lr 1e-2, 3 steps).
    start = load_file(str(hf_family["student"] / "model.safetensors"))
    ckpt = next((run / "students" / "llama" / "checkpoints").glob("step_*"))
    end = load_file(str(ckpt / "model.safetensors"))
    moved = (end["model.embed_tokens.weight"] - start["model.embed_tokens.weight"]).abs().max()
    assert 0 < moved < 0.1
    # Tied through training and the checkpoint: the two names hold one trained matrix.
    assert torch.equal(end["lm_head.weight"], end["model.embed_tokens.weight"])


def test_pretrained_export_keeps_architecture_config_and_ties(pretrained_run, hf_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = pretrained_run
    export = run / "students" / "llama" / "export"
    original = json.loads((hf_family["student"] / "config.json").read_text())
    exported = json.loads((export / "config.json").read_text())
    for key, value in original.items():
        if key not in ("transformers_version", "dtype"):
            assert exported.get(key) == value, key
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["tie_word_embeddings"] is True
    assert json.loads((export / "generation_config.json").read_text())["max_new_tokens"] == 7  # its own
    model = AutoModelForCausalLM.from_pretrained(str(export))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(export))
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5) or int(out[0, -1]) == tok.eos_token_id


def test_eval_inspect_and_card_work_for_a_pretrained_student(pretrained_run, hf_family):
    from tests.conftest import run_cli

    run, _ = pretrained_run
    r = run_cli("eval", "-c", str(run.parent / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["scored_tokens"] == "all" and report["students"]["llama"]["params_total"] > 0
    export = run / "students" / "llama" / "export"
    # the card names the models as their readers know them, not by this machine's paths
    card = (export / "README.md").read_text()
    assert f"| architecture | pretrained {hf_family['student'].name} |" in card, card
    assert f"| teacher | {hf_family['teacher'].name} |" in card and str(hf_family["work"]) not in card, card
    # a tokenizer that sets no model_max_length (transformers' 1e30) ships the model's positions
    tok_config = json.loads((export / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == json.loads((export / "config.json").read_text())["max_position_embeddings"]
    r = run_cli("inspect", str(export), timeout=120)
    assert r.returncode == 0 and "params_total" in r.stdout and "llama" in r.stdout, r.stdout + r.stderr


def test_a_standalone_export_ships_the_tokenizer_the_run_used(pretrained_run, tmp_path):
    """The run's tokenizer is the teacher's, outside the run dir: the checkpoint records where it
    is, so `distill export` of a student dir ships it without --tokenizer (it wrote none before)."""
    from transformers import AutoTokenizer

    from tests.conftest import run_cli

    run, _ = pretrained_run
    r = run_cli("export", str(run / "students" / "llama"), "--out", str(tmp_path / "export"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config)  # how it was loaded here, not the user's business
    teacher_dir = json.loads(next((run / "students" / "llama" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert teacher_dir["tokenizer"] == teacher_dir["teacher"]
    ours, theirs = AutoTokenizer.from_pretrained(str(tmp_path / "export")), AutoTokenizer.from_pretrained(teacher_dir["tokenizer"])
    assert ours.get_vocab() == theirs.get_vocab() and ours.chat_template == theirs.chat_template
    # --tokenizer ships another (the student's own, with special tokens the run's lacks)
    own = AutoTokenizer.from_pretrained(teacher_dir["tokenizer"])
    own.add_special_tokens({"additional_special_tokens": ["<think>"]})
    own.save_pretrained(str(tmp_path / "own"))
    r = run_cli("export", str(run / "students" / "llama"), "--out", str(tmp_path / "own-export"), "--tokenizer",
                str(tmp_path / "own"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert AutoTokenizer.from_pretrained(str(tmp_path / "own-export")).convert_tokens_to_ids("<think>") == len(theirs)
    # a step dir that is not there: the ones that are, named
    r = run_cli("export", str(run / "students" / "llama" / "checkpoints" / "step_3"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "the checkpoints beside it are step_00000003" in r.stderr, r.stderr
    # A checkpoint that names no tokenizer and lies outside a run: refused in one line, nothing written.
    import shutil

    ckpt = tmp_path / "loose" / "step_00000003"
    shutil.copytree(next((run / "students" / "llama" / "checkpoints").glob("step_*")), ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("tokenizer", "teacher")}))
    r = run_cli("export", str(ckpt), "--out", str(tmp_path / "loose-export"), timeout=300)
    assert r.returncode == 2 and "pass --tokenizer DIR" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "loose-export").exists()


def test_a_student_refused_on_overwrite_leaves_the_earlier_run_in_place(pretrained_run, hf_family, tmp_path):
    """`train --overwrite` moves the earlier run aside only once every input checks out, the
    students too: a pretrained student whose embedding is smaller than the tokenizer is refused
    in one line, and the earlier run's checkpoints stay where they were (moved aside before)."""
    import shutil

    from tests.conftest import run_cli

    run, _ = pretrained_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    small = save_model("llama", hf_family["vocab"] - 1, tmp_path / "small")
    cfg = yaml.safe_load((run.parent / "run.yaml").read_text())
    cfg["out_dir"] = str(out)
    cfg["students"][0]["model"]["path"] = str(small)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in (out / "students" / "llama" / "checkpoints").iterdir())
    r = run_cli("train", "-c", str(tmp_path / "run.yaml"), "--quiet", "--overwrite", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: student llama: its embedding has"), r.stderr
    assert not [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert sorted(p.name for p in (out / "students" / "llama" / "checkpoints").iterdir()) == before


def test_a_run_tokenizer_other_than_the_checkpoint_teachers_is_refused(hf_family, stdlib_corpus, tmp_path):
    """data.tokenizer.path naming a tokenizer that gives the teacher's tokens other ids: the
    teacher would be fed, and its signal read, through the wrong ids (a silent run with a
    teacher NLL of 8 against 2.6 before).  Refused when the data is prepared; a copy of the
    teacher's own tokenizer elsewhere is the same tokenizer and is accepted."""
    import shutil

    from tests.conftest import run_cli

    other = tmp_path / "other"
    make_tokenizer(["abc def " * 50], other, alphabet="reversed")  # same size and specials, other ids
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(stdlib_corpus)], "seq_len": 32,
                                                      "tokenizer": {"path": str(other)}},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
           "students": [{"name": "s", "model": {"preset": "dense"}}], "train": {"mode": "online", "steps": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: teacher.path: its tokenizer ({hf_family['teacher']}) is not the run's "
                           f"(data.tokenizer.path {other}): ") and "remove data.tokenizer.path" in last, last
    assert not (tmp_path / "run" / "data").exists()  # refused before the corpus was tokenised

    same = tmp_path / "same"
    same.mkdir()
    for f in hf_family["teacher"].iterdir():
        if "token" in f.name or "chat_template" in f.name:
            shutil.copy(f, same / f.name)
    cfg["data"]["tokenizer"]["path"] = str(same)
    cfg["out_dir"] = str(tmp_path / "run2")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_teacher_without_a_tokenizer_or_too_few_positions_is_refused(hf_family, stdlib_corpus, tmp_path):
    """Checks before any work: a checkpoint teacher dir with weights but no tokenizer (a BPE
    trained here would give its ids other meanings: it was trained silently before); a seq_len
    past a learned position embedding (an index error deep in `distill cache` before) is
    refused, past rotary positions it is said in one line and the run goes on."""
    import shutil

    from transformers import GPT2Config

    from distill.config import max_positions
    from tests.conftest import run_cli

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_family["teacher"] / name, bare / name)
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(stdlib_corpus)], "seq_len": 32},
           "teacher": {"source": "checkpoint", "path": str(bare)},
           "students": [{"name": "s", "model": {"preset": "dense"}}], "train": {"mode": "online", "steps": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"error: teacher.path: {bare} holds no tokenizer (tokenizer.json or "
                                f"tokenizer_config.json); the teacher's signal is over its own token ids, so set "
                                f"data.tokenizer.path to its tokenizer's dir")
    assert not (tmp_path / "run" / "tokenizer").exists()

    learned = tmp_path / "gpt2"
    GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(str(learned))
    assert max_positions(learned) == (64, False)
    cfg["teacher"]["path"] = str(learned)
    cfg["data"]["seq_len"] = 65
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        f"data.seq_len 65 is longer than the 64 positions teacher.path {learned} was made for (its config.json); "
        f"lower data.seq_len to 64 or less"), r.stderr
    assert not (tmp_path / "run").exists()

    limit = json.loads((hf_family["teacher"] / "config.json").read_text())["max_position_embeddings"]
    assert max_positions(hf_family["teacher"]) == (limit, True)  # Qwen3: rotary
    cfg["teacher"]["path"] = str(hf_family["teacher"])
    cfg["data"]["seq_len"] = limit + 1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("prepare", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[config] note: data.seq_len {limit + 1} is longer than the {limit} positions teacher.path" in r.stderr
    # A rope_scaling factor stretches what a rotary model was made for (Qwen2.5 + YaRN as its card says).
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({"max_position_embeddings": 32768, "rope_theta": 1e6, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}))
    assert max_positions(scaled) == (131072, True)


def test_a_student_too_small_for_the_tokenizer_is_refused_before_the_teacher_pass(pretrained_run, hf_family, tmp_path):
    """`distill run` in cached mode: a pretrained student whose config.json declares fewer
    embedding rows than the run's tokenizer has tokens is refused from its config alone,
    before data preparation and the cache (before: after the whole teacher pass)."""
    from tests.conftest import run_cli

    run, _ = pretrained_run
    small = save_model("llama", hf_family["vocab"] - 1, tmp_path / "small")
    cfg = yaml.safe_load((run.parent / "run.yaml").read_text())
    cfg["out_dir"] = str(tmp_path / "run")
    cfg["students"][0]["model"]["path"] = str(small)
    cfg["train"]["mode"] = "cached"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: student llama: its embedding has {hf_family['vocab'] - 1} rows but the run's tokenizer"), r.stderr
    assert not (tmp_path / "run" / "cache").exists() and not (tmp_path / "run" / "data").exists()
