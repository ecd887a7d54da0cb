"""The errors a stage run ends with, reduced to one line a person can act on.

Ray wraps an exception raised in a task, actor or Train worker in several layers
(``RayTaskError`` -> ``UserCodeException`` -> the original); its text is the whole remote traceback
plus Ray's retry advice. ``root_cause`` unwraps to the exception our code raised, whose message
names the file, line or field; ``StageFailed`` puts that on one line with the stage's name and the
log file that holds the full trace.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional, TypeVar

E = TypeVar("E", bound=BaseException)

# Types whose message says everything; others are named ("KeyError: 'x'").
_SELF_EXPLAINING = (ValueError, FileNotFoundError, PermissionError, TimeoutError)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: follows Ray's ``.cause`` and Python's ``__cause__`` chains."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if isinstance(inner, BaseException):
            exc = inner
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def find_error(exc: BaseException, cls: type[E]) -> Optional[E]:
    """A ``cls`` error behind a Ray / Ray Data exception chain (Ray's ``.cause``, ``__cause__``,
    ``__context__``), re-created with the first line of its message; else one named in the text of
    a remote trace (Ray Data's UserCodeException loses the chain on the way to the driver). None
    when there is none. Stages use it to re-raise their own input errors without Ray's wrapping."""
    seen: set[int] = set()
    stack: list[Optional[BaseException]] = [exc]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, cls):
            return cls(str(x.args[0] if x.args else x).split("\n")[0])
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    found = re.search(rf"{cls.__name__}: ([^\n]+)", str(exc))
    return cls(found.group(1)) if found else None


@contextmanager
def unwrapped(*classes: type[BaseException]) -> Iterator[None]:
    """Inside: an error of one of ``classes`` that Ray wrapped (see ``find_error``) is re-raised as
    itself, so the stage's one-line error names the file, row or field, not Ray's layers."""
    try:
        yield
    except classes:
        raise
    except Exception as e:
        for cls in classes:
            bad = find_error(e, cls)
            if bad is not None:
                raise bad from None
        raise


def _last_error_line(exc: BaseException) -> str:
    """The last ``SomeError: message`` line of a remote traceback embedded in a Ray error's text."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        for ln in reversed(lines):
            head = ln.split(":", 1)[0]
            if ":" in ln and head.replace(".", "").isidentifier() and head.endswith(("Error", "Exception")) \
                    and not head.endswith("UserCodeException"):
                return ln.split(":", 1)[1].strip() if head.endswith(("ValueError", "BadInputError")) else ln
        nxt = getattr(exc, "cause", None)
        exc = nxt if isinstance(nxt, BaseException) else exc.__cause__
    return ""


def one_line(exc: BaseException) -> str:
    """The first line of the root cause's message (its type too when the message is bare)."""
    cause = root_cause(exc)
    if type(cause).__name__ == "UserCodeException":  # Ray Data's wrapper; the cause's text is in the trace
        found = _last_error_line(exc)
        if found:
            return found
    text = str(cause).strip()
    # A Ray wrapper that could not be unwrapped: its first line is "ray::Task() (pid=..)"; the
    # original message is the last line of the embedded traceback.
    if text.startswith("ray::") and "\n" in text:
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(cause, _SELF_EXPLAINING) and first:
        return first
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


class StageFailed(RuntimeError):
    """A stage raised. ``str()`` is the one console line; ``cause`` the original exception."""

    def __init__(self, stage: str, cause: BaseException, log_path: Optional[str] = None):
        line = f"stage '{stage}' failed: {one_line(cause)}"
        if log_path:
            line += f" (full trace in {log_path})"
        super().__init__(line)
        self.stage = stage
        self.cause = cause
        self.log_path = log_path
