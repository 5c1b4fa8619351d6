"""Integer and boolean settings from environment variables, for the S3 configuration and the operator.

One parser so that every variable of the product takes the same spellings (`1/true/yes/on`,
`0/false/no/off`, a whole number within its range) and fails the same way: a message that names the
variable and what to set it to. The caller picks the exception through `error`, called as
`error(message, field=name)`: the S3 configuration raises StorageAccessDenied (a builder exit code),
the operator its ConfigError (a start-up failure); the contract imports neither plane.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, overload

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ErrorFactory(Protocol):
    """An exception class (or factory) taking the message and the variable's name as `field`."""

    def __call__(self, message: str, *, field: str) -> Exception: ...


@overload
def env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int, *, error: ErrorFactory) -> int: ...
@overload
def env_int(env: Mapping[str, str], name: str, default: None, lo: int, hi: int,
            *, error: ErrorFactory) -> int | None: ...
def env_int(env: Mapping[str, str], name: str, default: int | None, lo: int, hi: int,
            *, error: ErrorFactory) -> int | None:
    """`env[name]` as a whole number in lo..hi; `default` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error(f"{name}={raw!r} is not an integer; set it to a whole number in {lo}..{hi}", field=name) from None
    if not lo <= value <= hi:
        raise error(f"{name}={value} is out of range; set it to a whole number in {lo}..{hi}", field=name)
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool, *, error: ErrorFactory) -> bool:
    """`env[name]` as a boolean; `default` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise error(f"{name}={raw!r} is not a boolean; use true or false (1 or 0)", field=name)
