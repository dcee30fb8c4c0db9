"""The one exception type users see: a one-line message naming the problem and the fix."""


class NetmorphError(Exception):
    """A problem with the user's input or environment. The CLI prints `error: <message>` and exits 2."""
