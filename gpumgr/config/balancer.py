"""The `balancer:` section: how this box behaves behind a load balancer
(HAProxy) in front of several gpumgr boxes (docs/fleet.md)."""

from __future__ import annotations

import re

import attrs

from gpumgr.config.section import Section

#: A box name travels in a header and a cookie value, and HAProxy matches it.
_BOX_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
#: Longer not-ready periods are typos; systemd would kill the box first anyway.
_MAX_NOT_READY_S = 3600.0


@attrs.frozen
class BalancerConfig:
    #: This box's name, sent as `X-Gpumgr-Box` on proxied answers and as the
    #: `gpumgr_box` cookie on /v1/tts answers, so that the balancer sends the
    #: /audio/ fetch back to the box that made the file. None: neither is sent.
    box: str | None = None
    #: /v1/ready/<kind> says 503 queue_full once this many jobs of the kind wait.
    max_queue: int = 4
    #: On SIGTERM, how long the box reports not ready (still serving) before it drains.
    not_ready_s: float = 0.0


def parse_balancer(sec: Section) -> BalancerConfig:
    box = sec.string("box", None) if sec.has("box") else None
    if box is not None and not _BOX_NAME.match(box):
        sec.fail("box", "must be 1-63 letters, digits, '_', '.' or '-', starting with a "
                 f"letter or digit (it travels in a header and a cookie); got {box!r}")
    balancer = BalancerConfig(
        box=box,
        max_queue=sec.number("max_queue", 4, integer=True, positive=True, maximum=1_000_000),
        not_ready_s=sec.number("not_ready_s", 0.0, maximum=_MAX_NOT_READY_S),
    )
    sec.finish()
    return balancer
