"""Where teacher signals come from: a live model (checkpoint or preset) or a cache replay.

Both expose `signal(indices, input_ids) -> (TeacherSignal (B, T, k), valid (B, T))` and
count `forward_calls`, so the trainer can show it pays one teacher pass per batch.
"""
from teachers.cached import CachedTeacher
from teachers.live import LiveTeacher, load_teacher_model, teacher_identity

__all__ = ["CachedTeacher", "LiveTeacher", "load_teacher_model", "teacher_identity"]
