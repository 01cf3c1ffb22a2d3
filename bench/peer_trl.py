"""One student distilled by TRL's GKDTrainer (run by bench/peer.py in TRL's own venv; TRL is
never a dependency of this project).  Off-policy KD on the data's completions (lmbda 0),
forward KL (beta 0), the teacher's full distribution at every step, loss on the assistant's
tokens only (TRL's DataCollatorForChatML).  Prints one JSON line: wall seconds of the
training, steps, teacher forwards.

    python bench/peer_trl.py --student DIR --teacher DIR --data train.jsonl --out DIR \
        --lr 3e-3 --batch-size 4 --warmup-steps 5 --max-length 256 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("student", "teacher", "data", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--warmup-steps", type=int, required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    rows = load_dataset("json", data_files=a.data, split="train")
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
    forwards = [0]
    teacher.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    args = GKDConfig(
        output_dir=a.out, per_device_train_batch_size=a.batch_size, num_train_epochs=1, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, adam_beta1=0.9,
        adam_beta2=a.beta2, max_grad_norm=a.grad_clip, lmbda=0.0, beta=0.0, max_length=a.max_length,
        seed=a.seed, report_to=[], save_strategy="no", logging_steps=10, use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_dropout=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows, processing_class=tok)
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model(a.out)
    tok.save_pretrained(a.out)
    print(json.dumps({"train_s": wall, "steps": out.global_step, "teacher_forwards": forwards[0],
                      "train_loss": out.training_loss}))


if __name__ == "__main__":
    main()
