"""Aux-loss-free expert bias: part of the training state (exact resume), the same on every
rank (counts all-reduced), and never silently dropped at export."""
import shutil

import torch
import torch.distributed as dist

from distill.config import StudentConfig
from distill.layout import RunLayout
from distill.train import checkpoint
from distill.train.engines import TorchEngine
from distill.train.loop import train_loop
from distill.train.student import Student, make_optimizer
from students.build import build_model
from students.presets import scout
from students.sparse_moe import expert_biases, moe_modules, update_expert_bias
from tests.test_trainer import CountingTeacher, T, V, loop_cfg
from tests.conftest import spawn

RATE = 0.05


def tiny_scout():
    return build_model(scout(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                             intermediate_size=32, num_experts=4, attention_chunk_size=8), seed=0)


def scout_student(rate=RATE):
    sc = StudentConfig(name="moe", model={"preset": "scout"}, optim={"lr": 1e-2, "warmup_steps": 0},
                       loss={"bias_update_rate": rate})
    model = tiny_scout()
    opt, sched = make_optimizer(model, sc.optim, 10)
    return Student(sc, TorchEngine(model, opt, sched, sc.optim, torch.device("cpu"), "fp32"), 10)


def test_resume_with_expert_bias_is_exact(tmp_path):
    blocks = torch.randint(0, V, (16, T + 1), generator=torch.Generator().manual_seed(0))
    loop = loop_cfg(steps=4, checkpoint_every=2, keep_last=5)
    full = scout_student()
    train_loop([full], CountingTeacher(), blocks, blocks[:2], None, loop, RunLayout(tmp_path / "a"),
               resume=False, progress=False)
    assert any(b.abs().sum() > 0 for b in expert_biases(full.model))  # the bias moved
    # The same run, killed after step 2 and resumed by a fresh process-like student.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "students" / "moe" / "checkpoints" / "step_00000004")
    resumed = scout_student()
    result = train_loop([resumed], CountingTeacher(), blocks, blocks[:2], None, loop, RunLayout(tmp_path / "b"),
                        resume=True, progress=False)
    assert result["start_step"] == 2
    for a, b in zip(expert_biases(full.model), expert_biases(resumed.model)):
        assert torch.equal(a, b)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def _rank_update(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_scout()
    for m in moe_modules(model):  # each rank saw different tokens: rank 0 all on expert 0, rank 1 on 1, 2
        m.counts_since_update.copy_(torch.tensor([8, 0, 0, 0]) if rank == 0 else torch.tensor([0, 5, 3, 0]))
    update_expert_bias(model, RATE)
    torch.save(expert_biases(model), f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_expert_bias_update_uses_counts_from_every_rank(tmp_path):
    spawn(_rank_update, (2, str(tmp_path / "init"), str(tmp_path / "bias")))
    per_rank = [torch.load(tmp_path / f"bias.{r}") for r in range(2)]
    global_load = torch.tensor([8.0, 5.0, 3.0, 0.0])  # summed over ranks: mean 4
    expected = RATE * torch.sign(global_load.mean() - global_load)
    for biases in per_rank:
        for b in biases:
            assert torch.equal(b, expected)  # the same on both ranks, from the global load


def test_export_reports_routing_without_the_bias(tmp_path, capfd):
    """The exported (stock) model has no expert bias: the share of held-out tokens whose
    experts change is measured, printed and written into the model card."""
    from distill.report.export import export_checkpoint

    student = scout_student()
    biases = [torch.tensor([3.0, -3.0, 0.0, 0.0]), torch.zeros(4)]  # layer 0: expert 0 favoured
    checkpoint.save(tmp_path / "ckpt", 5, student.model, {**student.state(), "expert_bias": biases},
                    {"student": "moe", "run_hash": "h"})
    held_out = torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(1))
    from tests.hf_models import make_tokenizer

    make_tokenizer(["def f(x): return x"], tmp_path / "tok", vocab_size=V)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export", held_out=held_out, tokenizer_dir=tmp_path / "tok")
    err = capfd.readouterr().err
    card = (out / "README.md").read_text()
    assert "held-out tokens route to another expert" in err and "of 32 held-out tokens" in err
    assert "tokens changing expert without it" in card
    import json

    note = json.loads((out / "distill_meta.json").read_text())["routing_without_bias"]
    assert 0 < note["tokens_changing_expert"] <= 1 and note["per_layer"][1] == 0  # layer 1 had no bias
    # No bias at all: nothing to report, nothing printed.
    checkpoint.save(tmp_path / "plain", 5, student.model, student.state(), {"student": "moe"})
    export_checkpoint(tmp_path / "plain", tmp_path / "export2", held_out=held_out, tokenizer_dir=tmp_path / "tok")
    assert "expert bias" not in capfd.readouterr().err


def test_a_skipped_step_leaves_no_routing_counts_and_counts_resume_exactly():
    """A non-finite (skipped) step routed tokens but must leave no trace: the next update's
    expert bias equals that of a run where the skipped step never happened.  The counts since
    the last update are training state: a fresh student loaded from `state()` has them."""
    from losses.signal import TeacherSignal
    from distill.train.student import MicroBatch
    from teachers import Batch

    blocks = torch.randint(0, V, (6, T + 1), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(6, T, V, generator=torch.Generator().manual_seed(1))

    def batch(rows, poison=False):
        sig = TeacherSignal.from_logits(logits[rows], 8)
        if poison:
            sig.topk_logprobs[:] = float("nan")
        return [MicroBatch(Batch.of(blocks[rows], rows), sig, torch.ones(len(rows), T, dtype=torch.bool))]

    with_skip, without = scout_student(), scout_student()
    with_skip.train_step(0, batch([0, 1]))
    assert with_skip.train_step(1, batch([2, 3], poison=True)).get("skipped")
    assert all(int(m.counts_since_update.sum()) == 0 for m in moe_modules(with_skip.model))
    with_skip.train_step(2, batch([4, 5]))
    without.train_step(0, batch([0, 1]))
    without.train_step(1, batch([4, 5]))
    for a, b in zip(expert_biases(with_skip.model), expert_biases(without.model)):
        assert torch.equal(a, b)

    counting = scout_student(rate=0.0)  # no updates: the counts keep growing
    counting.train_step(0, batch([0, 1]))
    fresh = scout_student(rate=0.0)
    fresh.load_state(counting.state())
    for a, b in zip(moe_modules(counting.model), moe_modules(fresh.model)):
        assert int(a.counts_since_update.sum()) > 0 and torch.equal(a.counts_since_update, b.counts_since_update)


def test_a_chat_run_with_the_expert_bias_exports_what_stock_code_and_vllm_load(tmp_path):
    """The user's path: `distill run` on chat rows (data.packing: documents, the default, so the
    held-out blocks hold masked ids), a Maverick-style student with the expert bias and a tied
    dense one, under a base tokenizer whose EOS is not the template's end of turn.  Before: the
    export's routing measurement read the masked ids as ids (IndexError, exit 1); Maverick's
    config said MoE every layer to vLLM (interleave_moe_layer_step 1 beside moe_layers [1]);
    export.max_shard_size was ignored (export.dtype is checked too); the exports' generation configs stopped at EOS only."""
    import json

    import yaml
    from transformers import AutoConfig, AutoTokenizer

    from safetensors import safe_open

    from distill.blocks import open_blocks
    from tests.conftest import run_cli
    from tests.hf_models import chat_rows, make_tokenizer, save_model, write_jsonl

    make_tokenizer([json.dumps(r) for r in chat_rows()], tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    tok.eos_token = "<|endoftext|>"  # a base model's: chat turns end with <|im_end|>
    teacher = save_model("llama", len(tok), tmp_path / "teacher", tok, seed=1, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    small = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    cfg = {"out_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"paths": [str(write_jsonl(chat_rows(), tmp_path / "chat.jsonl"))], "seq_len": 96,
                    "val_fraction": 0.2},
           "teacher": {"source": "checkpoint", "path": str(teacher)}, "cache": {"k": 8},
           "students": [{"name": "mav", "model": {"preset": "maverick", "args": {
                             **small, "intermediate_size": 32, "intermediate_size_mlp": 64, "num_experts": 4,
                             "attention_chunk_size": 32}}, "loss": {"bias_update_rate": 0.05}},
                        {"name": "dense", "model": {"preset": "dense", "args": small}}],
           "train": {"mode": "online", "steps": 3, "batch_size": 4, "eval_every": 0, "eval_blocks": 4,
                     "checkpoint_every": 0},
           "export": {"max_shard_size": "40KB", "dtype": "bf16"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "-c", str(tmp_path / "run.yaml"), "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[export] mav: the trained expert bias is dropped" in r.stderr and "held-out tokens route" in r.stderr
    val = open_blocks(next((tmp_path / "run" / "data").glob("blocks-*")))["val"][:4]
    assert bool((val < 0).any()), "no masked id among the held-out blocks: the test shows nothing"
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    for name in ("mav", "dense"):
        out = tmp_path / "run" / "students" / name / "export"
        assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [eos, end]
        with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # export.dtype
    config = AutoConfig.from_pretrained(str(tmp_path / "run" / "students" / "mav" / "export"))
    step = config.interleave_moe_layer_step  # vLLM's rule: layer i is MoE when step > 0 and (i + 1) % step == 0
    assert [i for i in range(config.num_hidden_layers) if step > 0 and (i + 1) % step == 0] == config.moe_layers == [1]
    # the standalone export reads the run's held-out blocks itself
    r = run_cli("export", str(tmp_path / "run" / "students" / "mav"), "--out", str(tmp_path / "again"),
                "--max-shard-size", "5000KB")
    assert r.returncode == 0 and "held-out tokens route" in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "again" / "model.safetensors").exists()  # one file under 5 MB
    r = run_cli("export", str(tmp_path / "run" / "students" / "mav"), "--out", str(tmp_path / "bad"),
                "--max-shard-size", "lots")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --max-shard-size: 'lots' is not a size: write a whole number and a unit, e.g. 5GB, 500MB or 2GiB")
