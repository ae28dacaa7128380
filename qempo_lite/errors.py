"""One exception type for bad input the user can fix; the CLI prints it as one line."""


class QempoError(ValueError):
    """A problem with the user's input (config, data, adapter, missing extra).

    The message names the problem and the fix, in one line. The CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """


def missing_extra(module: str, extra: str, hint: str = "") -> QempoError:
    """The error for an optional dependency that is not installed."""
    suffix = f" ({hint})" if hint else ""
    return QempoError(f"{module} is not installed: pip install 'qempo-lite[{extra}]'{suffix}")
