"""Errors a user can fix. The CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """Bad input or a state the user must resolve: what is wrong, where, what to do."""

    exit_code = 2
