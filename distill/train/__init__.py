"""Training: the co-distillation loop and what it drives.

loop.py        `train_loop`: one teacher signal per micro-batch, every student steps on it
loop_config.py `LoopConfig`, what the loop is told, and the run hash
student.py     a `Student`: model, engine, loss recipe and its `train_step`
engines.py     the `Engine` protocol: plain torch, or one DeepSpeed engine per student
setup.py       config -> students, engines and the loop's settings
checkpoint.py  crash-safe step dirs, exact resume
metrics.py     metrics.jsonl (+ TensorBoard)
validate.py    held-out metrics during training and for the report
selection.py   data views: which blocks each student reads, by the teacher's difficulty
on_policy.py   on-policy steps: students sample, one teacher forward scores every sample
"""
