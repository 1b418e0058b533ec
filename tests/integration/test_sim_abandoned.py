"""The simulation of work a client abandoned: a service computes on after its client left.

The simulated ollama evaluates a prompt (`prompt_eval_s`) without looking at
its client and notices a closed connection only at its next write; meanwhile
its job holds working memory (`working_mib`) and the simulated card reads
busy. The simulated card records any overlap of two jobs' working periods.
"""

from __future__ import annotations

import io
import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent, FileBodyProducer, ResponseNeverReceived
from twisted.web.http_headers import Headers

from gpumgr.gpu import GpuSampler
from gpumgr.testing import sim_nvidia_smi_command
from gpumgr.testing.gpu import BUSY_UTILIZATION_PCT
from tests.helpers import sleep, wait_for


async def _sample(world):
    return await GpuSampler(reactor, sim_nvidia_smi_command(world.gpu.state_path), 2, 10
                            ).sample_now()


@pytest_twisted.ensureDeferred
async def test_ollama_computes_on_after_its_client_left_mid_prompt(world):
    ollama = world["ollama"]
    ollama.behaviour.prompt_eval_s = 0.8
    ollama.behaviour.working_mib = 1200
    ollama.behaviour.stream_chunks = 3
    ollama.behaviour.chunk_interval_s = 0.01
    body = json.dumps({"model": "llama3", "prompt": "a long prompt"}).encode()
    agent = Agent(reactor)
    pending = agent.request(b"POST", (ollama.url + "/api/generate").encode(),
                            Headers({b"Content-Type": [b"application/json"]}),
                            FileBodyProducer(io.BytesIO(body)))
    pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
    await wait_for(lambda: world.active_jobs == 1)
    pending.cancel()  # the client leaves while the prompt is evaluated
    await sleep(0.2)
    # The runner has not noticed: it computes, and holds its working memory.
    assert world.active_jobs == 1 and world.gpu.busy
    sample = await _sample(world)
    assert sample.gpus[0].utilization_pct == BUSY_UTILIZATION_PCT
    (row,) = [p for p in sample.processes if p.name == ollama.process_name]
    assert row.used_mib == 9000 + 1200
    # At its first write it finds the client gone and stops.
    await wait_for(lambda: world.active_jobs == 0, timeout_s=5)
    assert ollama.jobs_cancelled == 1
    sample = await _sample(world)
    assert sample.gpus[0].utilization_pct == 0
    (row,) = [p for p in sample.processes if p.name == ollama.process_name]
    assert row.used_mib == 9000
    assert world.gpu.overlaps == []


@pytest_twisted.ensureDeferred
async def test_a_working_memory_that_does_not_fit_is_an_out_of_memory(world, client):
    ollama = world["ollama"]
    ollama.behaviour.working_mib = world.gpu.total_mib
    reply = await client.request("POST", ollama.url + "/api/generate",
                                 json.dumps({"prompt": "hi", "stream": False}).encode())
    assert reply.code == 500 and b"out of memory" in reply.body
    assert world.gpu.oom_count == 1 and world.active_jobs == 0
    assert ollama.resident["llama3:latest"].in_flight == 0
