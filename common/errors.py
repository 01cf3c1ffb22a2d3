"""Errors a user can fix. The CLI prints their message as one line and exits 2."""


import sys


def resume_hint() -> str:
    """How to go on with the command this process runs: `distill train` needs --resume, every
    other command (`distill run` too) resumes when run again."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    return "rerun it with --resume" if command == "train" else "rerun the same command"


def interrupted_line() -> str:
    """What a command stopped by Ctrl-C or SIGTERM says (exit 130): every stage writes atomically
    and resumes, so nothing is lost."""
    return f"interrupted: what was written is kept; {resume_hint()} to resume"


class UserError(Exception):
    """Bad input or a state the user must resolve: what is wrong, where, what to do."""

    exit_code = 2
