"""The one exception type a user sees.

A `SalsaError` carries one sentence that names the problem and the fix. The CLI prints it (no
traceback) and exits with status 2; library code raises it for anything the user can correct:
bad paths, wrong fields, incompatible checkpoints, NaNs.
"""


class SalsaError(Exception):
    """A problem the user can fix; `str(err)` is the sentence shown to them."""


def user_error(exc: BaseException) -> SalsaError | None:
    """The SalsaError behind `exc`, if any: jsonargparse (and other libraries) wrap errors raised inside them."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SalsaError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def require(ok: bool, field: str, value, wanted: str, example) -> None:
    """A config check: unless `ok`, one sentence naming `field` as the user writes it, what it must be and a value
    that works (raised where the config is parsed, before any work)."""
    if not ok:
        raise SalsaError(f"`{field}` must be {wanted} (got {value!r}); set it to e.g. {example}.")
