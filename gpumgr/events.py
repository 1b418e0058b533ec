"""What gpumgr did or saw, as `recent_events` in /v1/status shows it.

An `Event` is a plain value with its time as seconds since the epoch; the
ISO form is written only where status is rendered (`gpumgr.status`). The
kinds' values are the strings of the JSON field `event`, which the page, the
CLI and users' scripts read: never rename one.
"""

from __future__ import annotations

import enum
from typing import Protocol

import attrs


class EventKind(enum.StrEnum):
    # admission: loads, unloads, and refusals for lack of memory
    LOAD = "load"
    LOAD_FAILED = "load_failed"
    LOAD_CANCELLED = "load_cancelled"
    EVICTION = "eviction"  # unloaded to make room, or idle
    EVICTION_FAILED = "eviction_failed"
    UNLOAD = "unload"  # unloaded by an operator (admin)
    REFUSAL = "refusal"
    OOM_RETRY = "oom_retry"
    # jobs ended by gpumgr
    JOB_TIMEOUT = "job_timeout"
    JOB_ABORTED = "job_aborted"
    # processes gpumgr owns
    PROCESS_CRASH = "process_crash"
    PROCESS_START_FAILED = "process_start_failed"
    PROCESS_UNRESPONSIVE = "process_unresponsive"
    # renders (ComfyUI prompts) tracked to their end
    RENDER_INTERRUPTED = "render_interrupted"
    RENDER_STUCK = "render_stuck"
    RENDER_RELEASED = "render_released"
    RENDER_LOST = "render_lost"
    # work whose client left, drained before the GPU is given back
    ABANDONED_SETTLED = "abandoned_settled"
    ABANDONED_GRACE_EXPIRED = "abandoned_grace_expired"


@attrs.frozen
class Event:
    kind: EventKind
    consumer: str
    #: Why gpumgr acted ("idle", "admin", "job_timeout", ...), if it did.
    reason: str | None
    #: The memory the event concerns (a load's or an unload's size).
    mib: int | None
    detail: str | None
    #: Seconds since the epoch, from the injected clock.
    at: float


class EventLog(Protocol):
    """Records an event now (`Admission.event`); given to those who report events."""

    def __call__(self, kind: EventKind, consumer: str, reason: str | None = None,
                 mib: int | None = None, detail: str | None = None) -> None: ...


__all__ = ["Event", "EventKind", "EventLog"]
