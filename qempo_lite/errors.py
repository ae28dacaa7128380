"""One exception type for bad input the user can fix; the CLI prints it as one line."""


class QempoError(ValueError):
    """A problem with the user's input (config, data, adapter, missing extra).

    The message names the problem and the fix, in one line. The CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """


def not_a_file(path) -> str:
    """Why ``path`` cannot be read as a file: "is a directory" or "not found" (for a one-line error)."""
    import os

    return "is a directory, not a file" if os.path.isdir(path) else "not found"


def missing_extra(module: str, extra: str, hint: str = "") -> QempoError:
    """The error for an optional dependency that is not installed."""
    suffix = f" ({hint})" if hint else ""
    return QempoError(f"{module} is not installed: pip install 'qempo-lite[{extra}]'{suffix}")


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` for a message, bounded however large or deeply shared ``value`` is."""
    import reprlib

    shortened = reprlib.Repr()  # keyword arguments only from Python 3.12
    shortened.maxlevel, shortened.maxstring, shortened.maxother, shortened.maxlong = 2, limit, limit, 40
    shortened.maxlist = shortened.maxtuple = shortened.maxdict = shortened.maxset = 4
    return shortened.repr(value)[: limit + 20]


def one_line(err: BaseException | str, *, lines: int = 1, limit: int = 300) -> str:
    """A message on one line: the first ``lines`` non-empty lines of ``err`` joined, at most ``limit`` characters
    (the exception's type name when it has no message)."""
    kept = [line.strip() for line in str(err).strip().splitlines() if line.strip()][:lines]
    text = " ".join(kept)[:limit]
    return text or (type(err).__name__ if isinstance(err, BaseException) else "no message")
