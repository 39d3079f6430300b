"""The project's one exception hierarchy.

Every error the product raises on purpose derives from :class:`MtlsMilterError`. Anything else
that escapes into a protocol front end is, by definition, a bug: the front ends map it to
``temperror`` (never ``fail``), so a defect can never turn into a rejection.
"""

from __future__ import annotations


class MtlsMilterError(Exception):
    """Base class of every error mtls-milter raises deliberately."""


class StartupError(MtlsMilterError):
    """A service (the milter daemon, the socketmap service) cannot start; the message says why."""


class InputError(MtlsMilterError, ValueError):
    """Outside input (a macro, a record, a certificate, a request) cannot be used."""
