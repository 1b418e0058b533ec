"""Reloading the config: read and check a new one; say what came of it.

A reload that cannot be applied (unreadable, invalid, or a change that needs
a restart) leaves the running config as it is.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from gpumgr.config import Config, ConfigError, parse_config_text, read_config_file
from gpumgr.cards import spans_cards
from gpumgr.states import SchedulerMode


@attrs.frozen
class ReloadOutcome:
    """What one reload did: applied (with the new config's hash) or refused (why)."""

    reloaded: bool
    config_hash: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The body of POST /v1/admin/reload."""
        if self.reloaded:
            return {"reloaded": True, "config_hash": self.config_hash}
        return {"reloaded": False, "error": self.error}


class ReloadRefused(Exception):
    """The new config cannot be applied; the message says why, naming the file."""


def reload_refusal(old: Config, new: Config) -> str | None:
    """Why a valid new config cannot be applied without a restart (pure)."""
    if new.listen != old.listen:
        return (f"listen changed from {old.listen!r} to {new.listen!r}: restart gpumgr "
                "to listen elsewhere (the running config is kept)")
    if new.scheduler.mode != old.scheduler.mode:
        return (f"scheduler.mode changed from {old.scheduler.mode} to {new.scheduler.mode}: "
                "that needs a restart (the running config is kept)")
    if new.scheduler.auto != old.scheduler.auto:
        return (f"scheduler.capacity changed from {old.scheduler.capacity} to "
                f"{new.scheduler.capacity}: between a number and auto needs a restart "
                "(the running config is kept)")
    if spans_cards(new) != spans_cards(old) and new.scheduler.mode is not SchedulerMode.PASSTHROUGH:
        return ("consumers.<name>.gpu: going from every consumer on card 0 to several cards "
                "(or back) changes the GPU locks: that needs a restart (the running config "
                "is kept)")
    return None


def read_new_config(running: Config, overrides: Callable[[Config], Config]) -> Config:
    """Re-read the running config's file, with the command line's overrides;
    raises ReloadRefused when it cannot replace `running`."""
    source = running.source
    try:
        text = read_config_file(source)  # never blocks the reactor on a FIFO
        new = overrides(parse_config_text(text, source))
        problem = reload_refusal(running, new)
        if problem is not None:
            raise ConfigError(source, "", problem)
    except ConfigError as e:
        raise ReloadRefused(str(e)) from e
    except OSError as e:
        raise ReloadRefused(f"{source}: cannot read: {e}") from e
    return new


@attrs.define
class ReloadHistory:
    """The config in force and how reloads went, for /v1/status.broker."""

    loaded_at: float
    config_hash: str
    #: Reloads asked for (SIGHUP, POST /v1/admin/reload), applied or not.
    attempts: int = 0
    failures: int = 0
    last_error: str | None = None

    def refused(self, message: str) -> ReloadOutcome:
        self.failures += 1
        self.last_error = message
        return ReloadOutcome(reloaded=False, error=message)

    def applied(self, config: Config, now: float) -> None:
        """A config was swapped in (by a reload or directly)."""
        self.loaded_at = now
        self.config_hash = config.sha256
        self.last_error = None
