"""Errors meant for the user: one sentence naming the problem and the fix."""


class UserError(Exception):
    """Bad input or environment; the CLI prints the message alone and exits with status 2."""
