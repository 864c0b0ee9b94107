"""User-facing errors: the CLI and the server turn these into one-line messages, never tracebacks."""


class LeapError(ValueError):
    """Bad input from a user: a wrong argument, a missing or malformed file, a prompt too long."""
