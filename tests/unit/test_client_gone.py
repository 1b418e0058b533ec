"""A client that left is 499 in /metrics and in the access log (issue 14.10).

Before: one that left before the response headers was counted with code 0,
and one that hung up mid-stream was logged (and counted) as 200.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from gpumgr.broker import access_status
from gpumgr.errors import QueueFull, UpstreamTimeout
from gpumgr.proxy import Outcome, Result


@pytest.mark.parametrize("result,client_left,status", [
    (Result(Outcome.COMPLETED, 200), False, 200),
    (Result(Outcome.CLIENT_GONE, 200), True, 499),   # hung up mid-stream
    (Result(Outcome.CLIENT_GONE, None), True, 499),  # left before the headers
    (Result(Outcome.CLIENT_GONE, None), False, 499),
    (Result(Outcome.REFUSED, 504), False, 504),
    (Result(Outcome.UPSTREAM_BROKE, 200), False, 200),  # the client saw a 200, then an abort
    (Result(Outcome.UPSTREAM_BROKE, None), False, 502),
    (Failure(defer.CancelledError()), False, 499),
    (Failure(UpstreamTimeout("slow", consumer="x")), False, 504),
    (Failure(UpstreamTimeout("slow", consumer="x")), True, 499),
    (Failure(QueueFull("full")), False, 503),
    (Failure(RuntimeError("a bug")), False, 500),
])
def test_access_status(result, client_left, status):
    assert access_status(result, client_left) == status


