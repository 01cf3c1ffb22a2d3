"""Students cut from the teacher (`model: {from_teacher: {...}}`): the teacher's own config
with named fields changed, its layers chosen by angular distance, exact at full depth."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from students.build import build_model, load_causal_lm
from students.derive import choose_layers, derive_config
from students.init import init_from_teacher
from students.presets import behemoth
from tests.hf_models import save_model

IDS = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(0))


def _llama4_teacher():
    # 4 layers: 0-2 RoPE + chunked attention (chunk 8 < 20 tokens), 3 NoPE; MoE everywhere but layer 1.
    config = behemoth(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16,
                      num_experts=4, attention_chunk_size=8, moe_layers=[0, 2, 3], floor_scale=2)
    return build_model(config, seed=3)


def test_per_layer_fields_follow_the_kept_layers():
    teacher = _llama4_teacher().config
    config = derive_config(teacher, {"num_experts": 2}, layers=[1, 3])
    assert config.num_hidden_layers == 2 and config.num_local_experts == 2
    assert config.layer_types == [teacher.layer_types[1], teacher.layer_types[3]] == ["chunked_attention", "full_attention"]
    assert config.no_rope_layers == [teacher.no_rope_layers[1], teacher.no_rope_layers[3]]
    assert config.moe_layers == [1]  # teacher layer 3 is MoE, layer 1 dense
    for field in ("rope_parameters", "rms_norm_eps", "attention_chunk_size", "tie_word_embeddings", "head_dim", "floor_scale"):
        assert getattr(config, field) == getattr(teacher, field), field
    with pytest.raises(ValueError, match="has no field 'num_layerz'"):
        derive_config(teacher, {"num_layerz": 2}, layers=[0, 1])
    with pytest.raises(ValueError, match="num_layers=3 but layers names 2"):
        derive_config(teacher, {"num_layers": 3}, layers=[0, 1])


@pytest.mark.parametrize("kind", ["llama4", "qwen3_moe", "mixtral", "qwen3"])
def test_full_depth_student_reproduces_the_teacher_exactly(kind, tmp_path):
    teacher = _llama4_teacher() if kind == "llama4" else load_causal_lm(save_model(kind, 64, tmp_path, seed=4))
    n = teacher.config.num_hidden_layers
    student = build_model(derive_config(teacher.config, {}, layers=list(range(n))), seed=0)
    report = init_from_teacher(student, teacher, layers=list(range(n)))
    assert not report["skipped"]
    with torch.no_grad():
        assert torch.equal(student(IDS).logits, teacher(IDS).logits)


def test_experts_are_taken_from_a_fused_moe_teacher(tmp_path):
    teacher = load_causal_lm(save_model("qwen3_moe", 64, tmp_path, seed=4))
    student = build_model(derive_config(teacher.config, {"num_experts": 2}, layers=[0, 1]), seed=0)
    report = init_from_teacher(student, teacher, layers=[0, 1])
    assert report["copied"]["model.layers.1.mlp.experts.down_proj"] == "model.layers.1.mlp.experts.down_proj[:2]"
    assert torch.equal(student.model.layers[1].mlp.gate.weight, teacher.model.layers[1].mlp.gate.weight[:2])


def test_auto_drops_the_block_that_changes_the_hidden_states_least(tmp_path):
    teacher = load_causal_lm(save_model("llama", 64, tmp_path, seed=4, num_hidden_layers=5))
    with torch.no_grad():  # layers 2 and 3 write nothing into the residual stream: an identity block
        for i in (2, 3):
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()
    kept, why = choose_layers(teacher, [IDS], keep=3)
    assert kept == [0, 1, 4] and why["dropped"] == [2, 3]
    assert why["distance_by_first_dropped_layer"]["2"] == min(why["distance_by_first_dropped_layer"].values())
    assert why["distance_by_first_dropped_layer"]["2"] < 1e-3
    assert "3" not in why["distance_by_first_dropped_layer"]  # would drop the last layer: never


@pytest.fixture(scope="module")
def cut_run(hf_family, stdlib_corpus, tmp_path_factory):
    from tests.conftest import run_cli

    work = tmp_path_factory.mktemp("cut")
    tiny_lr = {"lr": 1e-12, "warmup_steps": 0, "weight_decay": 0.0}  # full: one step that moves nothing measurable
    cfg = {"out_dir": str(work / "run"), "seed": 1, "data": {"paths": [str(stdlib_corpus)], "seq_len": 32},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "full", "model": {"from_teacher": {}}, "init": "teacher", "optim": tiny_lr},
                        {"name": "cut", "model": {"from_teacher": {"num_layers": 2, "layers": "auto"}},
                         "init": "teacher", "optim": {"lr": 1e-2, "warmup_steps": 0}},
                        {"name": "picked", "model": {"from_teacher": {"num_layers": 2}}, "init": "teacher",
                         "init_layers": [1, 2], "optim": tiny_lr}],  # auto would keep [0, 2]
           "train": {"mode": "online", "steps": 2, "batch_size": 2, "eval_every": 0, "eval_blocks": 2}}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(work / "run.yaml"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (work / "run.stderr").write_text(r.stderr)
    return work / "run"


def test_the_cut_is_said_when_the_student_is_made_not_on_every_resume(cut_run):
    from tests.conftest import run_cli

    assert "[init] cut: teacher layers" in (cut_run.parent / "run.stderr").read_text()
    r = run_cli("train", "-c", str(cut_run.parent / "run.yaml"), "--quiet", "--resume", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[init]" not in r.stderr, r.stderr  # it loads its checkpoint over the cut


def test_full_depth_cut_over_the_cli_matches_the_teacher(cut_run, hf_family):
    from transformers import AutoModelForCausalLM, GenerationConfig

    export = cut_run / "students" / "full" / "export"
    student = AutoModelForCausalLM.from_pretrained(str(export))
    teacher = AutoModelForCausalLM.from_pretrained(str(hf_family["teacher"]))
    assert type(student) is type(teacher)
    ids = IDS % hf_family["vocab"]
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=1e-6)
    report = json.loads((cut_run / "report.json").read_text())["students"]
    # Not exactly 1 and 0: the student's argmax and softmax also span the 12 (random) padding rows
    # that the teacher's signal is cut away from and renormalised without.  With the whole
    # distribution (online_dense: auto) the KL is then exactly -log(1 - m), m the mass the model
    # puts on those rows (about 4% at random init).
    with torch.no_grad():
        pad_mass = teacher(ids).logits.softmax(-1)[..., hf_family["vocab"]:].sum(-1)  # (B, T)
    assert report["full"]["teacher_top1_agreement"] > 0.9
    # the report says so (the teacher's own row shows that mass too)
    assert "the teacher's 12 padding rows cut away" in (cut_run / "report.md").read_text()
    assert abs(report["full"]["kl_to_teacher"] - float(-torch.log1p(-pad_mass).mean())) < 0.1 * float(pad_mass.mean())
    assert report["full"]["init"]["layers"] == [0, 1, 2] and report["full"]["init"]["not_copied"] == {}
    assert student.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    # a cut of the teacher generates as the teacher does: its generation config (stop ids, defaults)
    assert GenerationConfig.from_pretrained(str(export)).to_dict() == \
        GenerationConfig.from_pretrained(str(hf_family["teacher"])).to_dict()


def test_init_layers_picks_the_teacher_layers_a_cut_student_keeps(cut_run, hf_family):
    """students.N.init_layers [1, 2]: the student's layers 0 and 1 are the teacher's 1 and 2 (auto keeps [0, 2])."""
    from safetensors.torch import load_file

    report = json.loads((cut_run / "report.json").read_text())["students"]
    assert report["picked"]["init"]["layers"] == [1, 2] and report["cut"]["init"]["layers"] == [0, 2]
    got = load_file(str(cut_run / "students" / "picked" / "export" / "model.safetensors"))
    teacher = {}
    for f in sorted(hf_family["teacher"].glob("*.safetensors")):
        teacher |= load_file(str(f))
    for mine, theirs in ((0, 1), (1, 2)):
        key = "model.layers.{}.self_attn.q_proj.weight"
        torch.testing.assert_close(got[key.format(mine)], teacher[key.format(theirs)], rtol=0, atol=1e-6)


def test_cut_student_trains_and_the_report_says_what_was_chosen(cut_run, hf_family):
    from safetensors.torch import load_file

    init = json.loads((cut_run / "report.json").read_text())["students"]["cut"]["init"]
    why = init["layer_choice"]
    assert init["source"] == "from_teacher" and why["method"].startswith("angular distance")
    # Dropping one of 3 layers, the last kept: layer 0 or 1 goes, whichever changes the states least.
    scores = why["distance_by_first_dropped_layer"]
    drop = min(scores, key=scores.get)
    assert why["dropped"] == [int(drop)] and init["layers"] == [t for t in range(3) if t != int(drop)]
    assert init["copied_tensors"] > 0 and init["not_copied"] == {}
    md = (cut_run / "report.md").read_text()
    assert f"teacher layers {init['layers']} (angular distance" in md
    assert "; distance by first dropped layer: " + ", ".join(f"{k}: {v:.4g}" for k, v in scores.items()) in md
    teacher = load_file(str(hf_family["teacher"] / "model.safetensors"))
    ckpt = next((cut_run / "students" / "cut" / "checkpoints").glob("step_*"))
    trained = load_file(str(ckpt / "model.safetensors"))
    last = f"model.layers.{init['layers'][-1]}.mlp.down_proj.weight"
    assert not torch.equal(trained["model.layers.1.mlp.down_proj.weight"], teacher[last])  # copied, then trained
    assert (trained["model.layers.1.mlp.down_proj.weight"] - teacher[last]).abs().max() < 0.1


@pytest.mark.parametrize("cut,said", [
    ({"num_layerz": 2}, "students.0.model.from_teacher: the teacher's Qwen3Config has no field 'num_layerz'"),
    ({"num_layers": 9}, "students.0.model.from_teacher: cannot keep 9 of the teacher's 3 layers"),
    ({"layers": [0, 5]}, "students.0.model.from_teacher: layers must be distinct teacher layer indices in [0, 3); got [0, 5]"),
    ({"layers": "first"}, "students.0.model.from_teacher.layers: give a list of teacher layer indices or `auto`, not 'first'"),
], ids=["typo", "too_many_layers", "no_such_layer", "bad_layers"])
def test_a_bad_from_teacher_is_one_line_before_any_data_work(cut, said, hf_family, stdlib_corpus, tmp_path):
    """Checked against the teacher's config before the corpus is tokenised (and, in `distill
    run`, before the teacher's whole pass), not when the student is built after them."""
    from tests.conftest import run_cli

    cfg = {"out_dir": str(tmp_path / "run"), "data": {"paths": [str(stdlib_corpus)], "seq_len": 32},
           "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])}, "cache": {"k": 8},
           "students": [{"name": "s", "model": {"from_teacher": cut}}],
           "train": {"mode": "online", "steps": 1, "batch_size": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("train", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(said), r.stderr
    assert not list((tmp_path / "run").glob("data/blocks-*")), "refused only after data preparation"
