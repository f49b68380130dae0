"""The one exception type that the CLI turns into a single line and exit code 2, and how an
exception raised inside a user's own code (a ``python:`` model's module) is told from ours."""
from __future__ import annotations

from pathlib import Path

# Our own top-level packages: their frames are never the user's, whatever a reference names.
OWN_PACKAGES = ("compress", "calibration", "export", "runtimes")
# The user's packages (top-level names) -> the python: reference that brought each in.
_USER_PACKAGES: dict[str, str] = {}


class UserError(Exception):
    """Bad input from the user: a wrong reference, a missing file, an invalid setting."""


def did_you_mean(value, choices, prefix: str = "", cutoff: float = 0.6) -> str:
    """"; did you mean 'X'?" for the closest of ``choices`` to a mistyped ``value``, or ""."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def unknown_choice(what: str, value, choices) -> UserError:
    """The error for a name that is not one of ``choices``: the closest one, and all of them."""
    return UserError(f"unknown {what} {value!r}{did_you_mean(value, choices)} (expected one of {', '.join(map(str, choices))})")


def register_user_code(module_name: str, reference: str) -> None:
    """Marks the package of ``module_name`` (all of it: a model is often defined beside its factory)
    as the user's code, loaded for ``reference``; `user_code_error` recognises its frames."""
    package = module_name.split(".")[0]
    if package and package not in OWN_PACKAGES:
        _USER_PACKAGES.setdefault(package, reference)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _user_frame(e: BaseException):
    """(reference, file, line) of the innermost frame of ``e``'s traceback that runs the user's code, or None."""
    found, tb = None, e.__traceback__
    while tb is not None:
        package = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if package in _USER_PACKAGES:
            found = (_USER_PACKAGES[package], tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def user_code_error(e: BaseException) -> UserError | None:
    """A one-line `UserError` for an exception that was raised inside (or below) a user's ``python:``
    module, naming the reference, the exception and the user's line; None when it is not theirs.
    An exception that a library raised from the user's (``raise ... from``) is followed to it; one raised
    while handling the user's (an implicit ``__context__``) is not: that may be a bug of ours."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        frame = _user_frame(e)
        if frame is not None:
            reference, file, line = frame
            try:
                file = str(Path(file).resolve().relative_to(Path.cwd()))
            except ValueError:
                pass
            return UserError(f"{reference}: the model's code raised {first_line(e)} ({file}, line {line})")
        e = e.__cause__
    return None
