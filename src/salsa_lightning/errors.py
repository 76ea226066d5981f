"""The one exception type a user sees.

A `SalsaError` carries one sentence that names the problem and the fix. The CLI prints it (no
traceback) and exits with status 2; library code raises it for anything the user can correct:
bad paths, wrong fields, incompatible checkpoints, NaNs.
"""


class SalsaError(Exception):
    """A problem the user can fix; `str(err)` is the sentence shown to them."""
