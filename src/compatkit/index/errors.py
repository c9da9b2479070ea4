"""Errors of the index beyond ``compatkit.errors``; the service maps each kind to one status."""

from __future__ import annotations

from compatkit.errors import CompatkitError


class StateConflictError(CompatkitError):
    """The request is valid but conflicts with the current state (a name taken, a job running).

    The service answers 409; nothing was changed.
    """
