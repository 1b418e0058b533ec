"""Request ids parsed once, and the queue's pick order (pure)."""

from __future__ import annotations

import pytest

from gpumgr.errors import BadRequestId
from gpumgr.queue_policy import Waiting, pick_order
from gpumgr.request_ids import RequestId


def test_a_client_id_is_kept_and_a_missing_one_made():
    assert RequestId.from_header([b"job-1:a.b_c"]) == RequestId("job-1:a.b_c", from_client=True)
    made = RequestId.from_header(None, new=lambda: "abc123")
    assert made == RequestId("abc123") and not made.from_client


@pytest.mark.parametrize("values", [[b""], [b"x" * 65], [b"a b"], [b".lead"], [b"\xc3\xbc"],
                                    [b"a/b"], [b"a", b"b"]])
def test_bad_ids_are_refused(values):
    with pytest.raises(BadRequestId):
        RequestId.from_header(values)


def test_pick_order_follows_priority_then_arrival():
    waiting = [Waiting(0, 0, 0.0), Waiting(1, 5, 1.0), Waiting(2, 0, 2.0)]
    assert pick_order(waiting, now=3.0, aging_s=30.0) == (1, 0, 2)


def test_pick_order_lets_loaded_jobs_go_first_within_max_overtakes():
    # A B A B, A loaded: A A B B; with one overtake allowed, the first B is passed once only.
    waiting = [Waiting(0, 0, 0.0, cheap=False), Waiting(1, 0, 0.0, cheap=True),
               Waiting(2, 0, 0.0, cheap=False), Waiting(3, 0, 0.0, cheap=True)]
    assert pick_order(waiting, 0.0, 30.0, max_overtakes=4) == (1, 3, 0, 2)
    assert pick_order(waiting, 0.0, 30.0, max_overtakes=1) == (1, 0, 3, 2)
