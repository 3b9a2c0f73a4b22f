"""Errors meant for the person running crv: the commands print them as one line.

Anything raised as a `CRVError` names the problem and where it is (option, file, line);
the `crv` command prints it without a traceback and exits 2 (a configuration or input
problem found before or during a run). Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations


class CRVError(Exception):
    """A problem with the configuration, the inputs or the cache, described for the user."""


class ConfigError(CRVError):
    """A configuration value that cannot work; the message names the option."""
