"""The one exception type for user mistakes: the CLI prints its message as a single line and exits 2."""


class MQSAM2Error(Exception):
    """A problem with the user's input (file, config, checkpoint, data); the message names it and the fix."""
