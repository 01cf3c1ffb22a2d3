"""Orchestration: config, data, cache, the co-distillation loop, export, eval, report."""
import os

# Our own progress bars (rich) and one-line errors replace the libraries' chatter.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads at run time, ever
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
