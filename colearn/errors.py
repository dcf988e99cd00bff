"""The one exception type for user mistakes; the CLI prints it as one line."""


class ColearnError(Exception):
    """A mistake the user can fix: the message names the field and the fix."""
