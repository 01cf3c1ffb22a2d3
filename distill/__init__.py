"""Orchestration, the top layer below the CLI.

config.py   the run config (pydantic; no torch import, so a bad config answers fast)
layout.py   `RunLayout`: every path under a run's out_dir, named once
data.py     corpus -> tokenizer -> packed token blocks (fingerprinted)
runtime.py  what every stage sets up: ranks, data, models from config, the teacher
prompts.py  chat data's prompts, and the blocks of a model's completions of them
stages.py   one function per CLI command (pretrain, cache, train, run, export)
train/      the co-distillation loop, the student, the engines, checkpoints, metrics
report/     evaluation, export, the report and its plots, `distill inspect`
demo.py     the embedded default run

Importing this package has no side effects; the CLI entry point sets offline mode.
"""
