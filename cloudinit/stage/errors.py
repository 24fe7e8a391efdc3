"""One base for every staging failure, so the CLI can print it as one line."""


class StageError(Exception):
    """A staging step failed before anything was uploaded or launched.

    The message is one line that names what is missing or wrong and, where
    there is one, the limit or the fix, because the CLI prints it as it is.
    """
