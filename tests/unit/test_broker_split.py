"""The values that cross the modules split out of the broker (issue 15)."""

from __future__ import annotations

import io

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, Cooperator
from twisted.web.test.requesthelper import DummyRequest

from gpumgr.admin import AdminAction
from gpumgr.errors import UpstreamUnreachable
from gpumgr.proxy import Outcome, StreamingProxy, Timeouts
from gpumgr.reload import ReloadOutcome
from gpumgr.web import _finish


def test_a_reload_outcome_is_the_json_of_the_admin_route():
    assert ReloadOutcome(reloaded=True, config_hash="ab").as_json() == {
        "reloaded": True, "config_hash": "ab"}
    assert ReloadOutcome(reloaded=False, error="x.yaml: bad").as_json() == {
        "reloaded": False, "error": "x.yaml: bad"}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ReloadOutcome(reloaded=True).reloaded = False


def test_admin_actions_are_the_route_names():
    assert [a.value for a in AdminAction] == ["load", "unload"]


class _Refused:
    def request(self, method, uri, headers=None, bodyProducer=None):
        return defer.fail(ConnectionRefusedError("refused"))


def _request():
    request = DummyRequest([b"prompt"])
    request.method = b"POST"
    request.content = io.BytesIO(b"{}")
    request._disconnected = False
    request.startedWriting = False
    return request


def test_a_refused_exchange_is_written_by_the_web_layer_not_the_proxy():
    """Every error of a request is written in one place (gpumgr.web)."""
    clock = Clock()
    heard = []
    proxy = StreamingProxy(clock, Cooperator(scheduler=lambda f: clock.callLater(0, f)),
                           lambda *a: heard.append(a))
    request = _request()
    d = proxy.forward(request, "comfy", _Refused(), b"http://comfy/prompt",
                      Timeouts(request_s=5, body_idle_s=5, client_stall_s=5))
    result = d.result
    assert result.outcome is Outcome.REFUSED and result.status == 502
    assert isinstance(result.error, UpstreamUnreachable)
    assert request.written == [] and request.finished == 0  # the proxy wrote nothing
    assert heard and heard[0][:2] == ("comfy", False)
    _finish(result, request)
    assert request.responseCode == 502 and request.finished == 1
    assert b"upstream_unreachable" in b"".join(request.written)
