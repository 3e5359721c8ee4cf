"""Operator mistakes found at start, each turned into one line that says what to do.

Whatever an operator can get wrong before the relay serves (a port already taken, a data
directory it cannot write, a missing key, TLS files that do not load) must end the start with
a single ``trio-relay: ...`` line on stderr and exit code 2, never a traceback: under systemd
that line is what ``systemctl status`` shows. Everything here raises :class:`ConfigError`,
which the command line prints as that line.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .config import Config, ConfigError
from .private_files import private_dir

__all__ = ["bind_problem", "check_data_dirs"]


def bind_problem(host: str, port: int, exc: OSError) -> ConfigError:
    """The one-line error for a listening socket that could not be bound."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        hint = "address already in use (another trio-relay or another server is there): stop it, or set server.port / --port"
    elif exc.errno == errno.EACCES:
        hint = "permission denied (ports below 1024 need privileges): use a port of 1024 or more"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = "this host has no such address: set server.host / --host to one of its addresses (or 0.0.0.0)"
    else:
        hint = exc.strerror or str(exc)
    return ConfigError(f"config error: server.port: cannot listen on {where}: {hint}")


def check_data_dirs(config: Config) -> None:
    """Create each data directory the config uses (mode 0700) and prove it is writable.

    Checked before anything binds, so an unwritable place (``ProtectSystem=strict`` without a
    ``StateDirectory``, a read-only mount, a wrong owner) is one line at start instead of a
    traceback from the first SQLite write.
    """
    dirs: list[tuple[str, str]] = []
    if config.history.backend == "sqlite":
        dirs.append(("history.data_dir", config.history.data_dir))
    if config.alerts.enabled:
        dirs.append(("alerts.data_dir", config.alerts.data_dir))
    for key, raw in dirs:
        path = Path(raw)
        try:
            private_dir(path)  # 0700, and so is every folder it creates above it
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            absolute = os.path.abspath(path)
            raise ConfigError(
                f"config error: {key}: cannot write to {absolute} ({exc.strerror or exc}); "
                "make it writable, or set it to a writable directory (under systemd: StateDirectory=)"
            ) from None
