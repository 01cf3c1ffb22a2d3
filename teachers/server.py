"""A teacher served by vLLM: the `Teacher` protocol over its OpenAI-compatible server.

For a teacher larger than the training machines.  Tokens go to the server as ids, never as
text: one block of T + 1 ids is one `POST /v1/completions` with `prompt` = the ids,
`prompt_logprobs: k` and `max_tokens: 1`.  The server answers, for every prompt position
p >= 1, the top-k {id: {logprob, rank}} of the token at p given the tokens before it, plus
the actual token at p with its log-prob.  Position p is our signal at t = p - 1 (the block's
input ids are positions 0..T-1, its last label is position T), so:

  top-k ids / log-probs  the signal (the same TeacherSignal as an in-process top-k teacher:
                         same codecs, estimators, tail handling downstream)
  nll                    -log p(actual token), exact (vLLM gives it even outside the top-k)
  top1                   p of the rank-1 token, exact
  entropy                over the top-k with the tail (1 - their mass) as ONE outcome: a
                         lower bound of the full entropy (the cache's identity says so)

Packed rows (data.packing: documents, position ids restarting at 0 where a row starts): each
row of a block is its own request, the row's ids and the token after it, so the server sees
every row alone, as an in-process teacher given the position ids does; the rows' answers are
put back side by side into the block's (T, k).

Log-probs are at temperature 1: every request asks for temperature 1 with no top-k/top-p
or penalties, so the server's raw and processed log-probs are the same numbers, and
students apply their own temperature to them as to any teacher's.  A server that answers
logits instead (`--logprobs-mode raw_logits`) is refused by the handshake.

Before any work `handshake` checks: the server is up (/health); it serves `model`
(/v1/models); its max context holds a block (seq_len + 1 prompt tokens and the 1 generated);
`k` is within its `--max-logprobs` (a probe request); its tokenizer is the run's (/tokenize
of probe strings against ours, then /detokenize of every id of the vocabulary in chunks: two
tokenizers that split text alike can still number two tokens the other way round, and every
signal over those ids would be read wrong).  Each failure is one line (a UserError: exit 2).

The served name says nothing of the weights behind it, so the probe's log-probs are kept as
the served model's fingerprint (`probe`): a resumed cache or run compares them with the ones it
began with (`probe_drift`), and refuses a server that now answers as another model would.
"""
from __future__ import annotations

import math
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from common.errors import UserError
from losses.signal import TeacherSignal, placeholder_invalid
from teachers.protocol import Batch, TeacherUnavailable
from teachers.server_http import IncompleteReply, ServerClient, ServerRefused, TokenBudget

VOCAB_CHUNK = 4096  # ids per /detokenize request of the vocabulary check
PROBE_TOKENS = 64  # tokens of the probe whose log-probs fingerprint the served model (`probe_drift`)

# Strings whose tokenisation must agree between the server and the run: code, prose,
# whitespace runs, digits, non-ASCII and the tokenizer's own special tokens (added below).
PROBES = ("def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.", "  \t\n\n  x",
          "1234567890 3.14159", "naïve café — 東京 🙂")
IDENTITY_NOTE = "raw log-probs at T=1 from a vLLM server; entropy over top-k + tail as one outcome"


class ServerTeacher:
    """A `Teacher` (teachers/protocol.py) whose forward runs on a vLLM server."""

    def __init__(self, url: str, model: str, k: int, vocab_size: int, timeout_s: float = 120.0,
                 max_retries: int = 5, max_inflight_tokens: int = 65_536, backoff_s: float = 0.5):
        self.client = ServerClient(url, timeout_s, max_retries, backoff_s=backoff_s)
        self.served_model = model
        self.k, self.vocab_size = k, vocab_size
        self.budget = TokenBudget(max_inflight_tokens)
        # Threads only wait on sockets; the budget, not the pool, bounds the server's load.
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="teacher-server")
        self.model = None  # no weights here: students cannot be initialised from this teacher
        self.forward_calls = 0  # batches scored (each is one request per block)
        self.reads = 0
        self._ahead: dict[tuple, tuple[torch.Tensor, Future]] = {}  # prefetched batches: indices -> (ids, work)
        self.probe: dict | None = None  # {"ids", "nll"}: the handshake's probe and the served model's answer
        self.padded_positions = 0  # positions whose top-k held a padded id (parse_prompt_logprobs)
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------ the protocol

    def topk(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None):
        """(B, T) -> top-k (values (B, T, k) fp32 log-probs, ids (B, T, k)), most likely first,
        as LiveTeacher.topk; targets (B, T) plain next-token ids: also their difficulty
        (B, T, 3); position_ids (B, T): packed rows, each scored alone (module docstring).
        One request per block (per row), all in flight at once within the token budget."""
        self.forward_calls += 1
        vals, ids, stats = self._score(input_ids, targets, position_ids).result()
        return (vals, ids) if targets is None else (vals, ids, stats)

    def signal(self, batch: Batch) -> tuple[TeacherSignal, torch.Tensor]:
        """(TeacherSignal (B, T, k), valid (B, T)), as LiveTeacher.signal's top-k path."""
        key = tuple(batch.indices)
        ahead = self._ahead.get(key)
        if ahead is not None and torch.equal(ahead[0], batch.input_ids):  # (on-policy batches reuse indices)
            work = self._ahead.pop(key)[1]
        else:
            work = self._score(batch.input_ids, batch.labels.clamp(min=0), batch.position_ids)
        self.forward_calls += 1
        vals, ids, stats = work.result()
        vals, ids, valid = placeholder_invalid(vals, ids, self.vocab_size)
        return TeacherSignal(ids, vals, difficulty=stats), valid

    def prefetch(self, batches: Sequence[Batch]) -> None:
        """Send these batches' requests now: the server works while the students step."""
        for b in batches:
            key = tuple(b.indices)
            if key not in self._ahead:
                self._ahead[key] = (b.input_ids.clone(), self._score(b.input_ids, b.labels.clamp(min=0), b.position_ids))
        while len(self._ahead) > 4 * max(1, len(batches)):  # never-asked-for work is dropped, oldest first
            self._ahead.pop(next(iter(self._ahead)))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests

    def _score(self, input_ids: torch.Tensor, targets: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> Future:
        """A future of (values (B, T, k), ids (B, T, k), difficulty (B, T, 3)) for the blocks."""
        x = input_ids.to("cpu", torch.int64)
        # A request is a row's ids and the token after it (the block's next input, or for the last
        # row its last label); without labels any id will do there: it changes no top-k, only that
        # position's nll, which then is not asked for.
        last = targets[:, -1:].to("cpu", torch.int64) if targets is not None else torch.zeros_like(x[:, :1])
        full = torch.cat([x, last], dim=1).tolist()  # (B, T + 1)
        T = x.shape[1]
        prompts, rows_per_block = [], []
        for b in range(x.shape[0]):
            starts = [0] if position_ids is None else \
                [0] + [int(t) for t in torch.nonzero(position_ids[b, 1:] == 0).flatten() + 1]
            ends = starts[1:] + [T]
            prompts += [full[b][a:e + 1] for a, e in zip(starts, ends)]  # row a..e-1 and the token after
            rows_per_block.append(len(starts))
        done: Future = Future()
        if not prompts:
            k = self.k
            done.set_result((torch.empty(0, T, k), torch.empty(0, T, k, dtype=torch.int64), torch.empty(0, T, 3)))
            return done
        rows = [self.pool.submit(self._row, p) for p in prompts]

        def assemble() -> tuple[torch.Tensor, ...]:
            results, out, i = [r.result() for r in rows], [], 0
            for n in rows_per_block:  # a block's rows side by side: (T, k), (T, k), (T, 3)
                out.append(tuple(torch.cat(part) for part in zip(*results[i:i + n])))
                i += n
            return tuple(torch.stack(t) for t in zip(*out))

        lock = threading.Lock()  # rows finish on pool threads: one of them settles `done`

        def gather(row: Future):
            with lock:
                if done.done() or row.cancelled():
                    return
                if row.exception() is not None:  # the first failure is the batch's; rows not yet sent never are
                    for r in rows:
                        r.cancel()
                    done.set_exception(row.exception())
                elif all(r.done() for r in rows):
                    done.set_result(assemble())

        for r in rows:
            r.add_done_callback(gather)
        return done

    def _row(self, prompt: list[int]):
        """One request (a block, or a packed row, and the token after it) -> (values (T, k), ids
        (T, k), difficulty (T, 3)), T = len(prompt) - 1."""
        n = len(prompt)
        self.budget.acquire(n)
        try:
            return self.client.request("/v1/completions", self._body(prompt), read=self._reader(prompt))
        except ServerRefused as e:  # a 4xx mid-run: the server changed under us; never retried
            raise TeacherUnavailable(f"teacher server refused a request: {e}") from None
        finally:
            self.budget.release(n)

    def _reader(self, prompt: list[int]):
        def read(reply: dict):
            padded: list[int] = []
            out = parse_prompt_logprobs(reply, prompt, self.k, self.vocab_size, padded)
            if padded[0]:
                self._padded_positions(padded[0])
            return out
        return read

    def _padded_positions(self, n: int) -> None:
        """Positions left without a soft target because the server ranked a padded id in their
        top-k; said once (the first time), counted always (`padded_positions`)."""
        with self._count_lock:
            first = self.padded_positions == 0
            self.padded_positions += n
        if first:
            print(f"[teacher] the served model ranks token ids past the tokenizer's {self.vocab_size} (its vocab is "
                  f"padded past it) in the top-{self.k} of some positions: those positions get no soft target "
                  f"(counted as the teacher's non-finite tokens); a trained model rarely does this, a random "
                  f"one often", file=sys.stderr, flush=True)

    def _body(self, prompt: list[int]) -> dict:
        # temperature 1 and no sampling processors: raw and processed log-probs coincide.  No `seed`:
        # the one generated token is thrown away, and a seeded request crashed vLLM 0.32's CPU
        # engine ("CPU Generator does not use offset") in bench/server.py.
        return {"model": self.served_model, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": self.k,
                "temperature": 1.0, "top_p": 1.0, "top_k": -1}

    # ------------------------------------------------------------------ handshake

    def handshake(self, tokenizer, tokenizer_dir, seq_len: int) -> dict:
        """Check the server before any work (see the module docstring); the server's facts."""
        url = self.client.url
        try:
            self.client.request("/health", retries=min(2, self.client.max_retries))
        except (TeacherUnavailable, ServerRefused) as e:
            raise UserError(f"teacher.server.url: no vLLM server answers at {url} ({_last(e)}); start it "
                            f"(python -m vllm.entrypoints.openai.api_server --model DIR ...) or fix the url") from None
        models = self.client.request("/v1/models").get("data", [])
        served = {m.get("id"): m for m in models}
        if self.served_model not in served:
            raise UserError(f"teacher.server.model: {url} does not serve {self.served_model!r}; it serves "
                            f"{sorted(served)}; set teacher.server.model to one of them")
        max_len = served[self.served_model].get("max_model_len")
        if max_len is not None and max_len < seq_len + 2:
            raise UserError(f"teacher.server: {url} serves {self.served_model!r} with a max context of {max_len} "
                            f"tokens, but a block needs {seq_len + 2} (data.seq_len {seq_len} + 1 prompt tokens "
                            f"and 1 generated); restart it with --max-model-len {seq_len + 2} or lower data.seq_len")
        self._check_tokenizer(tokenizer, tokenizer_dir)
        # The probe: the served model's own fingerprint (`self.probe`), its values the checks below.
        probe = (tokenizer.encode("\n".join(PROBES), add_special_tokens=False) + [0, 0])[:min(PROBE_TOKENS, seq_len + 1)]
        try:
            vals, _, stats = self.client.request(  # padded ids here are said by the run, not by its checks
                "/v1/completions", self._body(probe), read=lambda r: parse_prompt_logprobs(r, probe, self.k, self.vocab_size))
        except ServerRefused as e:
            raise UserError(f"cache.k: the server refused {self.k} prompt log-probs per position ({e}); restart it "
                            f"with --max-logprobs {self.k} (or more), or lower cache.k") from None
        mass = torch.logsumexp(vals.double(), dim=-1)  # (T,) log of the top-k's probability
        if bool((vals > 1e-4).any()) or bool((mass > 1e-3).any()):
            raise UserError(f"teacher.server: {url} answers values that are not log-probabilities (top-{self.k} "
                            f"mass up to {math.exp(float(mass.max())):.3g}); it runs with --logprobs-mode "
                            f"*_logits: restart it with the default (raw_logprobs)")
        self.probe = {"ids": probe, "nll": [round(float(x), 5) for x in stats[:, 0]]}
        return {"url": url, "model": self.served_model, "max_model_len": max_len, "root": served[self.served_model].get("root")}

    def check_unchanged(self, then: dict | None, tolerance: float, what: str, fix: str) -> None:
        """Refuse a server that answers the probe otherwise than `then`, the probe `what` (a cache,
        a run's checkpoints) began with; fix: the way out besides serving those weights."""
        check_probe(then, self.probe, tolerance, f"{self.served_model!r} at {self.client.url} answers",
                    what, f"serve the weights it began with, or {fix}")

    def _check_tokenizer(self, tokenizer, tokenizer_dir) -> None:
        specials = [t for t in getattr(tokenizer, "all_special_tokens", [])][:4]
        for text in (*PROBES, " ".join(specials)):
            ours = tokenizer.encode(text, add_special_tokens=False)
            try:
                theirs = self.client.request("/tokenize", {"model": self.served_model, "prompt": text,
                                                           "add_special_tokens": False}).get("tokens")
            except ServerRefused as e:
                raise UserError(f"teacher.server: {self.client.url} refused /tokenize ({e}); a vLLM server with "
                                f"its tokenizer loaded is needed to check it is the run's") from None
            if theirs != ours:
                raise UserError(f"teacher.server: the served tokenizer ({self.served_model} at {self.client.url}) "
                                f"is not the run's ({tokenizer_dir}): {text!r} is {_short(theirs)} on the server, "
                                f"{_short(ours)} here; set data.tokenizer.path to the served model's tokenizer")
        self._check_vocabulary(tokenizer, tokenizer_dir)

    def _check_vocabulary(self, tokenizer, tokenizer_dir) -> None:
        """Every id but the added (special) tokens, VOCAB_CHUNK at a time, must read as the same
        text on the server as here; a chunk that differs is halved down to one id to name it.
        Text equal but for whitespace passes (a tokenizer_config's clean-up of spaces differs
        between copies; the ids do not)."""
        added = set(tokenizer.get_added_vocab().values()) if hasattr(tokenizer, "get_added_vocab") else set()
        ids = [i for i in range(len(tokenizer)) if i not in added]

        def differ(chunk: list[int]) -> tuple[str, str] | None:
            theirs = self.client.request("/detokenize", {"model": self.served_model, "tokens": chunk}).get("prompt")
            ours = tokenizer.decode(chunk)
            if theirs == ours or (isinstance(theirs, str) and theirs.split() == ours.split()):
                return None
            return theirs, ours

        for start in range(0, len(ids), VOCAB_CHUNK):
            chunk = ids[start:start + VOCAB_CHUNK]
            try:
                found = differ(chunk)
            except ServerRefused as e:
                raise UserError(f"teacher.server: {self.client.url} refused /detokenize ({e}); a vLLM server with "
                                f"its tokenizer loaded is needed to check it is the run's") from None
            if found is None:
                continue
            while len(chunk) > 1:  # the half that still differs; both halves equal: the pair is named
                half = len(chunk) // 2
                left, right = differ(chunk[:half]), differ(chunk[half:])
                if left is None and right is None:
                    break
                chunk, found = (chunk[:half], left) if left is not None else (chunk[half:], right)
            which = f"token id {chunk[0]}" if len(chunk) == 1 else f"token ids {chunk[0]}-{chunk[-1]}"
            raise UserError(f"teacher.server: the served tokenizer ({self.served_model} at {self.client.url}) "
                            f"numbers its tokens otherwise than the run's ({tokenizer_dir}): {which} is "
                            f"{found[0][:40]!r} on the server, {found[1][:40]!r} here; set data.tokenizer.path to "
                            f"the served model's tokenizer")


def probe_drift(then: dict, now: dict) -> float | None:
    """Mean |change| of the served model's -log p(token) over the probe's positions, between
    two handshakes' `probe`s; None where they probed other ids (another tokenizer or tool
    version: nothing to compare).  The same weights served again on the CPU test server moved it
    by 0; another model served under the same name by 5.4 nats (tests/test_server_teacher.py)."""
    if then.get("ids") != now.get("ids"):
        return None
    pairs = [(a, b) for a, b in zip(then["nll"], now["nll"]) if math.isfinite(a) and math.isfinite(b)]
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else None


def check_probe(then: dict | None, now: dict | None, tolerance: float, who: str, what: str, fix: str) -> None:
    """UserError when two probes of a served model differ by more than `tolerance` nats
    (probe_drift): `who` (answers now) is not the model `what` began with."""
    drift = probe_drift(then, now) if then and now else None
    if drift is not None and drift > tolerance:
        raise UserError(f"teacher.server: {who} as another model than the one {what} began with: the log-probs of "
                        f"the probe tokens moved by {drift:.3g} nats on average (teacher.server.drift_tolerance: "
                        f"{tolerance:g}); {fix}")


def parse_prompt_logprobs(reply: dict, prompt: list[int], k: int, vocab_size: int, padded: list | None = None):
    """A /v1/completions reply with prompt_logprobs -> (values (T, k) fp32, ids (T, k) int64,
    difficulty (T, 3) fp32) for the T = len(prompt) - 1 positions after the first.

    A position whose top-k ranks an id past the tokenizer's `vocab_size` (a model whose vocab
    is padded past its tokenizer, Llama 4's and Qwen's; the server cannot cut those rows, as an
    in-process teacher does) is left invalid (NaN: no soft target there), and counted into
    `padded` (a list: the count of this reply is appended)."""
    try:
        per_pos = reply["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise IncompleteReply(f"no prompt_logprobs: {str(reply)[:200]}") from None
    got = len(per_pos or ())
    if got != len(prompt):  # a request vLLM aborted (it is stopping) comes back cut short
        raise IncompleteReply(f"log-probs for {got} positions of a {len(prompt)}-token prompt")
    t, past = len(prompt) - 1, 0
    vals = torch.full((t, k), float("nan"))
    ids = torch.zeros((t, k), dtype=torch.int64)
    actual = torch.full((t,), float("nan"), dtype=torch.float64)
    for p in range(1, len(prompt)):
        entries = per_pos[p] or {}
        ranked = sorted(((int(tid), e) for tid, e in entries.items() if e.get("rank") is not None and e["rank"] <= k),
                        key=lambda item: item[1]["rank"])[:k]
        if len(ranked) < k:  # a position the server could not score fully: flagged invalid below (NaN)
            continue
        if max(i for i, _ in ranked) >= vocab_size:  # a padded id: invalid too (docstring)
            past += 1
            continue
        ids[p - 1] = torch.tensor([i for i, _ in ranked])
        vals[p - 1] = torch.tensor([float(e["logprob"]) for _, e in ranked])
        mine = entries.get(str(prompt[p]))
        if mine is not None:
            actual[p - 1] = float(mine["logprob"])
    if padded is not None:
        padded.append(past)
    return vals, ids, difficulty_from_topk(vals, actual)


def difficulty_from_topk(vals: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """vals (T, k) log-probs of the top-k, actual (T,) log-prob of the true next token ->
    (T, 3) fp32 [nll, entropy, top1] (losses/difficulty.py's columns).  Entropy counts the
    tail (1 - top-k mass) as one outcome: -sum p_i log p_i - tail log tail, a lower bound."""
    p = vals.double().exp()  # (T, k)
    tail = (1.0 - p.sum(-1)).clamp(min=0.0)  # (T,)
    entropy = -(p * vals.double()).sum(-1) - torch.xlogy(tail, tail)
    return torch.stack([-actual.double(), entropy, p[:, 0]], dim=-1).float()  # columns: STATS


def _last(e: Exception) -> str:
    return str(e).split("last: ")[-1].split(";")[0]


def _short(ids) -> str:
    ids = list(ids or [])
    return str(ids) if len(ids) <= 12 else f"{ids[:12]}... ({len(ids)} ids)"
