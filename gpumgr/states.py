"""Enums that several layers share: a consumer's health and the scheduler's mode.

They live here, below config, drivers and registry, so that each of those can
import them without importing the others.
"""

from __future__ import annotations

import enum


class Health(enum.StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    OK = "ok"
    STARTING = "starting"  # up, but loading its model (whisper.cpp's 503 "loading model")
    DOWN = "down"  # the last probe failed: requests are refused
    STOPPED = "stopped"  # a managed process that is not running: started on demand


class SchedulerMode(enum.StrEnum):
    """`scheduler.mode`; the values are the config's (and /v1/status's) strings."""

    PASSTHROUGH = "passthrough"  # no lock: every request goes through at once
    LOCKED = "locked"  # one job at a time (capacity), queued
    EVICTING = "evicting"  # locked, and makes room in GPU memory before a job


__all__ = ["Health", "SchedulerMode"]
