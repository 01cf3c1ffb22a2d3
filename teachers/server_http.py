"""Talking to a vLLM server (its OpenAI-compatible HTTP API) with the standard library.

`ServerClient.request` retries what can pass (connection errors, timeouts, 5xx, a reply cut
short) with exponential backoff and full jitter, and never a 4xx (the request itself is
wrong: repeating it cannot help).  `TokenBudget` bounds the prompt tokens in requests sent and not yet answered, so
many concurrent requests never ask the server to hold more than `max_inflight_tokens`.
`handshake` checks, before any work, everything a run relies on (server.py says what).
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

from common.errors import UserError
from teachers.protocol import TeacherUnavailable


class ServerRefused(UserError):
    """The server answered a request with a 4xx: the request (or the server's setup) is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class IncompleteReply(ValueError):
    """A 200 reply without all it should hold: a request the server aborted (it was stopping)."""


_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


class ServerClient:
    def __init__(self, url: str, timeout_s: float, max_retries: int, backoff_s: float = 0.5, backoff_max_s: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._jitter = random.Random()  # jitter only spaces retries out: it never touches the signal

    def _once(self, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            text = resp.read()
        return json.loads(text) if text.strip() else {}

    def request(self, path: str, body: dict | None = None, retries: int | None = None, read=None):
        """The JSON answer of GET (body None) or POST `path`, passed through `read` when given (it
        raises IncompleteReply on a reply cut short, which is retried like a dropped connection).
        Raises ServerRefused on a 4xx, TeacherUnavailable once `retries` (default max_retries)
        retries have failed."""
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                reply = self._once(path, body)
                return reply if read is None else read(reply)
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code < 500:
                    raise ServerRefused(e.code, f"{self.url}{path} answered {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except _TRANSIENT as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except IncompleteReply as e:
                last = f"incomplete reply ({e})"
            except ValueError as e:  # a reply that is not JSON (a proxy's error page, a cut connection)
                last = f"unreadable reply ({e})"
            if attempt < retries:
                cap = min(self.backoff_max_s, self.backoff_s * 2 ** attempt)
                time.sleep(self._jitter.uniform(0.5 * cap, cap))  # jitter: retries of many requests spread out
        raise TeacherUnavailable(f"teacher server {self.url}{path} failed {retries + 1} time(s), last: {last}; "
                                 f"check the server (its log), then run the same command again (`distill train` "
                                 f"with --resume): finished work is kept")


def _error_text(e: urllib.error.HTTPError) -> str:
    """The server's own message of an error reply (vLLM: {"error": {"message": ...}} or {"message": ...})."""
    try:
        body = json.loads(e.read() or b"{}")
    except (ValueError, OSError):
        return str(e.reason)
    err = body.get("error", body) if isinstance(body, dict) else body
    msg = err.get("message", err) if isinstance(err, dict) else err
    return " ".join(str(msg).split())[:400]


class TokenBudget:
    """At most `limit` tokens held at once; one request larger than the limit runs alone."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.held == 0 or self.held + n <= self.limit)
            self.held += n

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()
