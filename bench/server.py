"""Teacher tokens/s: a vLLM server (teachers/server.py) against the in-process teacher
(teachers/live.py) on the same model, the same blocks and the same top-k.  Prints JSON.

    python bench/server.py --vllm-python .make/vllm-venv/bin/python [--hidden 256 --layers 4 ...]

The model is a random stock-transformers Llama saved to a temp dir; the server runs with
--skip-tokenizer-init (random token ids need no tokenizer; the run's handshake is not timed).
Both sides get the same CPU cores, so on one machine the figure compares the two teachers'
overheads; on a real deployment the server is on other machines and the trainer pays only
HTTP and parsing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teachers.live import LiveTeacher, load_teacher_model  # noqa: E402
from teachers.server import ServerTeacher  # noqa: E402


def build_model(out: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                      max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(str(out))


def serve(python: str, model: Path, max_len: int, k: int, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", "bench",
           "--dtype", "float32", "--max-model-len", str(max_len), "--max-logprobs", str(k), "--enforce-eager",
           "--gpu-memory-utilization", "0.25", "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit(f"vLLM server did not start; see {log}")


def timed(fn, blocks: torch.Tensor, batch: int) -> float:
    """Tokens/s of fn over (N, T+1) blocks in batches (one warm-up batch first, untimed)."""
    x, t = blocks[:, :-1], blocks[:, 1:]
    fn(x[:batch], t[:batch])
    start = time.perf_counter()
    for i in range(0, len(blocks), batch):
        fn(x[i:i + batch], t[i:i + batch])
    return x.numel() / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=".make/vllm-venv/bin/python")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    build_model(work / "model", args.hidden, args.layers, args.vocab)
    blocks = torch.randint(0, args.vocab, (args.blocks, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    live = LiveTeacher(load_teacher_model(work / "model"), args.k, args.vocab, torch.device("cpu"))
    result = {"model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                        "params": sum(p.numel() for p in live.model.parameters())},
              "seq_len": args.seq_len, "blocks": args.blocks, "k": args.k, "torch_threads": torch.get_num_threads()}
    for b in args.batch:
        result[f"in_process_tokens_per_s_batch{b}"] = round(timed(live.topk, blocks, b))
    del live
    proc, url = serve(args.vllm_python, work / "model", args.seq_len + 2, args.k, work / "vllm.log")
    try:
        remote = ServerTeacher(url, "bench", args.k, args.vocab, max_inflight_tokens=1 << 20)
        for b in args.batch:
            result[f"server_tokens_per_s_batch{b}"] = round(timed(remote.topk, blocks, b))
        remote.close()
    finally:
        proc.kill()
        proc.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
