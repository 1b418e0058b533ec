"""The operator's actions on one consumer: POST /v1/consumers/<name>/<action>."""

from __future__ import annotations

import enum


class AdminAction(enum.Enum):
    """Run through the scheduler like any job (they hold the GPU)."""

    LOAD = "load"
    UNLOAD = "unload"
