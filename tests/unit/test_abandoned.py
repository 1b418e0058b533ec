"""After a client left: the pure decision (`judge`) and the waiter (`AbandonedWork`), on
task.Clock."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from gpumgr.abandoned import (
    IDLE_SAMPLES,
    IDLE_UTILIZATION_PCT,
    MEMORY_SLACK_MIB,
    AbandonedWork,
    Evidence,
    Policy,
    Progress,
    Reading,
    judge,
    reading_of,
)
from gpumgr.drivers.vllm import requests_in_flight
from gpumgr.gpu import GpuInfo, GpuProcess, GpuSample

RESIDENT = 9000

readings = st.builds(
    Reading,
    service_down=st.booleans(),
    sample_ok=st.booleans(),
    utilization_pct=st.one_of(st.none(), st.integers(0, 100)),
    process_mib=st.one_of(st.none(), st.integers(0, 20000)),
    resident_mib=st.just(RESIDENT),
    service_says_stopped=st.one_of(st.none(), st.booleans()),
    service_drained=st.booleans(),
)


def run(sequence, policy=Policy()):
    """(index, evidence) of the first verdict over a sequence of readings, or None."""
    progress = Progress()
    for i, reading in enumerate(sequence):
        progress, evidence = judge(reading, progress, policy)
        if evidence is not None:
            return i, evidence
    return None


def quiet(r: Reading, policy=Policy()) -> bool:
    return r.sample_ok and r.utilization_pct is not None \
        and r.utilization_pct < policy.idle_utilization_pct


def memory_up(r: Reading) -> bool:
    return r.sample_ok and r.process_mib is not None \
        and r.process_mib > r.resident_mib + MEMORY_SLACK_MIB


@settings(max_examples=2000)
@given(st.lists(readings, max_size=12))
def test_every_verdict_rests_on_evidence(sequence):
    verdict = run(sequence)
    if verdict is None:
        # No verdict: nothing in the sequence was evidence of any kind.
        assert not any(r.service_down or r.service_drained for r in sequence)
        return
    i, evidence = verdict
    reading, before = sequence[i], sequence[:i]
    # Either would have ended it earlier.
    assert not any(r.service_down or r.service_drained for r in before)
    if evidence is Evidence.SERVICE_DOWN:
        assert reading.service_down
    elif evidence is Evidence.SERVICE_DRAINED:
        # The service answered a call that waited behind all it took before.
        assert reading.service_drained
    elif evidence is Evidence.SERVICE_SAYS_DONE:
        # It said it ran the request, and now says nothing runs.
        assert reading.service_says_stopped is True
        assert any(r.service_says_stopped is False for r in before)
    elif evidence is Evidence.MEMORY_BACK:
        assert reading.sample_ok and reading.process_mib is not None
        assert reading.process_mib <= reading.resident_mib + MEMORY_SLACK_MIB
        assert any(memory_up(r) for r in before)
    else:
        assert evidence is Evidence.GPU_IDLE
        tail = sequence[i + 1 - IDLE_SAMPLES:i + 1]
        assert len(tail) == IDLE_SAMPLES and all(quiet(r) for r in tail)


@given(st.lists(readings.filter(lambda r: not (r.service_down or r.service_drained)),
                max_size=12))
def test_a_busy_card_a_failed_sample_or_no_word_is_never_evidence(sequence):
    busy = [Reading(sample_ok=r.sample_ok, utilization_pct=None if r.utilization_pct is None
                    else max(r.utilization_pct, IDLE_UTILIZATION_PCT),
                    process_mib=r.process_mib if r.process_mib is None
                    else max(r.process_mib, RESIDENT + MEMORY_SLACK_MIB + 1),
                    resident_mib=RESIDENT, service_says_stopped=None)
            for r in sequence]
    assert run(busy) is None


@given(st.integers(1, 5), st.integers(0, 8))
def test_quiet_samples_must_be_consecutive(needed, interruptions):
    policy = Policy(idle_samples=needed)
    q = Reading(utilization_pct=0)
    failed = Reading(sample_ok=False, utilization_pct=0)
    busy = Reading(utilization_pct=80)
    sequence = []
    for _ in range(interruptions):
        sequence += [q] * (needed - 1) + [busy if len(sequence) % 2 else failed]
    sequence += [q] * needed
    assert run(sequence, policy) == (len(sequence) - 1, Evidence.GPU_IDLE)


def test_memory_below_resident_before_the_work_showed_is_not_evidence():
    loading = Reading(process_mib=2000, resident_mib=RESIDENT, utilization_pct=90)
    working = Reading(process_mib=RESIDENT + 1200, resident_mib=RESIDENT, utilization_pct=90)
    back = Reading(process_mib=RESIDENT, resident_mib=RESIDENT, utilization_pct=90)
    assert run([loading, loading, back]) is None
    assert run([loading, working, back]) == (2, Evidence.MEMORY_BACK)


def test_a_process_that_left_the_card_is_memory_back():
    working = Reading(process_mib=RESIDENT + 500, resident_mib=RESIDENT, utilization_pct=90)
    gone = Reading(process_mib=0, resident_mib=RESIDENT, utilization_pct=90)
    assert run([working, gone]) == (1, Evidence.MEMORY_BACK)


def test_a_service_that_says_done_before_saying_running_is_not_believed():
    assert run([Reading(utilization_pct=90, service_says_stopped=True)] * 3) is None
    assert run([Reading(utilization_pct=90, service_says_stopped=False),
                Reading(utilization_pct=90, service_says_stopped=True)]) \
        == (1, Evidence.SERVICE_SAYS_DONE)


def sample(util, processes=(), at=0.0):
    gpus = tuple(GpuInfo(i, "sim", 24576, 9000, 15576, u, 40) for i, u in enumerate(util))
    return GpuSample(sampled_at=at, gpus=gpus, processes=tuple(processes))


def test_a_reading_takes_the_busiest_gpu_and_the_consumers_own_processes():
    s = sample([3, 88], [GpuProcess(1, "/usr/local/bin/ollama", 9500),
                         GpuProcess(2, "/usr/local/bin/ollama", 300),
                         GpuProcess(3, "/opt/whisper-server", 1500)])
    r = reading_of(s, re.compile("ollama"), RESIDENT)
    assert (r.sample_ok, r.utilization_pct, r.process_mib) == (True, 88, 9800)
    assert reading_of(s, None, RESIDENT).process_mib is None
    # One GPU's utilisation unknown (MIG): the card's is unknown.
    assert reading_of(sample([3, None]), None, 0).utilization_pct is None
    failed = reading_of(GpuSample(sampled_at=1.0, error="driver"), None, RESIDENT)
    assert not failed.sample_ok


def test_on_a_box_of_several_cards_only_the_consumers_own_cards_count():
    busy_elsewhere = sample([0, 97, 3])
    # Card 1's work says nothing of work on card 0 or card 2.
    assert reading_of(busy_elsewhere, None, 0, cards=(0,)).utilization_pct == 0
    assert reading_of(busy_elsewhere, None, 0, cards=(0, 2)).utilization_pct == 3
    assert reading_of(busy_elsewhere, None, 0, cards=(1,)).utilization_pct == 97
    # One lock for the box (cards None): its processes may use any card.
    assert reading_of(busy_elsewhere, None, 0).utilization_pct == 97
    # Its card's row is gone, or it is placed nowhere yet: nothing is known.
    assert reading_of(busy_elsewhere, None, 0, cards=(5,)).utilization_pct is None
    assert reading_of(busy_elsewhere, None, 0, cards=()).utilization_pct is None
    # Its processes are those on its cards: the same binary on another card is another's.
    on_cards = GpuSample(sampled_at=0.0, gpus=tuple(
        GpuInfo(i, "sim", 24576, 9000, 15576, 0, 40, uuid=f"GPU-{i}") for i in range(2)),
        processes=(GpuProcess(1, "whisper-server", 1500, "GPU-0"),
                   GpuProcess(2, "whisper-server", 2600, "GPU-1")))
    assert reading_of(on_cards, re.compile("whisper"), 0, cards=(1,)).process_mib == 2600
    assert reading_of(on_cards, re.compile("whisper"), 0).process_mib == 4100
    # Its card's utilisation unknown (MIG); another card's known one is no stand-in.
    assert reading_of(sample([0, None]), None, 0, cards=(1,)).utilization_pct is None


# -- the waiter, on a task.Clock ------------------------------------------------------------


class Card:
    """A fake sampler: every sample reads `util` (None: the sample fails)."""

    def __init__(self, clock, util=0):
        self.clock = clock
        self.util = util
        self.samples = 0
        self.pending: list[defer.Deferred] = []
        self.slow = False

    def sample(self):
        self.samples += 1
        if self.slow:
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d
        if self.util is None:
            return defer.succeed(GpuSample(sampled_at=self.clock.seconds(), error="driver"))
        return defer.succeed(sample([self.util], at=self.clock.seconds()))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def events():
    return []


def waiter(clock, card, events, period_s=0.5):
    return AbandonedWork(clock, card.sample, lambda *a, **k: events.append((a, k)),
                         sample_period_s=lambda: period_s)


def test_a_service_that_stops_at_once_costs_no_more_than_one_sample_period(clock, events):
    card = Card(clock, util=0)
    work = waiter(clock, card, events, period_s=0.5)
    d = defer.ensureDeferred(work.settle("ollama", grace_s=15.0))
    assert not d.called and work.draining[1].consumer == "ollama"
    clock.advance(0.5)
    assert d.result is Evidence.GPU_IDLE
    assert clock.seconds() == 0.5 and card.samples == IDLE_SAMPLES
    assert work.draining == {} and work.outcomes == {"gpu_idle": 1}
    assert work.durations_s["ollama"].total == 0.5 and work.durations_s["ollama"].count == 1
    ((args, kwargs),) = events
    assert args[:2] == ("abandoned_settled", "ollama")
    assert clock.getDelayedCalls() == []


def test_the_gpu_is_held_while_the_service_computes_and_freed_once_it_stops(clock, events):
    card = Card(clock, util=97)
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("ollama", grace_s=15.0))
    clock.pump([0.5] * 8)
    assert not d.called  # 4 s of a busy card
    card.util = 0
    clock.advance(0.5)
    assert not d.called  # one quiet sample is not enough
    clock.advance(0.5)
    assert d.result is Evidence.GPU_IDLE and clock.seconds() == 5.0


def test_the_grace_bounds_a_service_that_never_goes_idle(clock, events):
    card = Card(clock, util=97)
    work = waiter(clock, card, events, period_s=0.4)
    d = defer.ensureDeferred(work.settle("ollama", grace_s=3.0))
    clock.pump([0.4] * 7)
    assert clock.seconds() == pytest.approx(2.8) and not d.called
    clock.advance(0.2)  # the last wait ends on the deadline, not a period later
    assert d.result is Evidence.GRACE_EXPIRED and clock.seconds() == pytest.approx(3.0)
    assert work.outcomes == {"grace_expired": 1} and work.draining == {}
    ((args, kwargs),) = events
    assert args[:2] == ("abandoned_grace_expired", "ollama")
    assert clock.getDelayedCalls() == []


def test_without_gpu_samples_only_the_grace_ends_it(clock, events):
    card = Card(clock, util=None)
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("ollama", grace_s=2.0))
    clock.pump([0.5] * 3)
    assert not d.called
    clock.advance(0.5)
    assert d.result is Evidence.GRACE_EXPIRED


def test_a_service_found_down_ends_it_at_once(clock, events):
    card = Card(clock, util=97)
    down = {"now": False}
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("whisper", 5.0, is_down=lambda: down["now"]))
    clock.advance(0.5)
    down["now"] = True
    clock.advance(0.5)
    assert d.result is Evidence.SERVICE_DOWN and clock.seconds() == 1.0


def test_the_services_own_word_counts_and_a_failing_question_does_not(clock, events):
    card = Card(clock, util=97)
    answers = [False, RuntimeError("metrics unreachable"), True]

    def ask():
        answer = answers.pop(0)
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("vllm", 5.0, ask_service=ask))
    clock.advance(0.5)
    assert not d.called
    clock.advance(0.5)
    assert d.result is Evidence.SERVICE_SAYS_DONE


class Turn:
    """A fake work_barrier: each call is a Deferred the test fires."""

    def __init__(self):
        self.calls: list[defer.Deferred] = []

    def __call__(self):
        d: defer.Deferred = defer.Deferred()
        self.calls.append(d)
        return d


def test_the_services_turn_is_taken_once_a_period_in_and_its_answer_ends_it(clock, events):
    """A serialising service (whisper.cpp) answers the barrier once the work
    the client left ended: evidence while other work keeps the card busy."""
    card, turn = Card(clock, util=97), Turn()
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("whisper", 60.0, barrier=turn))
    assert turn.calls == []  # the request the client left must reach the lock first
    clock.advance(0.5)
    (call,) = turn.calls
    clock.pump([0.5] * 6)
    assert not d.called and len(turn.calls) == 1  # one call, however long it waits
    call.callback(True)
    assert not d.called
    clock.advance(0.5)
    assert d.result is Evidence.SERVICE_DRAINED and work.outcomes == {"service_drained": 1}
    assert clock.getDelayedCalls() == []


def test_the_turn_waits_a_period_of_the_clock_however_long_a_sample_takes(clock, events):
    """Found in review: with `now > started`, a sample that took 30 ms was
    enough, and the call could reach the lock before the request the client
    left (whose body the service may still be reading)."""
    card, turn = Card(clock, util=97), Turn()
    plain = card.sample

    def slow_sample():
        clock.advance(0.03)  # nvidia-smi takes real time
        return plain()

    card.sample = slow_sample
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("whisper", 60.0, barrier=turn))
    assert turn.calls == [] and clock.seconds() == pytest.approx(0.03)
    clock.advance(0.5)
    assert len(turn.calls) == 1 and clock.seconds() - 0.0 >= 0.5
    d.cancel()
    d.addErrback(lambda f: f.trap(defer.CancelledError))


def test_an_answer_not_understood_or_a_failed_turn_is_no_evidence(clock, events):
    for answer in (None, RuntimeError("connection refused")):
        card, turn = Card(clock, util=97), Turn()
        work = waiter(clock, card, events)
        d = defer.ensureDeferred(work.settle("whisper", 3.0, barrier=turn))
        clock.advance(0.5)
        turn.calls[0].errback(answer) if isinstance(answer, Exception) \
            else turn.calls[0].callback(answer)
        clock.pump([0.5] * 5)
        assert d.result is Evidence.GRACE_EXPIRED and len(turn.calls) == 1


def test_a_turn_still_waiting_when_the_drain_ends_is_cancelled(clock, events):
    card, turn = Card(clock, util=97), Turn()
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("whisper", 2.0, barrier=turn))
    clock.advance(0.5)
    card.util = 0  # other evidence comes first
    clock.pump([0.5] * 2)
    assert d.result is Evidence.GPU_IDLE
    (call,) = turn.calls
    assert call.called and call.result is None  # cancelled: its connection is closed
    assert clock.getDelayedCalls() == []


def test_cancelling_a_drain_ends_it_and_leaves_the_shared_sample_alone(clock, events):
    card = Card(clock, util=97)
    card.slow = True
    work = waiter(clock, card, events)
    d = defer.ensureDeferred(work.settle("ollama", grace_s=15.0))
    (pending,) = card.pending
    d.cancel()
    assert isinstance(d.result, defer.Failure) and d.result.check(defer.CancelledError)
    d.addErrback(lambda f: None)
    assert not pending.called  # the sampler's own Deferred was not cancelled
    pending.callback(sample([0]))  # a late sample changes nothing
    assert work.draining == {} and work.outcomes == {"cancelled": 1} and events == []
    assert clock.getDelayedCalls() == []


def test_cancelling_between_samples_stops_the_timer(clock, events):
    work = waiter(clock, Card(clock, util=97), events)
    d = defer.ensureDeferred(work.settle("ollama", grace_s=15.0))
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    assert clock.getDelayedCalls()
    d.cancel()
    assert clock.getDelayedCalls() == [] and work.draining == {}


# -- what each service says -------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-0.6B"} 0.0
vllm:num_requests_running_extra 5.0
"""


def test_vllm_counts_its_running_and_waiting_requests():
    assert requests_in_flight(VLLM_METRICS) == 1
    assert requests_in_flight(VLLM_METRICS.replace("} 1.0", "} 0.0")) == 0
    assert requests_in_flight("# nothing of vllm here\n") is None
    assert requests_in_flight("vllm:num_requests_running{a=\"b\"} x\n") is None
