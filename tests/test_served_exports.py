"""Exports served by a real vLLM server (its CPU build; tests/vllm_server.py): what a user
without the training machines does with a student.  One server serves a Maverick-style
student (MoE every other layer: the config field vLLM reads, interleave_moe_layer_step, must
agree with transformers' moe_layers) exported by `distill export`; its greedy tokens and
log-probs must be the stock transformers model's."""
from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from tests import vllm_server
from tests.conftest import run_cli
from tests.hf_models import chat_rows, make_tokenizer

pytestmark = pytest.mark.server


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def test_a_maverick_student_export_serves_as_transformers_runs_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.train import checkpoint
    from students.build import build_model
    from students.presets import maverick

    tok = make_tokenizer([json.dumps(r) for r in chat_rows()], tmp_path / "tok")
    # head_dim 32 and a 128-token attention chunk: sizes vLLM's CPU attention serves
    model = build_model(maverick(vocab_size=len(tok), hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1,
                                 head_dim=32, intermediate_size=64, intermediate_size_mlp=128, num_experts=4,
                                 attention_chunk_size=128), seed=0)
    checkpoint.save(tmp_path / "ckpt", 1, model, {}, {"student": "mav", "run_hash": "h"})
    r = run_cli("export", str(tmp_path / "ckpt" / "step_00000001"), "--out", str(tmp_path / "export"),
                "--tokenizer", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["moe_layers"] == [1, 3] and config["interleave_moe_layer_step"] == 2
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = tok.encode(json.dumps(chat_rows()[0]), add_special_tokens=False)[:40]
    with vllm_server.running(tmp_path / "export", "mav", tmp_path / "vllm.log") as server:
        reply = _post(server.url + "/v1/completions", {
            "model": "mav", "prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 1, "prompt_logprobs": 1,
            "return_tokens_as_token_ids": True, "skip_special_tokens": False})
    choice = reply["choices"][0]
    new = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]  # "token_id:N"
    with torch.no_grad():
        want = stock.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              eos_token_id=None)[0, len(ids):].tolist()
        logprobs = torch.log_softmax(stock(torch.tensor([ids + new])).logits[0].float(), -1)  # (P + 8, V)
    assert new == want[:len(new)] and len(new) == 8
    served = [choice["prompt_logprobs"][p][str(ids[p])]["logprob"] for p in range(1, len(ids))]
    served += choice["logprobs"]["token_logprobs"]
    mine = [float(logprobs[p - 1, t]) for p, t in enumerate(ids + new) if p >= 1]
    assert max(abs(a - b) for a, b in zip(served, mine)) < 1e-4
