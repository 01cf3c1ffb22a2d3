"""After training: what the students became.

report.py   `distill eval`: teacher and students on held-out blocks -> report.json/.md
plots.py    curves.png, schedule.png, expert_load.png
export.py   a checkpoint -> a stock Hugging Face model dir with a model card
generation.py  held-out prompts completed greedily by teacher and students (chat data)
inspect.py  `distill inspect`: describe and verify a cache, checkpoint or model dir
"""
