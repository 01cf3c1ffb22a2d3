"""Errors a user can fix. The CLI prints their message as one line and exits 2."""


# What a command stopped by Ctrl-C or SIGTERM says (exit 130): every stage writes atomically
# and resumes, so nothing is lost.
INTERRUPTED = "interrupted: what was written is kept; rerun the same command to resume (`distill train` needs --resume)"


class UserError(Exception):
    """Bad input or a state the user must resolve: what is wrong, where, what to do."""

    exit_code = 2
