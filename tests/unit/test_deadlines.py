"""Load and unload deadlines: one home, the same numbers as before it."""

from __future__ import annotations

from gpumgr.config import ProcessConfig
from gpumgr.deadlines import CONTROL_TIMEOUT_S, load_deadline_s, unload_deadline_s
from gpumgr.process import ManagedProcess
from gpumgr.terminate import PROCESS_KILL_GRACE_S


def test_a_service_gpumgr_does_not_own_gets_the_control_timeout():
    assert load_deadline_s(None) == unload_deadline_s(None) == CONTROL_TIMEOUT_S == 30.0


def test_a_process_start_may_wait_for_a_stop_then_its_own_start_timeout():
    spec = ProcessConfig(command=("x",), start_timeout_s=120.0, stop_timeout_s=10.0)
    assert load_deadline_s(spec) == 135.0


def test_a_process_stop_outlasts_the_whole_escalation():
    slow = ProcessConfig(command=("x",), stop_timeout_s=60.0)
    assert unload_deadline_s(slow) == 60.0 + PROCESS_KILL_GRACE_S + 5.0
    quick = ProcessConfig(command=("x",), stop_timeout_s=1.0)
    assert unload_deadline_s(quick) == CONTROL_TIMEOUT_S


def test_the_process_gives_up_after_the_same_grace_the_unload_deadline_allows():
    defaults = ManagedProcess.__init__.__kwdefaults__
    assert defaults is not None and defaults["kill_grace_s"] == PROCESS_KILL_GRACE_S
