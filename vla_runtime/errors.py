"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (unknown name, wrong shape, missing file). The message says what to do."""


class AssetError(UserError):
    """A simulator asset, checkpoint or GL backend is missing."""
