"""The run config: one YAML file, validated before any work starts.

Every field is documented where it is declared; `distill init` writes an example.
Validation has two parts, both before any stage runs, and a bad config fails either
with a `UserError`: a one-line message naming the key.
  `load_config` / `parse_config`: the schema (types, ranges, cross-field rules) in plain
      pydantic.  This module imports neither torch nor transformers, so `distill init`
      and a typo answer in well under a second.
  `check_config`: what only the layers below can judge (a divergence, preset or schedule
      their registries know; every model's size arguments, built on the meta device); it
      imports them, and with them torch.
"""
from __future__ import annotations

import json
import re
import sys

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from common.errors import UserError
from distill.layout import RunLayout


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(_Strict):
    path: Path | None = Field(None, description="Local Hugging Face tokenizer dir. None: train a byte-level BPE on the corpus.")
    vocab_size: int = Field(4096, ge=260, le=1_000_000, description="BPE vocabulary size when training one.")


class SelectConfig(_Strict):
    """Which training blocks a student learns from, judged by the teacher's difficulty
    statistics stored in the cache (losses/difficulty.py): give exactly one rule."""

    by: Literal["nll", "entropy", "top1"] = Field("nll", description="Per-block statistic, the mean over its training targets: `nll` (the teacher's loss on the true next token; high = hard), `entropy` (high = hard) or `top1` (the teacher's top-1 probability; low = hard).")
    keep_hardest: float | None = Field(None, gt=0.0, le=1.0, description="Keep this fraction of blocks, the hardest by `by` (Llama 4 kept 5% for Behemoth: 0.05).")
    drop_easiest: float | None = Field(None, ge=0.0, lt=1.0, description="Drop this fraction of blocks, the easiest by `by` (Llama 4 dropped over half for Maverick: 0.5). 0 keeps every block (a student opting out of `data.select`).")
    min: float | None = Field(None, description="Threshold rule: keep blocks whose statistic is at least this (in its own units: nats for nll and entropy, a probability for top1).")
    max: float | None = Field(None, description="Threshold rule: keep blocks whose statistic is at most this.")
    rescore_every: int = Field(0, ge=0, description="Dynamic selection: every N steps, re-weight the kept blocks by the students' current gap to the teacher (their loss on the block's labels minus the teacher's, from the training steps themselves) and draw harder blocks more often; 0 = static (a seeded permutation per epoch). Resumable: the gap table and the window's weights are checkpointed with the students.")
    rescore_temperature: float = Field(0.5, gt=0.0, description="Dynamic selection: a block's draw weight is softmax(gap / this) (gap in nats), mixed 3:1 with uniform so every block stays reachable.")

    @model_validator(mode="after")
    def _one_rule(self):
        rules = [name for name, on in (("keep_hardest", self.keep_hardest is not None),
                                       ("drop_easiest", self.drop_easiest is not None),
                                       ("min/max", self.min is not None or self.max is not None)) if on]
        if len(rules) != 1:
            raise ValueError(f"give exactly one of keep_hardest, drop_easiest or min/max (got {', '.join(rules) or 'none'})")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g}): no block could be kept")
        return self

    @property
    def keeps_all(self) -> bool:
        """`{drop_easiest: 0}`: every block, drawn as without a rule (a student opting out)."""
        return self.drop_easiest == 0 and not self.rescore_every

    def _describe_rule(self) -> str:
        if self.keep_hardest is not None:
            return f"keep the hardest {100 * self.keep_hardest:g}% by {self.by}"
        if self.drop_easiest is not None:
            return f"drop the easiest {100 * self.drop_easiest:g}% by {self.by}" if self.drop_easiest else "every block"
        bounds = ([f"{self.by} >= {self.min:g}"] if self.min is not None else []) + \
                 ([f"{self.by} <= {self.max:g}"] if self.max is not None else [])
        return "keep blocks with " + " and ".join(bounds)

    def describe(self) -> str:
        """'keep the hardest 5% by nll', for logs and the report."""
        text = self._describe_rule()
        if self.rescore_every:
            text += f", re-weighted by the students' gap every {self.rescore_every} steps"
        return text


class DataConfig(_Strict):
    paths: list[Path] = Field(default_factory=list, description="Files, dirs or glob patterns (`repo/**/*.py`): .txt/.py/.md/.rst/.text (one document per file), .jsonl/.json (also compressed: .gz/.bz2/.zst/.xz), .parquet, .arrow, or a `datasets.save_to_disk` dir (a DatasetDict's `train` split, or its only split). Any other file named here is refused. Tables met while walking a dir or a glob that lack the text (or chat) columns are skipped with a count; a file named here must read.")
    exclude: list[str] = Field(default_factory=list, description="Patterns of files to leave out of dirs and globs: without a `/` they match a file or folder name (`*.json`, `tests`), with one the path below the dir (`docs/*`).")
    stdlib: bool = Field(False, description="Use the Python standard library's .py sources on this machine as the corpus (the offline default).")
    text_field: str = Field("text", description="Column holding the text in jsonl/json/parquet/arrow/saved-dataset inputs (`text`: the Hugging Face convention); other columns are ignored. A table without it but with `messages` (role/content turns, rendered with the tokenizer's chat template), `prompt` + `completion`, ShareGPT `conversations` or instruction columns (Alpaca, Dolly, OpenOrca) is chat data: only the assistant's / completion's tokens are trained and scored (README, job 3).")
    seq_len: int = Field(256, ge=8, le=1_048_576, description="Tokens per training block.")
    packing: Literal["documents", "concat"] = Field("documents", description="How documents (and chat rows) share a block: `documents` (the default): each is its own context, as at inference; the models get position ids that restart per row, so attention never crosses into another row, and a row's first token is no target. `concat`: one stream, every position attends to everything before it in the block (the behaviour before this switch).")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="Share of documents held out for validation (split by document hash, so deterministic).")
    max_documents: int | None = Field(None, ge=1, description="Use at most this many documents: the plain-text files' first, then the tables' rows, each in sorted path order (said in one line when it cuts).")
    max_train_blocks: int | None = Field(None, ge=1, description="Keep at most this many training blocks.")
    max_val_blocks: int | None = Field(None, ge=1, description="Keep at most this many validation blocks.")
    num_proc: int | None = Field(None, ge=1, description="Processes that tokenise during preparation; null: the cores this process may use, at most 8.")
    bad_rows: Literal["stop", "skip"] = Field("stop", description="A chat row the tokenizer's chat template cannot render, or whose assistant turns cannot be found in its rendering: `stop` the preparation naming it (and how many more of the rows read with it fail), or `skip` it, counted in a `[data]` line naming the first.")
    shard_documents: int = Field(2048, ge=1, description="Documents per prepared shard: bounds preparation's memory (one shard's tokens) and is the unit a killed preparation resumes from.")
    select: SelectConfig | None = Field(None, description="Train on a subset of the training blocks chosen by the teacher's difficulty (cached mode; the cache records the statistics). A student's own `select` replaces it. Validation blocks are never selected from.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)

    @model_validator(mode="after")
    def _has_source(self):
        if not self.paths and not self.stdlib:
            raise ValueError("data: give `paths` (files or dirs) or set `stdlib: true`")
        return self


class ScheduleConfig(_Strict):
    kind: Literal["constant", "linear", "cosine", "step"] = Field("constant", description="Shape of the curve from `start` to `end` over training.")
    start: float = Field(0.5, ge=0.0, le=1.0, description="Value at the first step (after warmup); the value throughout for `constant`.")
    end: float = Field(0.5, ge=0.0, le=1.0, description="Value at the last step (or at `end_step`).")
    warmup_steps: int = Field(0, ge=0, description="Steps before the curve begins (schedule steps count from 0: the step metrics.jsonl logs as N runs at schedule step N-1).")
    warmup: Literal["hold", "ramp"] = Field("hold", description="During warmup: hold `start`, or ramp from 0 to `start`.")
    end_step: int | None = Field(None, ge=1, description="Schedule step (from 0) where `end` is reached and then held, i.e. logged step end_step + 1 (default: the last step).")
    boundaries: list[float] = Field(default_factory=lambda: [0.5], description="`step` kind only: increasing fractions in (0, 1) of the transition (schedule steps warmup_steps to end_step or the last, counted from 0) where the value jumps one of len+1 even levels.")

    def as_dict(self) -> dict:
        """The `losses.build_schedule` form."""
        if self.kind == "constant":
            return {"kind": "constant", "value": self.start, "warmup_steps": self.warmup_steps, "warmup": self.warmup}
        d = {"kind": self.kind, "start": self.start, "end": self.end, "warmup_steps": self.warmup_steps,
             "warmup": self.warmup, "end_step": self.end_step}
        if self.kind == "step":
            d["boundaries"] = list(self.boundaries)
        return d

    @model_validator(mode="after")
    def _end_after_warmup(self):
        if self.end_step is not None and self.end_step <= self.warmup_steps:
            raise ValueError(f"end_step ({self.end_step}) must come after warmup_steps ({self.warmup_steps})")
        if self.boundaries != [0.5] and self.kind != "step":  # before: accepted and ignored (a dump keeps the default)
            raise ValueError(f"boundaries shape a `step` schedule only; this one is {self.kind}: set kind: step, "
                             f"or remove boundaries")
        return self


class LossConfig(_Strict):
    divergence: str = Field("forward_kl", description="Soft-target divergence: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv.")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softmax temperature for both sides; the loss is scaled by T^2.")
    tail: Literal["auto", "bucket", "renorm", "sampled"] = Field("auto", description="Estimator of the teacher's distribution: `bucket` (top-k signal) keeps the missing mass as one outcome; `renorm` (top-k signal) renormalises the top-k; `sampled` (a cache made with cache.estimator: sampled) uses sampled teacher tokens, unbiased for forward_kl. auto: `sampled` with a sampled cache, else `bucket`.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD interpolation weight.")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="Skew KL mixing weight (DistiLLM).")
    hard_target: Literal["labels", "teacher_argmax"] = Field("labels", description="Hard target: ground-truth next tokens or the teacher's top-1.")
    soft_weight: ScheduleConfig = Field(default_factory=ScheduleConfig, description="w_soft(t); w_hard(t) = 1 - w_soft(t). start > end goes soft -> hard, start < end hard -> soft.")
    adaptive: Literal["none", "confidence", "entropy", "disagreement"] = Field("none", description="Per-token soft weights following the teacher, normalised so their mean is w_soft(t).")
    chunk_size: int | None = Field(None, ge=1, description="Tokens per chunk of [tokens, vocab] logits held at once; null: chosen from the vocabulary and a budget of 256 MiB on a CPU, 2 GiB on a GPU (losses.chunked.auto_chunk_size).")
    balance_weight: float = Field(0.01, ge=0.0, description="Switch-style MoE load-balancing loss weight (MoE students).")
    z_weight: float = Field(0.001, ge=0.0, description="Router z-loss weight (MoE students).")
    bias_update_rate: float = Field(0.0, ge=0.0, description="DeepSeek-V3 aux-loss-free balancing: expert-bias step per update (0 = off).")


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decays to lr * min_lr_ratio.")
    warmup_steps: int = Field(20, ge=0, description="Linear LR warmup steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (not on norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm (0 = off).")

    @model_validator(mode="after")
    def _betas(self):
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)}: each must be in [0, 1) (AdamW's moving-average factors), "
                             f"e.g. [0.9, 0.95]")
        return self


class ModelConfig(_Strict):
    """Exactly one of `preset` (+ `args`), `path` or `from_teacher`."""

    preset: str | None = Field(None, description="Model preset: behemoth, scout, maverick, dense, dense_llama4.")
    args: dict[str, Any] = Field(default_factory=dict, description="Preset size arguments (hidden_size, num_layers, num_experts, ...).")
    path: Path | None = Field(None, description="A local Hugging Face causal-LM dir (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Llama 4 text, ...): a pretrained student, trained from its own weights.")
    from_teacher: dict[str, Any] | None = Field(None, description="The teacher's own config with only the named fields changed: `num_layers`, `num_experts`, `hidden_size`, ... or any raw config field; `layers: [..]` (teacher layers kept, in order) or `layers: auto` (the contiguous block whose removal changes the hidden states least, by angular distance; the default with `init: teacher`, evenly spaced layers otherwise). `{}` is the teacher's full shape.")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("preset", "path", "from_teacher") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of preset, path or from_teacher (got {', '.join(given) or 'none'})")
        if self.args and self.preset is None:
            raise ValueError("args go with a preset; with from_teacher put the fields inside it")
        return self

    @property
    def source(self) -> str:
        """What the model comes from, for reports: the preset's name, `pretrained` or `from_teacher`."""
        return self.preset or ("pretrained" if self.path is not None else "from_teacher")


def _device(value: str | None) -> str | None:
    """A device torch names (auto: ours), refused here rather than deep in a run ("gpu")."""
    if value is not None and not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", value):
        raise ValueError(f"{value!r} is no device: write auto, cpu, cuda or cuda:N (mps, xpu[:N])")
    return value


class StudentConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Directory-safe name; artefacts go to OUT/students/NAME/.")
    model: ModelConfig
    baseline: bool = Field(False, description="CE-only baseline: ground-truth labels only, no teacher signal.")
    init: Literal["random", "teacher"] = Field("random", description="Random init, or copy embeddings/layers/experts from the teacher (not with model.path: a pretrained student keeps its weights).")
    init_layers: list[int] | None = Field(None, description="Teacher layers copied into student layers 0..n-1 when init=teacher; for a student cut from the teacher (model.from_teacher), also which teacher layers it keeps.")
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    device: str | None = Field(None, description="Device for this student (cpu, cuda, cuda:N, ...; e.g. cuda:1); default: train.device.")
    on_policy_share: ScheduleConfig | None = Field(None, description="This student's own train.on_policy.share (e.g. constant 0: this student stays off-policy). null: train.on_policy.share.")
    select: SelectConfig | None = Field(None, description="This student's own data selection, replacing data.select (a Maverick-like student can learn from a harder subset than a Scout-like one, from the same cache); `{drop_easiest: 0}` keeps every block.")

    _device = field_validator("device")(_device)

    @model_validator(mode="after")
    def _init_layers_used(self):
        if self.init_layers is not None and self.init != "teacher" and self.model.from_teacher is None:
            raise ValueError("init_layers names the teacher layers a student copies (init: teacher) or is cut to "
                             "(model.from_teacher); with neither it would be ignored: set init: teacher, or remove it")
        return self


class ServerConfig(_Strict):
    """A teacher served by vLLM's OpenAI-compatible server (teachers/server.py).  The top-k it
    returns per position is `cache.k` (at most the server's `--max-logprobs`)."""

    url: str = Field(..., description="Base URL of the server, e.g. http://10.0.0.5:8000 (no /v1).")
    model: str = Field(..., description="The model name the server serves (its --served-model-name, or the --model it was started with).")
    timeout_s: float = Field(120.0, gt=0, description="Seconds one request may take before it is retried.")
    max_retries: int = Field(5, ge=0, description="Retries of a request after a connection error, a timeout or a 5xx (never a 4xx), with exponential backoff and jitter; one more failure stops the run naming the shard.")
    max_inflight_tokens: int = Field(65_536, ge=1, description="Most prompt tokens in requests sent and not yet answered (one request is one block, seq_len + 1 tokens, always allowed alone).")
    drift_tolerance: float = Field(0.2, ge=0, description="A resumed cache or run checks that the server still answers as the model it began with: the mean change of the log-probs of fixed probe tokens, in nats, may be at most this. Another model served under the same name moves it by far more (5.4 in the tests); raise it to accept a deliberately re-quantised teacher.")


class TeacherConfig(_Strict):
    source: Literal["preset", "checkpoint", "cache", "server"] = Field("checkpoint", description="`checkpoint`: a local Hugging Face dir; `preset`: build from a preset (then `distill pretrain` trains it); `cache`: an existing logit cache only; `server`: a vLLM server (`teacher.server`), for a teacher larger than the training machines.")
    server: ServerConfig | None = Field(None, description="source=server: where the teacher is served (url, model, timeout_s, max_retries, max_inflight_tokens, drift_tolerance).")
    path: Path | None = Field(None, description="Teacher checkpoint dir (source=checkpoint). Default for source=preset: OUT/teacher.")
    model: ModelConfig | None = Field(None, description="Teacher architecture (source=preset).")
    sharding: Literal["none", "zero3"] = Field("none", description="`zero3`: for a teacher too large for one device, `distill cache` splits its weights over the ranks of a `deepspeed`/torchrun launch with DeepSpeed ZeRO-3 (each rank keeps 1/N, gathers one layer at a time and runs the whole teacher on its own slice of the data). Online training needs `none`.")
    pretrain: "PretrainConfig" = Field(default_factory=lambda: PretrainConfig())

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "preset" and (self.model is None or self.model.preset is None):
            raise ValueError("teacher.model.preset is required when teacher.source is 'preset'")
        if self.model is not None and self.source != "preset":  # before: accepted and never read
            raise ValueError(f"teacher.model is the architecture of a preset teacher (source: preset); a "
                             f"{self.source} teacher's is its own, so remove teacher.model")
        if (self.source == "server") != (self.server is not None):
            raise ValueError("teacher.server (url, model) is required when teacher.source is 'server', and only then")
        if self.source == "server" and self.sharding != "none":
            raise ValueError("teacher.sharding applies to an in-process teacher; a server teacher is sharded by "
                             "its server (vLLM's --tensor-parallel-size); remove teacher.sharding")
        return self


class PretrainConfig(_Strict):
    steps: int = Field(300, ge=1, description="Teacher pretraining steps (plain CE).")
    batch_size: int = Field(16, ge=1, description="Blocks per pretraining step.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=30))


class CacheConfig(_Strict):
    dir: Path | None = Field(None, description="Cache dir. Default: OUT/cache.")
    k: int = Field(64, ge=1, description="Top-k log-probs kept per token (must not exceed the vocab).")
    encoding: Literal["lossless", "fp16", "bf16", "compact"] = Field("lossless", description="Shard encoding of a top-k cache: lossless (default), fp16, bf16, compact (lossy, smallest). A sampled cache is always stored as `sampled` (cache.estimator: sampled), never set here.")
    estimator: Literal["auto", "topk", "sampled"] = Field("auto", description="What the cache keeps per token: the teacher's top-k log-probs (students use tail: bucket or renorm), or `samples` tokens drawn from it (students use tail: sampled; unbiased forward KL). auto (the default): `sampled` in cached mode when every student can learn from draws (forward_kl at cache.sample_temperature, hard_target labels, adaptive not confidence, tail auto or sampled) and the teacher is not a server (teacher.source: cache expects a sampled cache too), else `topk`; `distill cache` says which and why. bench/peer.py measured random-init students at 1.7-2.2x the held-out perplexity of the whole distribution from a top-64 cache and 1.00-1.03x from 256 draws.")
    samples: int = Field(256, ge=1, le=4096, description="estimator: sampled: draws per token (256: students within 1-3% of the whole distribution's perplexity in bench/peer.py; 32: within 10-20%, at about a third of the bytes there).")
    exact_top: int = Field(0, ge=0, le=4096, description="estimator: sampled: the teacher's most likely ids kept with their exact probabilities; the draws then come from the rest of the distribution (still unbiased, with less variance: none on these ids). 0: every entry drawn.")
    sample_temperature: float = Field(1.0, gt=0.0, le=100.0, description="estimator: sampled: the temperature the draws are made at; every student's loss.temperature must equal it.")
    sample_seed: int | None = Field(None, description="estimator: sampled: seed of the draws (part of the cache's identity). null: the run's `seed`; set it to rerun students with other seeds from one cache.")
    batch_size: int = Field(8, ge=1, description="Blocks per teacher forward.")
    shard_sequences: int = Field(256, ge=1, description="Blocks per shard file.")

    @model_validator(mode="after")
    def _exact_top_needs_draws(self):
        if self.exact_top and self.estimator == "topk":
            raise ValueError(f"exact_top: {self.exact_top} keeps a sampled cache's head exactly; it needs "
                             f"estimator: sampled (a top-k cache keeps its k ids exactly already)")
        return self


class OnPolicyConfig(_Strict):
    """On-policy co-distillation (distill/train/on_policy.py): students learn from the teacher's
    judgement of their own samples, one teacher forward per step for every student."""

    share: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(start=0.0, end=0.0), description="Share of steps taken on-policy, a schedule over training: at each step one seeded draw u in [0, 1) (the same for every student and rank) makes the step on-policy for a student when u < share(step); the other steps train on the corpus as without this section. Constant 0 (the default) is off; `{kind: linear, start: 0, end: 1}` goes from off-policy to on-policy.")
    max_new_tokens: int = Field(64, ge=1, le=65_536, description="Most tokens a student samples per prompt (it stops earlier at EOS, or at the chat template's end of turn).")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Sampling temperature; the teacher scores the samples at it too (the on-policy loss's temperature).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this much probability (1.0: the whole vocabulary).")
    prompts_per_step: int | None = Field(None, ge=1, description="Prompts per on-policy step (global, every rank's share together); each student samples one completion per prompt. null: train.batch_size.")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = Field("reverse_kl", description="Divergence of on-policy steps (GKD's on-policy default is reverse KL); jsd uses each student's loss.beta. No hard loss on samples.")


class TrainConfig(_Strict):
    mode: Literal["cached", "online"] = Field("cached", description="`cached`: read the teacher signal from the cache; `online`: run the teacher once per batch.")
    steps: int = Field(200, ge=1, description="Optimizer steps per student (see epochs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training blocks, instead of steps: steps = ceil(epochs x training blocks / batch_size), counted once the data is prepared (the run prints it); train.steps is then not used. null: train.steps.")
    batch_size: int = Field(8, ge=1, description="Blocks per step (global, across data-parallel ranks).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step.")
    eval_every: int = Field(50, ge=0, description="Validate every N steps (0 = only at the end).")
    eval_blocks: int = Field(32, ge=1, description="Validation blocks per evaluation.")
    eval_prompts: int = Field(32, ge=0, description="`distill eval` on chat or prompt/completion data: held-out prompts the students (and the teacher) answer, greedy and sampled, scored by the teacher's reverse KL and by exact match against the data's answer (report.md, 'Generation on held-out prompts'); generation settings are train.on_policy's. 0: none.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept per student.")
    max_nonfinite: int = Field(10, ge=0, description="Skipped non-finite steps a student may take; one more is a student failure (see on_student_failure).")
    on_student_failure: Literal["stop", "drop"] = Field("stop", description="When one student fails (past max_nonfinite, or an exception such as out of memory in its step): `stop` checkpoints every student (the failed one at its last good step) and ends the run with exit 3; `drop` does the same, marks the student failed in its metrics and the report, and trains the others to the end. Either way a failed student stays dropped on --resume.")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N (or torch's mps, xpu[:N]).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Autocast precision: auto = bf16 on GPU, fp32 on CPU.")
    engine: Literal["torch", "deepspeed"] = Field("torch", description="Plain PyTorch, or one DeepSpeed engine per student (launch with `deepspeed` or torchrun for several ranks; one process runs without a launcher).")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 1-3 (engine=deepspeed); 0 is refused (no grad norm to tell a non-finite step by): for unsharded data parallelism use engine: torch (DDP).")
    deepspeed_config: Path | None = Field(None, description="A ds_config JSON passed through to DeepSpeed (engine=deepspeed); batch sizes are filled in.")
    online_dense: bool | Literal["auto"] = Field("auto", description="Online mode: hand students the teacher's whole distribution (its dense logits: each divergence exact over the vocabulary) instead of its top-k (cache.k). auto: yes when the teacher runs in-process, cache.estimator is topk, no on-policy steps are configured and one step's fp32 teacher logits (batch_size x seq_len x V x 4 bytes) fit in 2 GiB, else the top-k; the run says which. Students from random init learn much better from it than from the top-64 bucket (bench/peer.py: held-out perplexity at or below TRL's GKD, against 1.7-2.3x with top-64). It holds the step's (B, T, V) fp32 teacher logits: 26 GB at 8 x 4,096 tokens and V = 202,048. true with a server teacher (top-k only) is refused.")
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms for exact resume.")
    on_policy: OnPolicyConfig | None = Field(None, description="On-policy co-distillation (online mode): students sample completions of the data's prompts and learn from the teacher's scores of them. Absent: off-policy only.")

    _device = field_validator("device")(_device)

    @model_validator(mode="after")
    def _split(self):  # the ranks' share is checked once they are known (distill/train/setup.py)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum} "
                             f"(each micro-batch is batch_size / grad_accum blocks)")
        return self


def shard_size_problem(size: str) -> str | None:
    """Why `size` is not a save_pretrained shard size (an integer and a unit), or None."""
    if re.fullmatch(r"\d+(GIB|MIB|KIB|GB|MB|KB)", size.strip().upper()) and int(re.match(r"\d+", size.strip())[0]) > 0:
        return None
    return f"{size!r} is not a size: write a whole number and a unit, e.g. 5GB, 500MB or 2GiB"


class ExportConfig(_Strict):
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weights dtype in exported dirs.")
    max_shard_size: str = Field("2GB", description="The largest safetensors file of an exported dir (save_pretrained's max_shard_size): a whole number and a unit, e.g. 5GB, 500MB, 2GiB; a larger model is split into shards with an index.")

    @model_validator(mode="after")
    def _size(self):
        problem = shard_size_problem(self.max_shard_size)
        if problem:
            raise ValueError(f"max_shard_size: {problem}")
        return self


class RunConfig(_Strict):
    out_dir: Path = Field(Path("runs/default"), description="Where every artefact of the run goes.")
    seed: int = Field(0, description="Seed for data order, init and sampling.")
    data: DataConfig
    teacher: TeacherConfig
    cache: CacheConfig = Field(default_factory=CacheConfig)
    students: list[StudentConfig] = Field(..., min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # What cache.estimator: auto chose and why (None: the config named it); see _auto_estimator.
    _estimator_choice: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [s.name for s in self.students]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"students: duplicate name(s) {sorted(dup)}")
        if self.teacher.source == "cache" and self.train.mode == "online":
            raise ValueError("train.mode 'online' needs a teacher model, but teacher.source is 'cache'")
        for i, s in enumerate(self.students):
            where, rule = self.selection_of(i)
            if rule is None or rule.keeps_all:
                continue
            if self.train.mode == "online":
                raise ValueError(f"{where}: selecting data needs the teacher's difficulty of every training block "
                                 f"before training, which the cache records; set train.mode: cached")
            if rule.rescore_every and s.loss.hard_target == "teacher_argmax" and not s.baseline:
                raise ValueError(f"{where}.rescore_every: the gap it re-weights by is the student's loss on the "
                                 f"labels, but students.{i}.loss.hard_target is teacher_argmax; use labels")
        self._resolve_estimator()
        _check_on_policy(self)
        if self.train.online_dense is True and self.teacher.source == "server":
            raise ValueError("train.online_dense: true needs the teacher's whole distribution, but a server teacher "
                             "returns its top-k only; set train.online_dense: auto or false")
        if not (self.train.mode == "online" and self.train.online_dense is True):  # auto may fall back to top-k
            for i, s in enumerate(self.students):
                _check_estimator(f"students.{i}.loss", s, self.cache)
        return self

    def _resolve_estimator(self) -> None:
        """cache.estimator: auto and every loss.tail: auto -> what they stand for, once, so
        the rest of the code (and the run hash) sees concrete values."""
        if self.cache.estimator == "auto":
            estimator, why = _auto_estimator(self)
            if self.cache.exact_top and estimator == "topk":
                raise ValueError(f"cache.exact_top: {self.cache.exact_top} keeps a sampled cache's head exactly, but "
                                 f"cache.estimator: auto chose the top-k ({why}); set cache.exact_top: 0")
            self.cache.estimator = estimator
            self._estimator_choice = why
        if self.cache.estimator == "sampled" and self.teacher.source == "server":
            raise ValueError("cache.estimator: sampled draws from the teacher's whole distribution, but a server "
                             "teacher returns its top-k log-probs only; set cache.estimator: topk (or auto)")
        # online_dense: true hands over dense logits whatever the estimator: no tail applies
        dense = self.train.mode == "online" and self.train.online_dense is True
        draws = self.cache.estimator == "sampled" and not dense
        for s in self.students:
            if s.loss.tail == "auto":
                s.loss.tail = "sampled" if draws else "bucket"

    @property
    def estimator_note(self) -> str | None:
        """One line naming the signal cache.estimator: auto chose and why; None when the
        config named the estimator."""
        if self._estimator_choice is None or self.train.mode == "online":  # online: signal_note says it
            return None
        c = self.cache
        signal = f"{c.samples} draws per token" if c.estimator == "sampled" else f"the top-{c.k}"
        return f"teacher signal: {signal} (cache.estimator: auto; {self._estimator_choice})"

    @property
    def selects_data(self) -> bool:
        """Some student learns from a subset of the training blocks (a rule other than `{drop_easiest: 0}`)."""
        return any(rule is not None and not rule.keeps_all
                   for rule in (self.selection_of(i)[1] for i in range(len(self.students))))

    def on_policy_share(self, i: int) -> ScheduleConfig | None:
        """Student i's on-policy share schedule; None: it never trains on-policy (no
        train.on_policy, or a CE-only baseline, which has no teacher to be scored by)."""
        s, op = self.students[i], self.train.on_policy
        if op is None or s.baseline:
            return None
        return s.on_policy_share if s.on_policy_share is not None else op.share

    @property
    def on_policy_active(self) -> bool:
        """Some student may take an on-policy step: its share schedule is not constant 0."""
        return any(_can_be_on(self.on_policy_share(i)) for i in range(len(self.students)))

    def selection_of(self, i: int) -> tuple[str, SelectConfig | None]:
        """Student i's data selection and the config key it comes from."""
        if self.students[i].select is not None:
            return f"students.{i}.select", self.students[i].select
        return "data.select", self.data.select

    @property
    def layout(self) -> RunLayout:
        """Every path of this run (see distill/layout.py)."""
        return RunLayout(self.out_dir, teacher_path=self.teacher.path, cache_path=self.cache.dir,
                         tokenizer_path=self.data.tokenizer.path)


TeacherConfig.model_rebuild()


def _can_be_on(share: ScheduleConfig | None) -> bool:
    if share is None:
        return False
    return not (share.kind == "constant" and share.start == 0.0)


def _check_on_policy(cfg: "RunConfig") -> None:
    """On-policy steps need a teacher model in the loop to score fresh samples."""
    if not cfg.on_policy_active:
        return
    if cfg.train.mode != "online":
        raise ValueError("train.on_policy.share: on-policy steps need the teacher to score the students' own "
                         "samples, which a cache cannot; set train.mode: online, or share: constant 0")
    if cfg.cache.estimator != "topk" and cfg.train.online_dense is not True:
        raise ValueError("train.on_policy: on-policy steps use a top-k (or dense) teacher signal; set "
                         "cache.estimator: topk or train.online_dense: true")


def _auto_estimator(cfg: "RunConfig") -> tuple[str, str]:
    """cache.estimator: auto -> (`sampled` or `topk`, why).  Draws wherever every student can
    learn from them: bench/peer.py (BENCHMARKS.md) measured random-init students from a top-64
    cache at 1.7-2.2x the held-out perplexity of the whole distribution, and from 256 draws at
    1.00-1.03x.  Else the top-k, and `why` names the key that needs it."""
    from losses import DIVERGENCES  # the registry says which divergences draws estimate without bias

    if cfg.train.mode == "online":
        return "topk", ("train.mode is online: the teacher hands over its whole distribution or its top-k "
                        "(train.online_dense)")
    if cfg.teacher.source == "server":
        return "topk", "a server teacher returns its top-k log-probs only"
    for i, s in enumerate(cfg.students):
        if s.baseline:
            continue
        loss, where = s.loss, f"students.{i}.loss"
        divergence = DIVERGENCES.get(loss.divergence)
        if loss.tail in ("bucket", "renorm"):
            return "topk", f"{where}.tail is {loss.tail}"
        if divergence is None or not divergence.sampled:
            return "topk", f"{where}.divergence {loss.divergence} is not estimated without bias from draws"
        if loss.temperature != cfg.cache.sample_temperature:
            return "topk", (f"{where}.temperature {loss.temperature:g} differs from cache.sample_temperature "
                            f"{cfg.cache.sample_temperature:g}")
        if loss.hard_target == "teacher_argmax":
            return "topk", f"{where}.hard_target is teacher_argmax"
        if loss.adaptive == "confidence":
            return "topk", f"{where}.adaptive is confidence"
    return "sampled", "every student can learn from draws"


def _check_estimator(where: str, student: StudentConfig, cache: CacheConfig) -> None:
    """A student's loss must fit the signal the cache (or the online teacher) gives."""
    if student.baseline:
        return
    loss = student.loss
    if cache.estimator == "topk" and loss.tail == "sampled":
        raise ValueError(f"{where}.tail: 'sampled' needs cache.estimator: sampled (the cache keeps the top-k)")
    if cache.estimator == "sampled":
        if loss.tail != "sampled":
            raise ValueError(f"{where}.tail: must be 'sampled' with cache.estimator: sampled (got {loss.tail!r})")
        if loss.temperature != cache.sample_temperature:
            raise ValueError(f"{where}.temperature: {loss.temperature:g} but the teacher's tokens are drawn at "
                             f"cache.sample_temperature {cache.sample_temperature:g}; make them equal")
        if loss.hard_target == "teacher_argmax":
            raise ValueError(f"{where}.hard_target: teacher_argmax needs a top-k cache; use labels")
        if loss.adaptive == "confidence":
            raise ValueError(f"{where}.adaptive: confidence needs a top-k cache (sampled tokens do not give the "
                             f"teacher's top-1 probability); use entropy, disagreement or none")


def _format_error(err: dict) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; distill/config.py lists every key)"
    if err["type"] == "string_type" and isinstance(err.get("input"), bool):  # `name: off`, YAML 1.1's boolean
        msg += f" (YAML reads an unquoted on/off/yes/no/true/false as {err['input']}; quote the word)"
    if not err["loc"] and re.match(r"[\w.]+: ", msg):  # a check across keys, which names its key itself
        return msg
    return f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {msg}"


def parse_config(raw: dict, source: str = "config", overridden: tuple[str, ...] = ()) -> RunConfig:
    """overridden: the dotted keys given with --set, so an error in one is blamed on --set,
    not on the file."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        # Every refused key, one line each (a second typo is not found only after the first is
        # fixed), up to a screenful.
        shown = 8
        lines = [f"{_blame(source, '.'.join(str(p) for p in err['loc']), overridden)}: {_format_error(err)}"
                 for err in e.errors()[:shown]]
        if e.error_count() > shown:
            lines.append(f"(+{e.error_count() - shown} more)")
        raise UserError("\n  ".join(lines)) from None


def _blame(source: str, where: str, overridden: tuple[str, ...]) -> str:
    """Who wrote the key `where` that a check refused: "--set" when a --set gave it (or a
    key above it), "FILE with --set K" for a check over several keys of which --set gave
    some, else the file."""
    if where and any(where == k or where.startswith(f"{k}.") for k in overridden):
        return "--set"
    # a key above some --set keys (a check across keys at the top level: all of them)
    inside = [k for k in overridden if not where or k.startswith(f"{where}.")]
    return f"{source} with --set {', '.join(inside)}" if inside else source


# DeepSpeed at stage 0 reports no global grad norm with a plain optimiser, so a non-finite step
# cannot be told from a good one (and is applied).
STAGE_0 = ("DeepSpeed reports no grad norm at stage 0, so non-finite steps would go unnoticed; use "
           "train.engine: torch for plain data parallelism (DDP), or a ZeRO stage 1-3")


def check_config(cfg: RunConfig, source: str = "config", overridden: tuple[str, ...] = ()) -> RunConfig:
    """The checks only the registries below can make: every divergence, preset and
    soft-weight schedule named in `cfg` exists and builds.  Raises UserError naming the key,
    and blaming --set for the keys in `overridden` (as parse_config does)."""
    from losses import DIVERGENCES, build_schedule
    from students.presets import PRESETS

    def src(where: str) -> str:
        return _blame(source, where, overridden)

    def known(where: str, kind: str, name: str, registry) -> None:
        if name not in registry:
            raise UserError(f"{src(where)}: {where}: unknown {kind} {name!r}; choose one of {', '.join(sorted(registry))}")

    if cfg.train.precision == "fp16":  # never silently something else (fp32 under DeepSpeed, say)
        raise UserError(f"{src('train.precision')}: train.precision=fp16 is refused: it needs loss scaling, which this toolkit does "
                        f"not apply (gradients would underflow); use bf16 (or fp32)")
    if cfg.train.engine == "deepspeed" and cfg.train.zero_stage == 0 and cfg.train.deepspeed_config is None:
        raise UserError(f"{src('train.zero_stage')}: train.zero_stage: 0 is refused with engine: deepspeed: {STAGE_0}")
    models = [("teacher.model", cfg.teacher.model)] + [(f"students.{i}.model", s.model) for i, s in enumerate(cfg.students)]
    for where, model in models:
        if model is not None and model.preset is not None:
            known(f"{where}.preset", "preset", model.preset, PRESETS)
    for i, s in enumerate(cfg.students):
        if s.model.path is not None and s.init == "teacher":
            raise UserError(f"{src(f'students.{i}.init')}: students.{i}.init: 'teacher' would overwrite the "
                            f"pretrained weights of model.path; use init: random (the default) or model.from_teacher")
        if cfg.teacher.source == "server" and (s.model.from_teacher is not None or s.init == "teacher"):
            raise UserError(f"{src(f'students.{i}')}: students.{i}: from_teacher and init: teacher need the teacher's "
                            f"weights, but teacher.source is 'server'; use model.preset or model.path")
        if s.model.from_teacher is not None and cfg.teacher.source == "cache":
            raise UserError(f"{src(f'students.{i}.model.from_teacher')}: students.{i}.model.from_teacher needs the "
                            f"teacher's dir, but teacher.source is 'cache'; set teacher.source: checkpoint and teacher.path")
        known(f"students.{i}.loss.divergence", "divergence", s.loss.divergence, DIVERGENCES)
        if s.loss.tail == "sampled" and not s.baseline and not DIVERGENCES[s.loss.divergence].sampled:
            raise UserError(f"{src(f'students.{i}.loss.divergence')}: students.{i}.loss.divergence: "
                            f"{s.loss.divergence!r} cannot be estimated without bias from sampled teacher tokens; use "
                            f"forward_kl or cache.estimator: topk")
        try:
            build_schedule(s.loss.soft_weight.as_dict())
        except ValueError as e:
            raise UserError(f"{src(f'students.{i}.loss.soft_weight')}: students.{i}.loss.soft_weight: {e}") from None
        share = cfg.on_policy_share(i)
        if share is not None:
            try:
                build_schedule(share.as_dict())
            except ValueError as e:
                where = f"students.{i}.on_policy_share" if s.on_policy_share is not None else "train.on_policy.share"
                raise UserError(f"{src(where)}: {where}: {e}") from None
    for where, model in models:
        if model is not None and model.preset is not None:  # a dir or the teacher's shape is checked as it loads
            check_model(model, cfg.data.tokenizer.vocab_size, f"{src(f'{where}.args')}: {where}")
    return cfg


def check_model(model: ModelConfig, placeholder_vocab: int, where: str) -> None:
    """Build the preset's transformers config and instantiate the model on the meta device
    (no memory, milliseconds), so a bad size argument fails before any stage starts.

    The vocabulary is not known yet: the tokenizer may not exist before `prepare` trains
    it.  `args.vocab_size` if given, else `placeholder_vocab` (the BPE target size) stands
    in; it only sizes the embedding and lm_head, so no other argument's validity depends on
    it (the real size is checked against args.vocab_size when the model is built)."""
    from students.build import build_on_meta
    from students.presets import PRESETS, check_preset_args

    args = {"vocab_size": placeholder_vocab, **model.args}
    try:
        check_preset_args(model.preset, args)
    except ValueError as e:
        raise UserError(f"{where}.args.{e}; fix it in the config") from None
    try:
        build_on_meta(PRESETS[model.preset](**args))
    except Exception as e:  # any failure to build is this config's fault: name it, one line
        # A validator wraps the reason ("Class validation error for validator ...:\n    ValueError:
        # <the reason>") and raises from it: the cause's first line says it.
        cause = e.__cause__ if e.__cause__ is not None and str(e.__cause__).strip() else e
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        detail = (f"{type(cause).__name__}: {lines[0]}" if cause is not e else lines[0]) if lines else type(e).__name__
        raise UserError(f"{where}.args: the {model.preset} model cannot be built ({detail})") from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark):
        super().__init__(f"key {key!r} given twice")
        self.key, self.problem_mark = key, mark


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word, so a second `train:` block
    would silently drop the first; here it is an error naming the line."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _no_config_advice(path: Path, key: str) -> str:
    """What to do about a model dir without config.json: a PEFT adapter is the usual one."""
    if (path / "adapter_config.json").is_file():
        return (f"it is a PEFT adapter (adapter_config.json): merge it into its base model first (peft: "
                f"PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(DIR)) and set {key} to DIR")
    return "point it at a dir saved with save_pretrained"


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config; `overrides` maps dotted keys to values."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist; `distill init {path}` writes an example")
    if path.is_dir():
        raise UserError(f"config path {path} is a directory; pass the YAML file inside it")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise UserError(f"{path} line {e.problem_mark.line + 1}: {e}; keep one (the second would silently replace "
                        f"the first)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{path}{where}: not valid YAML ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    # Relative paths written in the file are relative to the file (out_dir too), as its
    # comments say; relative paths given with --set are relative to where the command runs.
    _resolve_paths(raw, path.parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    _resolve_paths(raw, Path.cwd())
    return parse_config(raw, str(path), tuple(overrides or ()))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists (a number indexes a list, e.g. students.0.optim.lr)."""
    node: Any = raw
    *parents, leaf = dotted.split(".")
    try:
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    except (ValueError, IndexError, TypeError, AttributeError):
        raise UserError(f"--set {dotted}: no such place in the config (list items are numbered from 0)") from None


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make the path keys of a raw config absolute against `base`, in place; a value of the
    wrong type is left for the schema to name."""
    def under(p: str) -> str:  # not normalised: "dir/.." must be the OS's (a symlinked dir's parent)
        return str(base / p)

    def fix(node, key: str) -> None:
        if isinstance(node, dict) and isinstance(node.get(key), (str, Path)) and not Path(node[key]).is_absolute():
            node[key] = under(node[key])

    def part(node, key: str):
        return node.get(key) if isinstance(node, dict) else None

    fix(raw, "out_dir")
    data = part(raw, "data")
    paths = part(data, "paths")
    if isinstance(paths, list):
        data["paths"] = [under(p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in paths]
    fix(part(data, "tokenizer"), "path")
    fix(part(raw, "teacher"), "path")
    fix(part(raw, "cache"), "dir")
    fix(part(raw, "train"), "deepspeed_config")
    for student in part(raw, "students") if isinstance(part(raw, "students"), list) else []:
        fix(part(student, "model"), "path")


def _dir_or_absent(key: str, path: Path | None) -> None:
    """`path` is (or will become) a directory: neither it nor an ancestor may be a file."""
    for p in [path, *path.parents] if path is not None else []:
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"lies under the file {p}"
            raise UserError(f"{key}: {path} {where}; it must be a directory, choose another path")


def check_inputs_exist(cfg: RunConfig) -> None:
    """Missing files fail before any work starts, naming the key; output dirs must not be
    files (a `NotADirectoryError` deep in a stage would come too late and as a traceback)."""
    _dir_or_absent("out_dir", cfg.out_dir)
    _dir_or_absent("cache.dir", cfg.cache.dir)
    if cfg.teacher.source == "preset":
        _dir_or_absent("teacher.path", cfg.teacher.path)
    for i, p in enumerate(cfg.data.paths):
        if not set("*?[").intersection(str(p)) and not p.exists():  # a glob is checked when expanded
            raise UserError(f"data.paths[{i}]: {p} does not exist")
    if cfg.data.tokenizer.path is not None and not cfg.data.tokenizer.path.is_dir():
        raise UserError(f"data.tokenizer.path: {cfg.data.tokenizer.path} is not a directory")
    if cfg.teacher.source == "server" and cfg.data.tokenizer.path is None:
        raise UserError("data.tokenizer.path: required when teacher.source is 'server' (a local copy of the "
                        "served model's tokenizer; the server's is checked against it before any work)")
    if cfg.teacher.source == "checkpoint":
        if cfg.teacher.path is None:
            raise UserError("teacher.path: required when teacher.source is 'checkpoint'")
        if not cfg.teacher.path.is_dir():
            raise UserError(f"teacher.path: {cfg.teacher.path} is not a directory")
    models = [("students.%d.model.path" % i, s.model.path) for i, s in enumerate(cfg.students)]
    if cfg.teacher.source == "checkpoint":
        models.insert(0, ("teacher.path", cfg.teacher.path))
    for key, path in models:
        if path is not None and not (path / "config.json").is_file():
            raise UserError(f"{key}: {path} is not a Hugging Face model dir (no config.json); "
                            f"{_no_config_advice(path, key)}")
    for key, path in models:
        limit, rotary = max_positions(path) if path is not None else (None, False)
        if limit is None or cfg.data.seq_len <= limit:
            continue
        said = f"data.seq_len {cfg.data.seq_len} is longer than the {limit} positions {key} {path} was made for"
        if not rotary:  # a learned position embedding has no row for position `limit`: an index error later
            raise UserError(f"{said} (its config.json); lower data.seq_len to {limit} or less")
        print(f"[config] note: {said}; its rotary positions run on past them, untrained (add rope_scaling to "
              f"its config.json to stretch them)", file=sys.stderr, flush=True)
    if cfg.train.deepspeed_config is not None and not cfg.train.deepspeed_config.is_file():
        raise UserError(f"train.deepspeed_config: {cfg.train.deepspeed_config} does not exist")
    if cfg.train.engine == "deepspeed" and cfg.train.deepspeed_config is not None:
        _check_deepspeed_json(cfg.train, cfg.students)


def deepspeed_bf16(train: TrainConfig) -> bool:
    """Whether train.precision asks DeepSpeed for bf16 (auto: on a GPU)."""
    import torch

    return train.precision == "bf16" or (train.precision == "auto" and torch.cuda.is_available())


def _check_deepspeed_json(train, students) -> None:
    """The ds_config JSON and the YAML must not disagree on what both can say: a JSON stage
    silently beat `--set train.zero_stage=3`, its bf16 silently made a CPU run's weights
    bf16 (train.precision auto is fp32 there), and its gradient_clipping silently beat a
    student's optim.grad_clip."""
    ds = train.deepspeed_config
    try:
        raw = json.loads(ds.read_text())
        zero = raw.get("zero_optimization", {})
        bf16 = raw.get("bf16", {}).get("enabled")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"train.deepspeed_config: {ds} is not a JSON object ({type(e).__name__}: {e})") from None
    clip = raw.get("gradient_clipping")
    for i, sc in enumerate(students):
        if clip is not None and "grad_clip" in sc.optim.model_fields_set and sc.optim.grad_clip != clip:
            raise UserError(f"students.{i}.optim.grad_clip is {sc.optim.grad_clip:g} but train.deepspeed_config {ds} "
                            f"sets gradient_clipping {clip}; set it in one place (remove it from the JSON to let "
                            f"each student's optim.grad_clip choose)")
    stage = zero.get("stage", train.zero_stage)
    if stage == 0:
        raise UserError(f"train.deepspeed_config: {ds}: zero_optimization.stage 0 is refused: {STAGE_0}")
    if "zero_stage" in train.model_fields_set and stage != train.zero_stage:
        raise UserError(f"train.zero_stage is {train.zero_stage} but train.deepspeed_config {ds} sets "
                        f"zero_optimization.stage {stage}; set the stage in one place (remove it from the JSON to "
                        f"let train.zero_stage choose)")
    if bf16 is not None and bool(bf16) != deepspeed_bf16(train):
        auto = " (auto: fp32 without a GPU)" if train.precision == "auto" else ""
        raise UserError(f"train.deepspeed_config {ds} sets bf16.enabled {str(bool(bf16)).lower()} but train.precision "
                        f"is {train.precision}{auto}; set train.precision: {'bf16' if bf16 else 'fp32'}, or remove "
                        f"bf16 from the JSON to let train.precision choose")


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
_ROTARY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct", "rotary_emb_base")


def max_positions(model_dir: Path) -> tuple[int | None, bool]:
    """(the longest sequence a Hugging Face model dir's config.json declares, whether its
    positions are rotary) of its text config, for a multimodal one.  A rope_scaling factor
    stretches the declared length; (None, False) when it declares none or cannot be read."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None, False
    for node in (config.get("text_config"), config) if isinstance(config, dict) else ():
        for key in _POSITION_KEYS if isinstance(node, dict) else ():
            if isinstance(node.get(key), int) and node[key] > 0:
                rotary = any(k in node for k in _ROTARY_KEYS)
                scaling = node.get("rope_scaling") or node.get("rope_parameters") or {}
                factor = scaling.get("factor") if isinstance(scaling, dict) else None
                base = scaling.get("original_max_position_embeddings") if isinstance(scaling, dict) else None
                length = int(factor * (base or node[key])) if isinstance(factor, (int, float)) and factor > 1 else node[key]
                return length, rotary
    return None, False


def write_example_config(path: Path, force: bool = False) -> None:
    """`distill init`: the commented example beside this module, written atomically."""
    from common.fsutil import atomic_write_text

    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it")
    atomic_write_text(path, (Path(__file__).parent / "example_config.yaml").read_text())
