"""Chat and instruction rows -> token ids with a training-target mask, packed whole.

Two row shapes are rendered, from jsonl / parquet / saved datasets:
  {"messages": [{"role": ..., "content": ..., ...}, ...], "tools": [...]?}  rendered with the
      tokenizer's own chat template; only what the assistant writes is a target
  {"prompt": str, "completion": str}  prompt + completion as plain text; the completion and
      an EOS token after it are targets, so the student learns to stop
and others as the first: ShareGPT's turns ({"conversations" or "conversation": [{"from",
"value"} or {"role", "content"}, ...]}); TRL's conversational prompt/completion ({"prompt":
[turns], "completion": [turns]}), the prompt's turns context only (CONTEXT: no targets in them,
as TRL trains on the completion alone); instruction tables (INSTRUCTION_SHAPES: Alpaca,
Dolly, OpenOrca) as a user turn and the assistant's answer.  A `system` / `system_prompt`
column gives a row with no system turn its first one.  Messages go to the template as given
(`tool_calls`, `reasoning_content`, `name`, ...), and a row's `tools` as `tools=`, but for
these (`_turns_as_messages`): roles other tools write for the two sides (`model`, `gpt`,
`human`: MESSAGE_ROLES) or in another case (`User`) are renamed; a tool call's arguments
given as a JSON string are parsed; in struct columns (parquet, saved datasets) null-valued
keys are dropped (`_without_nulls`); a content of text parts is joined into a string where
the template cannot read it (`_parts_joined`).  An assistant turn marked `"weight": 0`
(OpenAI's fine-tuning data) is context, not a target (`learnt_turns`).  A row a text model's
template cannot take (a turn that is no object or has no role, a content that is no text, an
image part) is a BadRow, named.  A token is a target when any of its characters is one.

Which characters the assistant wrote:
* A template with `{% generation %}` markers says so itself: transformers'
  `return_assistant_tokens_mask` is used as is.
* Otherwise each assistant turn i is found by diffing whole renderings, never by assuming
  that a conversation's start renders as the start of the whole (templates show reasoning on
  the final turn only, or fold the system prompt into the first or the last user turn):
  1. its payload (content, reasoning, tool calls, as rendered): render the conversation again
     with turn i's payload swapped for a sentinel string S; the two renderings agree before
     and after the payload, so F[a:z] is it (F the real rendering, a and z bounded by where S
     sits, so text shared by chance with S never counts);
  2. its start: the template's own text before the payload that the model writes (`<think>\n`,
     a space) belongs to the turn too: the turn starts where its prompt
     render(turns[:i], add_generation_prompt=True) ends, found as the longest tail of that
     prompt before `a` (the prompt itself may differ from F's start: a moved system prompt);
     at `a` when the tail found does not hold the whole generation prompt;
  3. its end marker: render turns[:i] + [S-turn]; what follows S there is how the template ends
     a final assistant turn (`<|im_end|>\n`, `</s>`), less the whitespace after its last
     non-blank character (`<|im_end|>`: the model stops at it and never writes the newline, and
     a template with generation markers leaves it out too; a marker that is all whitespace is
     kept whole); as much of it as F has after `z` is a target, so the model learns to stop.
  Turns are found in order, each after the last.  It assumes only that a template renders
  each message's fields in one place.  A row it cannot split (the template fails on it,
  drops or rewrites an assistant turn, or reorders turns) is refused, naming the row.

Rows are packed whole: a block holds as many complete rows as fit, the rest of it is
padding that is no target.  A row longer than a block is cut to the block (and
counted: the caller logs it), never continued in the next block with its prompt lost.
Targets are marked in the ids' sign (teachers.protocol: `untrained`).
"""
from __future__ import annotations

import bisect
import contextlib
import datetime
import json
import math
import re
import threading
from dataclasses import dataclass

from common.errors import UserError

PLAIN = ""  # the `chat` column of a plain-text document
# Bump when rows that rendered right render to other ids or targets (it is in the data fingerprint,
# so every run's chat data is prepared again and its checkpoints no longer resume).  Not bumped
# for fixes of rows that rendered wrong (2026-12-06: text parts written as Python reprs, parquet
# tool calls' null arguments, "model" turns with no target; turns past the block no longer looked
# for; later that day: roles in another case, JSON-string tool arguments, `weight: 0` turns, a
# system column read): data prepared before keeps them until OUT/data is prepared again.
CHAT_FORMAT = 3
# How table rows are read into chat rows (`as_documents`), recorded in prepared data's manifest
# (not its fingerprint: a bump there would prepare every table corpus again, plain text too, and
# refuse its caches and checkpoints); data prepared under another is reused, with a note.
CHAT_READER = 2  # 2026-12-06: system columns, instruction and TRL tables, weight-0 turns, ...
ROW = "_row"  # key of a row's origin ("FILE row N") in the `chat` JSON
BAD = "_bad"  # key of why a row cannot be read (a BadRow's line), found where the table was read
CONTEXT = "_context"  # key of how many of a row's first messages are context only: no targets in them
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it
PAYLOAD = ("content", "tool_calls", "reasoning_content", "reasoning", "thinking")  # what the assistant writes
SENTINEL = "Qz7codistillTurnSentinel9x"


# Instruction tables, read as a user turn (the instruction, then its input or context after a blank
# line) and the assistant's answer: (ask, more, answer).  A system column gives a system turn.
INSTRUCTION_SHAPES = (("instruction", "input", "output"),  # Alpaca
                      ("instruction", "context", "response"),  # Dolly
                      ("question", None, "response"))  # OpenOrca (system_prompt beside it)
SYSTEM_COLUMNS = ("system", "system_prompt")  # a row's system prompt beside its turns


def table_kind(columns: list[str], text_field: str) -> str | None:
    """"text", "messages", "prompt" (prompt/completion), "conversations" (turns of ShareGPT's
    {from, value} or of {role, content}, in `conversations` or `conversation`, read as messages),
    "instruction" (INSTRUCTION_SHAPES) or None when the table has none of them."""
    if text_field in columns:
        return "text"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt"
    if "conversations" in columns or "conversation" in columns:
        return "conversations"
    if instruction_shape(columns) is not None:
        return "instruction"
    return None


def instruction_shape(columns) -> tuple[str, str | None, str] | None:
    """The INSTRUCTION_SHAPES entry whose instruction and answer columns the table has, if any."""
    return next((shape for shape in INSTRUCTION_SHAPES if shape[0] in columns and shape[2] in columns), None)


# ShareGPT's speakers as chat-template roles (the names its variants use).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool"}


# Roles other tools write for the two sides, as chat templates know them (Gemma's templates turn
# "assistant" into "model" themselves): a `messages` row with "model" turns had no target found.
MESSAGE_ROLES = {"model": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "human": "user"}
KNOWN_ROLES = {"system", "user", "assistant", "tool", "developer", "ipython", "function"}  # as templates spell them


def _turns_as_messages(turns, name: str) -> list[dict]:
    """A row's turns -> chat-template messages: ShareGPT's {from, value} turns and {role, content}
    messages alike; a role in another case (`User`) or another tool's name for a side
    (MESSAGE_ROLES) as templates spell it; a tool call's arguments given as a JSON string
    (OpenAI's shape) as the object templates take.  A row a text model's template cannot take
    as it is (a turn that is no object or has no role, a content that is no text, an image
    part) is a BadRow, named (data.bad_rows: skip drops it)."""
    if not isinstance(turns, list):
        raise _row_problem(name, f"its turns are a {type(turns).__name__}, not a list")
    out = []
    for j, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            raise _row_problem(name, f"turn {j} is a {type(t).__name__}, not an object with a role and a content")
        if "from" in t and "role" not in t:  # ShareGPT
            speaker = t["from"]
            role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
            if role is None:
                raise _row_problem(name, f"a ShareGPT turn from {speaker!r}; known speakers are "
                                         f"{', '.join(sorted(SHAREGPT_ROLES))} (convert the others to `messages` rows)")
            t = {k: v for k, v in t.items() if k not in ("from", "value")} | {"role": role, "content": t.get("value")}
        role = t.get("role")
        if not isinstance(role, str) or not role.strip():
            raise _row_problem(name, f"turn {j} has no role")
        low = role.lower()
        role = MESSAGE_ROLES.get(low, low if low in KNOWN_ROLES else role)
        content = t.get("content")
        if isinstance(content, dict) or (isinstance(content, list)
                                         and not all(isinstance(part, dict) for part in content)):
            raise _row_problem(name, f"turn {j}'s content is a {type(content).__name__} ({str(content)[:40]}); "
                                     f"give a string, or a list of text parts")
        other = next((part.get("type") for part in content if part.get("type", "text") != "text"), None) \
            if isinstance(content, list) else None
        if other is not None:
            raise _row_problem(name, f"turn {j} holds a {other!r} part, which a text model cannot see")
        t = t | {"role": role}
        if isinstance(t.get("tool_calls"), list):
            t["tool_calls"] = [_arguments_parsed(call) for call in t["tool_calls"]]
        out.append(t)
    return out


def _arguments_parsed(call):
    """A tool call with its arguments as an object where they were given as a JSON string of one
    (OpenAI's shape): templates print arguments with `tojson`, so the string was escaped a second
    time, text the model never sees served (vLLM parses them before the template)."""
    if not isinstance(call, dict):
        return call
    holder = call.get("function") if isinstance(call.get("function"), dict) else call
    args = holder.get("arguments")
    if not isinstance(args, str):
        return call
    try:
        parsed = json.loads(args)
    except ValueError:
        return call
    if not isinstance(parsed, dict):
        return call
    if holder is call:
        return call | {"arguments": parsed}
    return call | {"function": holder | {"arguments": parsed}}


def _instruction_messages(row: dict, shape: tuple[str, str | None, str], name: str) -> list[dict]:
    """An instruction row (INSTRUCTION_SHAPES) -> [user, assistant] messages."""
    ask, more, answer = shape
    parts = [row.get(ask), row.get(more) if more else None]
    user = "\n\n".join(part for part in parts if isinstance(part, str) and part.strip())
    if not user:
        raise _row_problem(name, f"its {ask!r}{f' and {more!r}' if more else ''} hold no text")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row.get(answer)}]


def learnt_turns(messages: list[dict], context: int = 0) -> list[int]:
    """The indices of the messages the student learns to write: the assistant turns from message
    `context` on (CONTEXT: the ones before are the prompt) not marked `weight: 0` (OpenAI's
    fine-tuning data and others mark the turns not to train on so)."""
    return [i for i, m in enumerate(messages) if i >= context and m.get("role") == "assistant"
            and m.get("weight", 1) not in (0, "0")]


def _without_nulls(value):
    """`value` with every None-valued key dropped, at any depth.  A struct column (parquet, a
    saved dataset) holds every key any row has, None where a row has none: a tool call's
    arguments got every other tool's parameter names, as nulls, which templates print."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _has_json(feature) -> bool:
    """Whether a column's feature holds free-form JSON anywhere (datasets' `Json`: what a jsonl's
    turns of differing fields are read as; its nulls are the row's own) rather than structs."""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_has_json(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_has_json(f) for f in feature)
    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList
    return inner is not None and _has_json(inner)


def _parts_joined(messages: list[dict]) -> list[dict] | None:
    """The messages with each content given as a list of text parts (OpenAI's
    `[{"type": "text", "text": ...}]`) as one string, the parts' texts joined by newlines (as
    vLLM serves a text model such content); None when no message has one."""
    def text_only(c) -> bool:
        return isinstance(c, list) and bool(c) and all(isinstance(p, dict) and p.get("type") == "text" for p in c)

    if not any(text_only(m.get("content")) for m in messages):
        return None
    return [m | {"content": content_text(m["content"])} if text_only(m.get("content")) else m for m in messages]


def _flat_text(row: dict) -> str:
    """A chat row's words, for tokenizer training and the validation split's hash."""
    if "messages" in row:
        parts = []
        for m in row["messages"]:
            parts += [str(m[k]) if isinstance(m[k], str) else json.dumps(m[k]) for k in PAYLOAD if m.get(k)]
        return "\n".join(parts)
    return f"{row['prompt']}{row['completion']}"


def as_documents(table, kind: str, text_field: str, origin: str = "the table", work: dict | None = None):
    """A table -> columns `text` (the words) and `chat` (the row as JSON; PLAIN for text).

    origin: the file it came from, kept in each row's JSON to name the row in errors.
    work: `Dataset.map` keywords saying where its output goes (cache_file_name, ...)."""
    work = work or {}
    if kind == "text":
        table = table.select_columns([text_field])
        if text_field != "text":  # the Hugging Face convention is already `text`
            table = table.rename_column(text_field, "text")
        return table.map(lambda b: {"chat": [PLAIN] * len(b["text"])}, batched=True, **work)
    shape = instruction_shape(table.column_names)
    wanted = ("messages", "conversations", "conversation", "tools", "prompt", "completion", *SYSTEM_COLUMNS,
              *(c for c in shape or () if c))
    cols = [c for c in dict.fromkeys(wanted) if c in table.column_names]
    structs = {c for c in cols if not _has_json(table.features[c])}  # None there may mean "absent"

    def one(row: dict, i: int) -> dict:
        name = f"{origin} row {i + 1}"
        # One file may mix shapes: a row's absent fields read as None and are dropped.
        raw = {c: _without_nulls(row[c]) if c in structs else row[c] for c in cols if row[c] is not None}
        try:
            chat = _chat_row(raw, shape, name)
            text = _flat_text(chat) if "messages" in chat or "prompt" in chat else ""  # "": dropped as empty
        except BadRow as e:  # kept to be counted, or to stop the preparation naming it, where rows are packed
            chat, text = {BAD: str(e)}, json.dumps(raw, default=str)
        chat[ROW] = name
        return {"text": text, "chat": json.dumps(chat)}

    return table.select_columns(cols).map(one, remove_columns=cols, with_indices=True, **work)


def _chat_row(raw: dict, shape, name: str) -> dict:
    """A table row's chat columns -> the row `render` reads: {"messages", "tools"?, CONTEXT?} or
    {"prompt", "completion"} (strings), or {} (nothing to learn from).  shape: the table's
    INSTRUCTION_SHAPES entry, if it has one (a row of no other shape is read by it)."""
    row = {"tools": raw["tools"]} if "tools" in raw else {}
    if "messages" in raw:  # messages rule (UltraChat's rows carry a `prompt` beside them, and no completion)
        turns = raw["messages"]
    elif isinstance(raw.get("prompt"), list) and isinstance(raw.get("completion"), list):
        row[CONTEXT] = len(raw["prompt"])  # TRL's conversational prompt/completion: the prompt is context only
        turns = raw["prompt"] + raw["completion"]
    elif "prompt" in raw and "completion" in raw:
        return {"prompt": raw["prompt"], "completion": raw["completion"]}
    elif "conversations" in raw or "conversation" in raw:
        turns = raw.get("conversations", raw.get("conversation"))
    elif shape is not None and (shape[0] in raw or shape[2] in raw):  # an instruction row
        turns = _instruction_messages(raw, shape, name)
    else:
        return {}
    messages = _turns_as_messages(turns, name)
    system = next((raw[c] for c in SYSTEM_COLUMNS if isinstance(raw.get(c), str) and raw[c].strip()), None)
    if system is not None and not any(m["role"] == "system" for m in messages):  # a system column: the first turn
        messages = [{"role": "system", "content": system}] + messages
        if CONTEXT in row:
            row[CONTEXT] += 1
    row["messages"] = messages
    return row


# ----------------------------------------------------------------------------- finding the targets


class BadRow(UserError):
    """One chat row cannot be rendered or split: it names the row (`data.bad_rows` says whether
    the preparation stops on it or drops it)."""


def _row_problem(name: str, why: str) -> BadRow:
    return BadRow(f"data: chat {name}: {why}")


class _Unsplittable(Exception):
    """Why a row's assistant turns cannot be found; `render` names the row."""


_INSTANT = threading.local()  # this thread's pinned instant while it renders a row, else unset


def _pinned_clock(real: type) -> type:
    """A `datetime` class whose now() is this thread's pinned instant while one is set, the real
    clock otherwise: installed once in transformers' template module (see `_one_instant`)."""

    class PinnedDatetime(real):
        @classmethod
        def now(cls, tz=None):
            instant = getattr(_INSTANT, "value", None)
            if instant is None:
                return real.now(tz)
            return instant if tz is None else instant.astimezone(tz)

    return PinnedDatetime


@contextlib.contextmanager
def _one_instant():
    """Every rendering of one row shows one instant: a template's `strftime_now` (Llama 3.2's
    default system prompt has the date) reads a clock pinned for the row.  A row is rendered
    several times, and a clock that moved between renderings (past midnight, or a template
    showing seconds) made them differ, and the prompt became targets.  transformers gives
    templates its own `strftime_now` (a function can't be passed in: it sanitises template
    inputs to plain data), which reads `datetime` from its module: that name becomes, once, a
    class whose now() reads the instant this thread pinned (nested renders keep the outer one)."""
    try:
        from transformers.utils import chat_template_utils as templates
    except ImportError:
        yield
        return
    real = getattr(templates, "datetime", None)
    if not (isinstance(real, type) and issubclass(real, datetime.datetime)):
        yield  # another transformers: its clock as it is
        return
    if real.__name__ != "PinnedDatetime":
        templates.datetime = _pinned_clock(real)
    outer = getattr(_INSTANT, "value", None)
    _INSTANT.value = outer or datetime.datetime.now()
    try:
        yield
    finally:
        _INSTANT.value = outer


def _apply(tok, messages: list[dict], tools, **kw):
    """tok.apply_chat_template (rendering only, unless `kw` says otherwise); a template that
    fails on the row (its raise_exception, a field it cannot read) makes it unsplittable."""
    try:
        return tok.apply_chat_template(messages, tools=tools, **({"tokenize": False} | kw))
    except Exception as e:
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise _Unsplittable(f"the chat template fails on it ({type(e).__name__}: {first})") from None


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search over slice compares: C speed on long conversations
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def _common_suffix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[len(a) - mid:] == b[len(b) - mid:] else (lo, mid - 1)
    return lo


def _turn_start(tok, full: str, before: list[dict], tools, cursor: int, a: int) -> int:
    """Where the model starts writing a turn whose payload starts at full[a]: at the end of its
    prompt P = render(before, add_generation_prompt=True), found as the longest tail of P in
    full[cursor:a] (its last occurrence): P itself need not be a prefix of `full`, the system
    prompt may sit elsewhere.  The tail must hold the whole generation prompt, so a prompt the
    turn is not rendered after (one that opens <think>) is not half-matched; `a` when none is."""
    prompt = _apply(tok, before, tools, add_generation_prompt=True) if before else ""
    if not prompt:
        return a
    bare = _apply(tok, before, tools)
    shortest = max(1, len(prompt) - len(bare)) if prompt.startswith(bare) else len(prompt)
    at = full.rfind(prompt[-shortest:], cursor, a) if shortest <= a - cursor else -1
    if at < 0:
        return a
    lo, hi, end = shortest, min(len(prompt), a - cursor), at + shortest
    while lo < hi:  # binary search: when a tail occurs, every shorter tail does
        mid = (lo + hi + 1) // 2
        found = full.rfind(prompt[-mid:], cursor, a)
        lo, hi, end = (mid, hi, found + mid) if found >= 0 else (lo, mid - 1, end)
    return end


def _assistant_spans(tok, messages: list[dict], tools, full: str, past: float = math.inf,
                     context: int = 0) -> list[tuple[int, int]]:
    """Character spans [start, end) of the full rendering `full` that the assistant wrote.

    The diff of whole renderings described in the module docstring; one span per assistant
    turn the student learns (`learnt_turns`), up to the first that starts after character `past` (where a block cuts the row: the turns after it could not
    reach a target, and each costs whole renderings, so a conversation of n turns took O(n^2)
    of them however little of it a block kept)."""
    sentinel = SENTINEL
    while sentinel in full:  # a conversation about this module
        sentinel += "x"
    spans, cursor = [], 0
    for i in learnt_turns(messages, context):
        m = messages[i]
        swapped = {k: v for k, v in m.items() if k not in PAYLOAD} | {"content": sentinel}
        other = _apply(tok, messages[:i] + [swapped] + messages[i + 1:], tools)
        if other.count(sentinel) != 1:
            raise _Unsplittable(f"the chat template does not render assistant turn {i}'s content as given")
        before, after = other.split(sentinel)
        ending = other if i == len(messages) - 1 else _apply(tok, messages[:i] + [swapped], tools)
        if ending.count(sentinel) != 1:
            raise _Unsplittable(f"the chat template does not render assistant turn {i} as a final turn")
        end_marker = ending.split(sentinel)[1]  # how the template ends a final assistant turn
        end_marker = end_marker.rstrip() or end_marker  # `<|im_end|>\n` -> `<|im_end|>` (step 3 above)
        a = min(_common_prefix(full, other), len(before))  # payload: full[a:z]
        same_after = _common_suffix(full, other)
        z = len(full) - min(same_after, len(after))
        if z < a or a < cursor or same_after < len(after) - len(end_marker):
            raise _Unsplittable(f"assistant turn {i} is not rendered in one place after the turns before it")
        if z == a and any(m.get(k) for k in PAYLOAD):
            raise _Unsplittable(f"the chat template renders nothing of assistant turn {i} (fields: "
                                f"{', '.join(k for k in PAYLOAD if m.get(k))}); it cannot show them")
        start = _turn_start(tok, full, messages[:i], tools, cursor, a)
        end = z + _common_prefix(end_marker, full[z:])
        spans.append((start, end))
        cursor = end
        if start > past:  # every later turn starts after this one ends
            break
    return spans


def stop_ids(tok) -> list[int]:
    """The ids a generation stops at: the tokenizer's EOS and, where its chat template ends an
    assistant turn with another token of its own (ChatML's `<|im_end|>` beside a base
    tokenizer's `<|endoftext|>` EOS, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`), that one:
    a chat-trained model ends its turns with it (the end marker is a target, step 3 above), so
    generation (eval, on-policy samples, an export's generation_config) must stop there too."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if not getattr(tok, "chat_template", None):
        return ids
    try:
        ending = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}],
                                         tokenize=False)
    except Exception:  # a template that needs more (a system turn, tools): no end marker known
        return ids
    marker = ending.split(SENTINEL)[-1].strip() if ending.count(SENTINEL) == 1 else ""
    first = tok.encode(marker, add_special_tokens=False)[:1] if marker else []
    added = set(tok.get_added_vocab().values()) if hasattr(tok, "get_added_vocab") else set()
    if first and first[0] in added and first[0] not in ids:
        ids.append(first[0])
    return ids


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """ids up to and with the first of `stops` (all of them when none is there)."""
    at = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids if at is None else ids[: at + 1]


def _token_targets(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (offsets (T, 2) in characters): does it overlap a span?  A token straddling a
    span's edge (' answer' after a template's '[/INST]') is one the model must write.  spans
    are in order and apart, so their ends ascend: the first span ending after a token's start
    is the only one it can overlap (a bisection, not a scan of every turn per token)."""
    ends = [b for _, b in spans]
    out = []
    for s, e in offsets:
        j = bisect.bisect_right(ends, s)
        out.append(j < len(spans) and max(e, s + 1) > spans[j][0])
    return out


def _row_name(row: dict) -> str:
    if ROW in row:
        return row[ROW]
    return "row beginning " + json.dumps(row)[:80]


def _written(value) -> bool:
    """Something is in it: text not blank, a content-parts list with a part that is (text not
    blank, or another kind: an image), a tool call."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return any(_written(p.get("text")) if p.get("type", "text") == "text" else True for p in value)
    return bool(value)


def empty_answers(chat: str) -> int:
    """How many of the row's assistant turns (or its completion) hold nothing: training there
    teaches the student to end its turn at once (often a placeholder left in the data)."""
    row = json.loads(chat)
    if "prompt" in row:
        return int(not _written(row.get("completion")))
    messages = row.get("messages", [])
    return sum(1 for i in learnt_turns(messages, row.get(CONTEXT, 0))
               if not any(_written(messages[i].get(k)) for k in PAYLOAD))


def render(tok, chat: str, block: int | None = None) -> tuple[list[int], list[bool]]:
    """One row (the `chat` column's JSON) -> (token ids (T,), is-target per token (T,)).
    block: the tokens a block keeps of a row (packing cuts the rest); past them the targets
    may be left unmarked (False), since finding them is what costs."""
    row = json.loads(chat)
    name = _row_name(row)
    if BAD in row:
        raise BadRow(row[BAD])
    if "prompt" in row:  # the completion, then EOS: the student learns where a completion ends
        if not (isinstance(row["prompt"], str) and isinstance(row["completion"], str)):
            raise BadRow(f"data: chat {name}: its prompt is a {type(row['prompt']).__name__} and its completion a "
                         f"{type(row['completion']).__name__}; give both as strings, or both as lists of turns")
        full, cut = row["prompt"] + row["completion"], len(row["prompt"])
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, targets = enc["input_ids"], _token_targets(enc["offset_mapping"], [(cut, len(full))])
        if not ids or ids[-1] != tok.eos_token_id:
            ids, targets = ids + [tok.eos_token_id], targets + [True]
        return ids, targets
    messages, tools = row["messages"], row.get("tools")
    template = getattr(tok, "chat_template", None)
    if not template:
        raise UserError("data: the corpus has chat rows (`messages`) but the tokenizer has no chat template; use "
                        "a tokenizer dir with a chat template (chat_template.jinja, or chat_template in "
                        "tokenizer_config.json), or give prompt/completion rows")
    with _one_instant():
        return _render_messages(tok, messages, tools, name, block, row.get(CONTEXT, 0))


def _as_the_template_reads(tok, messages: list[dict], tools) -> tuple[list[dict], str | None]:
    """(the messages, contents of text parts joined where the template cannot read such a list;
    their rendering when the check made it, else None)."""
    joined = _parts_joined(messages)
    if joined is None:
        return messages, None
    try:  # content as a list of text parts: as given if the template reads such lists
        full = _apply(tok, messages, tools)
    except _Unsplittable:
        return joined, None  # it could not read one (Qwen's: "can only concatenate str")
    if any(str(m["content"]) in full for m in messages if isinstance(m.get("content"), list)):
        return joined, None  # it wrote the list as Python text ("[{'type': 'text', ...}]")
    return messages, full


def generation_prompt(tok, messages: list[dict], tools) -> str:
    """The conversation `messages` rendered to where the assistant's next turn starts
    (add_generation_prompt), as `render` would render its turns."""
    messages, _ = _as_the_template_reads(tok, messages, tools)
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)


def content_text(content) -> str:
    """A message's content as text: a list of text parts joined as `_parts_joined` joins them."""
    if isinstance(content, list):
        return "\n".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return str(content or "")


def _render_messages(tok, messages: list[dict], tools, name: str, block: int | None,
                     context: int = 0) -> tuple[list[int], list[bool]]:
    """`render` of a `messages` row (name: where it came from, for the error; context: how many
    of the first messages are context only)."""
    try:
        messages, full = _as_the_template_reads(tok, messages, tools)
        every_turn = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if learnt_turns(messages, context) == every_turn and GENERATION.search(tok.get_chat_template(None, tools)):  # it marks the assistant's text itself
            out = _apply(tok, messages, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return list(out["input_ids"]), [bool(t) for t in out["assistant_masks"]]
        full = full if full is not None else _apply(tok, messages, tools)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        # the last character a block keeps (the max: a token's offsets may be (0, 0), a special's)
        past = max(e for _, e in enc["offset_mapping"][:block]) if block and len(enc["input_ids"]) > block else math.inf
        spans = _assistant_spans(tok, messages, tools, full, past, context)
    except _Unsplittable as e:
        raise BadRow(f"data: chat {name}: {e}; the assistant turns cannot be found, so fix or drop the row "
                     f"(or give prompt/completion rows)") from None
    return enc["input_ids"], _token_targets(enc["offset_mapping"], spans)


# ----------------------------------------------------------------------------- packing


@dataclass
class PackCounts:
    """What packing did to the rows: `truncated` were cut to the block and kept; `cut_away` would
    have lost every target to that cut (their first targets sit at positions `need` to `need_all`:
    the smallest seq_len that keeps one of them, and the one that keeps them all); `no_target` had
    none to begin with.  Both kinds are dropped."""

    truncated: int = 0
    cut_away: int = 0
    no_target: int = 0
    need: int = 0
    need_all: int = 0
    empty_answers: int = 0  # assistant turns or completions with nothing in them (their end marker the target)
    bad_rows: int = 0  # skipped (data.bad_rows: skip): the template cannot render or split them
    bad_example: str = ""  # the first of them, named, and why
    tokens: int = 0  # of the rows kept, before any cut
    cut_tokens: int = 0  # of those, past the block's end in the `truncated` rows: lost, their targets with them
    longest: int = 0  # the longest truncated row (tokens): seq_len + 1 that keeps every row whole

    @property
    def dropped(self) -> int:
        return self.cut_away + self.no_target

    def __iadd__(self, other: "PackCounts") -> "PackCounts":
        self.truncated += other.truncated
        self.cut_away += other.cut_away
        self.no_target += other.no_target
        self.empty_answers += other.empty_answers
        self.bad_rows += other.bad_rows
        self.bad_example = self.bad_example or other.bad_example
        self.tokens += other.tokens
        self.cut_tokens += other.cut_tokens
        self.longest = max(self.longest, other.longest)
        self.need = min(self.need or other.need, other.need or self.need)
        self.need_all = max(self.need_all, other.need_all)
        return self


def cut_share(counts: PackCounts) -> str:
    """What truncation cost, for the data line and `inspect` ("" for data prepared before it was counted)."""
    if not counts.tokens:
        return ""
    return (f", losing {counts.cut_tokens:,} of the kept rows' {counts.tokens:,} tokens "
            f"({counts.cut_tokens / counts.tokens:.0%}), the assistant turns in them too")


class RowPacker:
    """Whole rows into blocks of `block` tokens, streaming: `add` returns the blocks that
    filled up, the block being filled is carried (and can be saved and restored as
    `carry`), `flush` pads and returns it.  A row longer than `block` keeps its first
    `block` tokens; a row with no target left is dropped: it would teach nothing (`counts`
    says how many of each).  Padding is `pad_id`, no target.

    documents=True (data.packing: documents): each row is its own context, so its first
    token is no target (it would be predicted from the row before, which it cannot see),
    and `starts` gets, per completed block, is-row-start flags (the padding starts one too)."""

    def __init__(self, pad_id: int, block: int, carry: dict | None = None, documents: bool = False):
        self.pad_id, self.block, self.documents = pad_id, block, documents
        carry = carry or {}
        self.ids: list[int] = list(carry.get("ids", []))  # the block being filled
        self.tgt: list[bool] = [bool(t) for t in carry.get("targets", [])]
        self.row_starts: list[bool] = [bool(t) for t in carry.get("starts", [])]
        self.starts: list[list[bool]] = []  # per completed block (documents only), in `add`/`flush` order
        self.counts = PackCounts()

    @property
    def carry(self) -> dict:
        out = {"ids": list(self.ids), "targets": [int(t) for t in self.tgt]}
        if self.documents:
            out["starts"] = [int(t) for t in self.row_starts]
        return out

    def add(self, rows) -> tuple[list[list[int]], list[list[bool]]]:
        """rows: (ids, targets) pairs -> the completed blocks' (ids, targets) rows."""
        out_ids, out_tgt = [], []
        for ids, targets in rows:
            ids, targets = list(ids), [bool(t) for t in targets]
            first = next((p for p, t in enumerate(targets) if t and p), 0)  # position 0 of a block is never predicted
            if not first:
                self.counts.no_target += 1
                continue
            if first >= self.block:
                self.counts.cut_away += 1
                self.counts.need = min(self.counts.need or first, first)
                self.counts.need_all = max(self.counts.need_all, first)
                continue
            self.counts.tokens += len(ids)
            if len(ids) > self.block:
                self.counts.cut_tokens += len(ids) - self.block
                self.counts.longest = max(self.counts.longest, len(ids))
                ids, targets = ids[: self.block], targets[: self.block]
                self.counts.truncated += 1
            if len(self.ids) + len(ids) > self.block:
                out_ids.append(self._padded(self.ids, self.pad_id))
                out_tgt.append(self._padded(self.tgt, False))
                self._close()
            self.ids += ids
            self.tgt += ([False] + targets[1:]) if self.documents else targets
            self.row_starts += [True] + [False] * (len(ids) - 1)
        return out_ids, out_tgt

    def flush(self) -> tuple[list[list[int]], list[list[bool]]]:
        if not self.ids:
            return [], []
        out = [self._padded(self.ids, self.pad_id)], [self._padded(self.tgt, False)]
        self._close()
        return out

    def _close(self) -> None:
        """The block being filled is done: keep its row starts (the padding is a row of its own)."""
        if self.documents:
            pad = self.block - len(self.ids)
            self.starts.append(self.row_starts + ([True] + [False] * (pad - 1) if pad else []))
        self.ids, self.tgt, self.row_starts = [], [], []

    def _padded(self, row: list, value) -> list:
        return row + [value] * (self.block - len(row))
