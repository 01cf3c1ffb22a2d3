"""The server teacher's parts that need no vLLM: retries (against a stdlib HTTP server that
fails on purpose), the in-flight token bound, reading vLLM's prompt_logprobs format, and the
config rules.  tests/test_server_teacher.py runs the whole against a real vLLM server."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from common.errors import UserError
from losses.difficulty import token_difficulty
from losses.signal import topk_logprobs
from teachers.protocol import TeacherUnavailable
from teachers.server import difficulty_from_topk, parse_prompt_logprobs
from teachers.server_http import ServerClient, ServerRefused, TokenBudget


@pytest.fixture
def flaky():
    """An HTTP server answering each request with the next status of `plan` (then 200), a 200
    with the next body of `bodies` (then {"ok": true})."""
    state = {"plan": [], "bodies": [], "calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["calls"] += 1
            status = state["plan"].pop(0) if state["plan"] else 200
            ok = state["bodies"].pop(0) if state["bodies"] else {"ok": True}
            body = json.dumps(ok if status == 200 else {"error": {"message": f"status {status}"}}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_5xx_is_retried_until_it_passes(flaky):
    state, url = flaky
    state["plan"] = [503, 500]
    assert ServerClient(url, 5, max_retries=2, backoff_s=0.01).request("/x", {}) == {"ok": True}
    assert state["calls"] == 3


def test_4xx_is_never_retried(flaky):
    state, url = flaky
    state["plan"] = [400]
    with pytest.raises(ServerRefused, match="status 400"):
        ServerClient(url, 5, max_retries=3, backoff_s=0.01).request("/x", {})
    assert state["calls"] == 1


def test_a_request_that_keeps_failing_names_the_server_and_the_error(flaky):
    state, url = flaky
    state["plan"] = [502] * 10
    with pytest.raises(TeacherUnavailable, match=r"failed 3 time\(s\), last: HTTP 502: status 502; check the server "
                                                 r"\(its log\), then run the same command again \(`distill train` with "
                                                 r"--resume\): finished work is kept"):
        ServerClient(url, 5, max_retries=2, backoff_s=0.01).request("/v1/completions", {})
    assert state["calls"] == 3


def test_connection_refused_is_retried_then_stops():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=f"127.0.0.1:{port}.*failed 2 time"):
        ServerClient(f"http://127.0.0.1:{port}", 5, max_retries=1, backoff_s=0.2).request("/health")
    assert time.monotonic() - start >= 0.1  # it backed off before the retry


def test_token_budget_bounds_tokens_in_flight():
    budget, lock, held, peak = TokenBudget(100), threading.Lock(), [0], [0]

    def work(n):
        budget.acquire(n)
        with lock:
            held[0] += n
            peak[0] = max(peak[0], held[0])
        time.sleep(0.01)
        with lock:
            held[0] -= n
        budget.release(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in [40, 30, 50, 20, 60, 10, 250] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert peak[0] == 250  # the oversized one ran, alone
    assert budget.held == 0


def _reply(logits: torch.Tensor, prompt: list[int], k: int) -> dict:
    """What vLLM's /v1/completions answers for `prompt` with prompt_logprobs=k, from logits
    (len(prompt), V): position p's entry holds the top-k of logits[p - 1] and the token at p."""
    logp = torch.log_softmax(logits.double(), -1).float()
    per_pos = [None]
    for p in range(1, len(prompt)):
        order = torch.argsort(logp[p - 1], descending=True)
        rank = {int(t): r + 1 for r, t in enumerate(order)}
        entry = {str(int(t)): {"logprob": float(logp[p - 1, t]), "rank": rank[int(t)], "decoded_token": "?"}
                 for t in order[:k]}
        entry[str(prompt[p])] = {"logprob": float(logp[p - 1, prompt[p]]), "rank": rank[prompt[p]], "decoded_token": "?"}
        per_pos.append(entry)
    return {"choices": [{"prompt_logprobs": per_pos}]}


def test_prompt_logprobs_become_the_in_process_top_k_and_difficulty():
    torch.manual_seed(0)
    vocab, k = 50, 8
    logits = torch.randn(12, vocab) * 3
    prompt = torch.randint(0, vocab, (13,)).tolist()
    vals, ids, stats = parse_prompt_logprobs(_reply(logits, prompt, k), prompt, k, vocab)
    want_vals, want_ids, want_stats = topk_logprobs(logits, k, torch.tensor(prompt[1:]))
    assert torch.equal(ids, want_ids)
    assert torch.allclose(vals, want_vals, atol=1e-6)
    assert torch.allclose(stats[:, 0], want_stats[:, 0], atol=1e-5)  # nll of the actual token, inside or outside the top-k
    assert torch.allclose(stats[:, 2], want_stats[:, 2], atol=1e-6)  # top1
    p = want_vals.double().exp()  # entropy: the top-k and the tail as one outcome, a lower bound
    tail = 1 - p.sum(-1)
    assert torch.allclose(stats[:, 1].double(), -(p * want_vals.double()).sum(-1) - torch.xlogy(tail, tail), atol=1e-5)
    assert bool((stats[:, 1] <= want_stats[:, 1] + 1e-5).all())


def test_entropy_with_the_whole_vocab_is_exact():
    torch.manual_seed(1)
    logits = torch.randn(5, 20)
    logp = torch.log_softmax(logits, -1)
    targets = torch.randint(0, 20, (5,))
    ranked = logp.sort(-1, descending=True).values  # the server's top-k comes most likely first
    got = difficulty_from_topk(ranked, logp.gather(-1, targets[:, None]).squeeze(-1).double())
    assert torch.allclose(got, token_difficulty(logits, targets), atol=1e-5)


def test_a_position_short_of_k_entries_is_invalid_not_wrong():
    prompt = [1, 2, 3]
    reply = _reply(torch.randn(3, 10), prompt, 4)
    reply["choices"][0]["prompt_logprobs"][2] = {}  # the server gave nothing for that position
    vals, _, _ = parse_prompt_logprobs(reply, prompt, 4, 10)
    assert torch.isnan(vals[1]).all() and torch.isfinite(vals[0]).all()


def test_a_position_whose_top_k_holds_a_padded_id_is_invalid_and_counted():
    """A model whose vocab is padded past its tokenizer (Llama 4's, Qwen's) served by vLLM:
    the server cannot cut the padded rows, so a position whose top-k ranks one gets no soft
    target (before: the whole run stopped at the first such position)."""
    torch.manual_seed(2)
    vocab, pad, k = 40, 4, 6
    logits = torch.randn(9, vocab + pad)
    logits[:, vocab:] = -50.0  # as a trained model's padded rows: never near the top ...
    logits[[2, 5], vocab + 1] = 50.0  # ... but at two positions here
    prompt = torch.randint(0, vocab, (10,)).tolist()
    padded: list[int] = []
    vals, ids, stats = parse_prompt_logprobs(_reply(logits, prompt, k), prompt, k, vocab, padded)
    assert padded == [2]
    assert torch.isnan(vals[[2, 5]]).all() and torch.isnan(stats[[2, 5]]).all()
    rest = [p for p in range(9) if p not in (2, 5)]
    assert torch.isfinite(vals[rest]).all() and bool((ids[rest] < vocab).all())


def test_a_reply_cut_short_is_asked_again_and_one_never_whole_fails_naming_the_server(flaky):
    """A vLLM server that is stopping answers the requests it aborts with a 200 whose
    prompt_logprobs stop early; that is the server going away, not the model's answer."""
    from teachers.server import ServerTeacher

    state, url = flaky
    torch.manual_seed(2)
    vocab, k = 30, 4
    logits, prompt = torch.randn(6, vocab), [3, 1, 4, 1, 5, 9, 2]
    whole = _reply(logits, prompt, k)
    cut = {"choices": [{"prompt_logprobs": whole["choices"][0]["prompt_logprobs"][:1]}]}
    server = ServerTeacher(url, "m", k, vocab, max_retries=2, backoff_s=0.01)
    state["bodies"] = [cut, whole]
    vals, ids, _ = server.topk(torch.tensor([prompt[:-1]]), torch.tensor([prompt[1:]]))
    assert state["calls"] == 2
    want_vals, want_ids, _ = topk_logprobs(logits, k, torch.tensor(prompt[1:]))
    assert torch.equal(ids[0], want_ids) and torch.allclose(vals[0], want_vals, atol=1e-6)

    state["calls"], state["bodies"] = 0, [cut] * 5
    with pytest.raises(TeacherUnavailable, match=rf"{url}/v1/completions failed 3 time\(s\), last: incomplete "
                                                 r"reply \(log-probs for 1 positions of a 7-token prompt\)"):
        server.topk(torch.tensor([prompt[:-1]]), torch.tensor([prompt[1:]]))
    assert state["calls"] == 3
    server.close()


def _raw(**teacher):
    return {"data": {"paths": ["x"], "tokenizer": {"path": "tok"}}, "teacher": teacher,
            "students": [{"name": "s", "model": {"preset": "dense"}}]}


def test_config_rules_of_a_server_teacher():
    from distill.config import check_config, parse_config

    server = {"url": "http://h:8000", "model": "m"}
    with pytest.raises(Exception, match="teacher.server"):
        parse_config(_raw(source="server"))
    with pytest.raises(Exception, match="sharding"):
        parse_config(_raw(source="server", server=server, sharding="zero3"))
    raw = _raw(source="server", server=server)
    raw["students"][0]["init"] = "teacher"
    with pytest.raises(UserError, match="teacher.source is 'server'"):
        check_config(parse_config(raw))


def test_packed_rows_go_to_the_server_one_by_one_and_come_back_as_the_in_process_signal():
    """data.packing: documents.  The in-process teacher scores a block's rows apart through the
    position ids (transformers' packed-sequence mask); a server cannot take them, so each row
    is its own request.  A server answering from the same model (here: vLLM's reply format,
    built from a stock Llama's logits of the request alone) gives the in-process signal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from teachers.live import LiveTeacher
    from teachers.server import ServerTeacher

    torch.manual_seed(0)
    vocab, k = 64, 8
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    blocks = torch.randint(0, vocab, (2, 13))
    x, targets = blocks[:, :-1], blocks[:, 1:]  # inputs and next tokens
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # rows 0-4 | 5-11; one row
    requests = []

    def answer(path, body, read):
        prompt = body["prompt"]
        requests.append(prompt)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0]
        return read(_reply(logits, prompt, body["prompt_logprobs"]))

    server = ServerTeacher("http://127.0.0.1:9", "m", k, vocab)
    server.client.request = answer
    vals, ids, stats = server.topk(x, targets, position_ids=position_ids)
    want_vals, want_ids, want_stats = LiveTeacher(model, k, vocab, torch.device("cpu")).topk(x, targets, position_ids)
    assert sorted(map(len, requests)) == [6, 8, 13]  # each row and the token after it
    assert torch.equal(ids, want_ids)
    assert torch.allclose(vals, want_vals, atol=1e-5)
    assert torch.allclose(stats[..., 0], want_stats[..., 0], atol=1e-4)  # nll
    whole, *_ = server.topk(x, targets)  # without position ids a block is one request, seeing across its rows
    assert not torch.allclose(whole[0, 5:], want_vals[0, 5:], atol=1e-3)
    server.close()


def test_the_probe_drift_is_the_mean_change_of_the_probe_tokens_nll():
    from teachers.server import check_probe, probe_drift

    then = {"ids": [5, 6, 7, 8], "nll": [1.0, 2.0, float("nan"), 4.0]}
    assert probe_drift(then, then) == 0.0
    assert probe_drift(then, {"ids": [5, 6, 7, 8], "nll": [1.3, 1.7, 9.0, 4.3]}) == pytest.approx(0.3)  # NaN left out
    assert probe_drift(then, {"ids": [5, 6, 7, 9], "nll": [1.0, 2.0, 3.0, 4.0]}) is None  # other probe: no comparison
    check_probe(then, {"ids": [5, 6, 7, 8], "nll": [1.1, 2.1, 3.0, 4.1]}, 0.2, "x answers", "the cache", "fix")
    with pytest.raises(UserError, match=r"x answers as another model than the one the cache began with: the log-probs "
                                        r"of the probe tokens moved by 0\.3 nats on average \(teacher\.server\."
                                        r"drift_tolerance: 0\.2\); fix"):
        check_probe(then, {"ids": [5, 6, 7, 8], "nll": [1.3, 1.7, 9.0, 4.3]}, 0.2, "x answers", "the cache", "fix")
    check_probe(None, then, 0.0, "x answers", "a cache made before probes", "fix")  # nothing recorded: taken
