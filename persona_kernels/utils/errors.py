"""One format for every error the public API raises: ``persona_kernels.<fn>: argument '<arg>': <what>``."""

from __future__ import annotations

from typing import NoReturn, Optional


def message(fn: str, msg: str, arg: Optional[str] = None) -> str:
    """``persona_kernels.<fn>: [argument '<arg>': ]<msg>``."""
    where = f"persona_kernels.{fn}" if not fn.startswith("persona_kernels") else fn
    return f"{where}: argument '{arg}': {msg}" if arg else f"{where}: {msg}"


def fail(fn: str, arg: Optional[str], msg: str, exc: type[Exception] = ValueError) -> NoReturn:
    """Raise ``exc`` with :func:`message`."""
    raise exc(message(fn, msg, arg))


def check_gamma(fn: str, gamma, *, arg: str = "gamma", allow_none: bool = False) -> Optional[float]:
    """Validate a soft-gate value: a finite real number in [0, 1] (bool rejected); returns it as float."""
    if gamma is None and allow_none:
        return None
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        fail(fn, arg, f"expected a float in [0, 1]{' or None' if allow_none else ''}, got {type(gamma).__name__}",
             TypeError)
    value = float(gamma)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        fail(fn, arg, f"expected a float in [0, 1], got {gamma}")
    return value
