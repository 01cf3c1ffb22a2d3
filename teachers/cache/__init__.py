"""The teacher-signal cache: pay for the teacher's forward pass once, replay it from disk.

codec.py   how a shard's top-k ids and log-probs are stored (lossless, fp16/bf16, compact)
format.py  what reader and writer agree on: version, manifest name, errors, checksums
writer.py  `write_cache`: one teacher pass -> shards + manifest (multi-rank, resumable)
reader.py  `CacheReader`: random access in global order; verify and describe a cache
replay.py  `CachedTeacher`: the `Teacher` protocol over a cache split
"""
from teachers.cache.format import CacheCorrupt, CacheLocked, CacheMismatch, CacheWriteError
from teachers.cache.reader import CacheReader, describe_cache, verify_cache
from teachers.cache.replay import CachedTeacher
from teachers.cache.writer import write_cache

__all__ = ["CacheCorrupt", "CacheLocked", "CacheMismatch", "CacheReader", "CacheWriteError", "CachedTeacher",
           "describe_cache", "verify_cache", "write_cache"]
