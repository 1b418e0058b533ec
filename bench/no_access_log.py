"""A twistd log observer for the bench: gpumgr's own, minus the access lines.

    twistd --logger no_access_log.observer gpumgr --config ...   (bench/ on PYTHONPATH)

It is the observer `twistd gpumgr` installs by default (text lines through
the redactor, on stdout), behind a filter that drops the `gpumgr.access`
namespace; everything else is logged as usual. The bench runs a gpumgr with
it beside one without, so the only difference between the two is the
formatting and writing of the access line. What stays in both: building the
event in `Broker._account` and handing it to the publisher.

`BENCH_ACCESS_LOG_CONTROL=1` keeps the access lines: the two gpumgrs then
log alike, and their difference is the bench's own noise floor.
"""

from __future__ import annotations

import os
import sys

from twisted.logger import FilteringLogObserver, ILogObserver, LogEvent, PredicateResult

from gpumgr.logs import Redactor, make_observer


def _not_access(event: LogEvent) -> PredicateResult:
    if event.get("log_namespace") == "gpumgr.access":
        return PredicateResult.no
    return PredicateResult.maybe


def observer() -> ILogObserver:
    keep = os.environ.get("BENCH_ACCESS_LOG_CONTROL") == "1"
    return FilteringLogObserver(make_observer("text", sys.stdout, Redactor()),
                                [] if keep else [_not_access])
