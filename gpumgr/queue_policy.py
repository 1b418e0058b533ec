"""Who runs next among queued jobs: pure functions of the waiting jobs and the time.

`Locked` (gpumgr.scheduler) keeps the queue and asks these which job to start;
they are tested on plain values (hypothesis included), without a clock.
"""

from __future__ import annotations

from typing import Sequence

import attrs


@attrs.frozen
class Waiting:
    """What `pick_next` needs to know about a queued job."""

    seq: int
    priority: int
    enqueued_at: float
    #: Its consumer is already loaded: running it needs no eviction.
    cheap: bool = False
    #: How often a cheaper job went ahead of it.
    overtaken: int = 0


@attrs.frozen
class QueuedJob:
    """A waiting job as `queue_order` shows it: in the order it would start."""

    request_id: str | None
    consumer: str
    kind: str | None
    enqueued_at: float
    control: bool


def effective_priority(w: Waiting, now: float, aging_s: float) -> int:
    """Base priority plus one level per `aging_s` seconds spent waiting."""
    return w.priority + int((now - w.enqueued_at) // aging_s)


def pick_next(waiting: Sequence[Waiting], now: float, aging_s: float) -> int:
    """Index of the job to run next: highest effective priority, then FIFO."""
    best = 0
    best_key = None
    for i, w in enumerate(waiting):
        key = (effective_priority(w, now, aging_s), -w.seq)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def pick_next_avoiding_swaps(
    waiting: Sequence[Waiting], now: float, aging_s: float, max_overtakes: int
) -> tuple[int, tuple[int, ...]]:
    """Like `pick_next`, but a job whose consumer is loaded may go first.

    Returns (index to run, indexes of the jobs it overtook). A cheap job may
    overtake only jobs of no higher effective priority, and no job is ever
    overtaken more than `max_overtakes` times, so starvation stays bounded:
    queued A B A B (A loaded, A and B exclusive) runs as A A B B.
    """
    base = pick_next(waiting, now, aging_s)
    head = waiting[base]
    if head.cheap or head.overtaken >= max_overtakes:
        return base, ()

    def key(w: Waiting) -> tuple[int, int]:
        return (effective_priority(w, now, aging_s), -w.seq)

    floor = effective_priority(head, now, aging_s)
    cheap = [i for i, w in enumerate(waiting) if w.cheap and key(w)[0] >= floor]
    if not cheap:
        return base, ()
    best = max(cheap, key=lambda i: key(waiting[i]))
    passed = tuple(i for i, w in enumerate(waiting) if not w.cheap and key(w) > key(waiting[best]))
    if any(waiting[i].overtaken >= max_overtakes for i in passed):
        return base, ()
    return best, passed


def pick_order(waiting: Sequence[Waiting], now: float, aging_s: float,
               max_overtakes: int = 0) -> tuple[int, ...]:
    """The indexes of `waiting` in the order the scheduler would start them
    if nothing changed: no job arrives or leaves, the time stays `now`, and
    what is loaded stays loaded (the positions `GET /v1/requests/<id>` shows)."""
    left = list(enumerate(waiting))
    order: list[int] = []
    while left:
        views = [w for _, w in left]
        if max_overtakes > 0:
            index, passed = pick_next_avoiding_swaps(views, now, aging_s, max_overtakes)
            for i in passed:
                left[i] = (left[i][0], attrs.evolve(left[i][1], overtaken=left[i][1].overtaken + 1))
        else:
            index = pick_next(views, now, aging_s)
        order.append(left.pop(index)[0])
    return tuple(order)


__all__ = ["QueuedJob", "Waiting", "effective_priority", "pick_next", "pick_next_avoiding_swaps", "pick_order"]
