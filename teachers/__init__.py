"""Where a teacher signal comes from, behind one `Teacher` protocol (protocol.py).

live.py     a Hugging Face causal LM run once per batch (top-k or dense signal)
sharded.py  the same model partitioned over ranks with DeepSpeed ZeRO-3 (for caching)
server.py   a model served by vLLM, over HTTP (server_http.py: retries, token budget)
cache/      the on-disk signal: codec, writer, reader, and `CachedTeacher` (the replay)
"""
from teachers.cache import CachedTeacher
from teachers.live import LiveTeacher, load_teacher_model, teacher_identity
from teachers.protocol import IGNORE, Batch, Teacher, TeacherUnavailable, token_ids, untrained

__all__ = ["IGNORE", "Batch", "token_ids", "untrained", "CachedTeacher", "LiveTeacher", "Teacher", "TeacherUnavailable", "load_teacher_model", "teacher_identity"]
