"""What can be wrong with a volume store, as exception types the command line maps to exit codes.

StoreError and its subclasses are ValueErrors: bad input (exit 2) with a one-line message naming
the store and what to do. StoreLockedError is a RuntimeError: the store is busy (exit 3).
"""

from __future__ import annotations

__all__ = ["StoreError", "StoreLockedError", "StoreIntegrityError", "ScanNotFoundError"]


class StoreError(ValueError):
    """A path that is not a usable volume store."""


class StoreLockedError(RuntimeError):
    """Another conversion is writing this store."""


class StoreIntegrityError(StoreError):
    """Stored data that is missing or does not match its checksums; the message names store, scan and path."""


class ScanNotFoundError(StoreError, KeyError):
    """A scan id the store does not hold (a KeyError too, for callers that look ids up)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
