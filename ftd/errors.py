"""User-facing errors: each names the field or file at fault and what was expected."""

from __future__ import annotations


class FtdError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits non-zero."""


class ConfigError(FtdError):
    """The configuration (YAML, overrides, or the inputs it names) is invalid."""


class GateFailed(FtdError):
    """An engine did not answer like its PyTorch reference; nothing was registered."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
