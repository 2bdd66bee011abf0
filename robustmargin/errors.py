"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a flag, a config key or value, a missing or corrupt file."""
