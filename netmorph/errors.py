"""The one exception type users see: a one-line message naming the problem and the fix."""


class NetmorphError(Exception):
    """A problem with the user's input or environment. The CLI prints `error: <message>` and exits 2."""


class VerificationFailed(Exception):
    """An exact conversion whose proof failed: the checkpoint was written (and its model card says FAILED), but it
    does not compute the source model's function. The CLI prints the reports and a last line `FAILED: <what>`, and
    exits 1. `result` is the command's result object (output_dir, reports)."""

    def __init__(self, what: str, result):
        super().__init__(what)
        self.result = result
