"""The simulated ollama behaves like the real one: several models, real wire formats,
and the official `ollama` and `openai` clients can talk to it."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from tests.helpers import wait_for

MODELS = {"llama3": 9000, "qwen2.5:7b": 6000, "nomic-embed-text": 500, "huge:70b": 30000}


@pytest.fixture
def ollama(world):
    o = world["ollama"]
    o.behaviour.models = dict(MODELS)
    o.behaviour.stream_chunks = 4
    o.behaviour.chunk_interval_s = 0.001
    o.behaviour.job_s = 0.001
    return o


async def post(client, url, value):
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    return await client.request("POST", url, body, {"Content-Type": "application/json"})


def ollama_allocations(world):
    return {owner: a for owner, a in world.gpu.allocations.items() if owner.startswith("ollama/")}


# -- several models, memory, load and unload -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_models_load_side_by_side_each_as_its_own_runner(world, ollama, client):
    for model in ("llama3", "qwen2.5:7b"):
        reply = await post(client, ollama.url + "/api/generate", {"model": model})
        assert reply.code == 200
        assert reply.json()["done"] is True and reply.json()["done_reason"] == "load"
    runners = ollama_allocations(world).values()
    assert sorted(a.used_mib for a in runners) == [6000, 9000]
    assert {a.process_name for a in runners} == {"/usr/local/bin/ollama"}
    assert len({a.pid for a in runners}) == 2
    ps = (await client.request("GET", ollama.url + "/api/ps")).json()["models"]
    assert [(m["name"], m["size_vram"]) for m in ps] == [
        ("llama3:latest", 9000 << 20), ("qwen2.5:7b", 6000 << 20)]
    assert all(m["model"] == m["name"] and m["expires_at"] and m["digest"] for m in ps)
    assert ollama.loaded_models() == ["llama3:latest", "qwen2.5:7b"] and ollama.loads == 2
    # Loading again only refreshes it.
    await post(client, ollama.url + "/api/generate", {"model": "llama3:latest"})
    assert ollama.loads == 2 and len(ollama_allocations(world)) == 2


@pytest_twisted.ensureDeferred
async def test_a_model_that_does_not_fit_answers_500_cuda_out_of_memory(world, ollama, client):
    await post(client, ollama.url + "/api/generate", {"model": "llama3"})
    load = await post(client, ollama.url + "/api/generate", {"model": "huge:70b"})
    assert load.code == 500 and "CUDA out of memory" in load.json()["error"]
    world.gpu.allocate("hog", 1, "/usr/bin/hog", world.gpu.free_mib - 1000)
    work = await post(client, ollama.url + "/api/chat",
                      {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}]})
    assert work.code == 500 and "CUDA out of memory" in work.json()["error"]
    assert world.gpu.oom_count == 2 and ollama.loaded_models() == ["llama3:latest"]
    assert world.total_jobs == 0


@pytest_twisted.ensureDeferred
async def test_unload_answers_at_once_and_the_memory_comes_back_later(world, ollama, client):
    ollama.behaviour.unload_settle_s = 0.3
    for model in ("llama3", "qwen2.5:7b"):
        await post(client, ollama.url + "/api/generate", {"model": model})
    reply = await post(client, ollama.url + "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert reply.code == 200
    assert reply.json()["done"] is True and reply.json()["done_reason"] == "unload"
    assert ollama.loaded_models() == ["qwen2.5:7b"] and ollama.unloads == 1
    assert sorted(a.used_mib for a in ollama_allocations(world).values()) == [6000, 9000]
    await wait_for(lambda: len(ollama_allocations(world)) == 1, timeout_s=5)
    # Chat unloads too, and "0s" is zero.
    reply = await post(client, ollama.url + "/api/chat",
                       {"model": "qwen2.5:7b", "messages": [], "keep_alive": "0s"})
    assert reply.json()["done_reason"] == "unload" and reply.json()["message"]["content"] == ""
    await wait_for(lambda: not ollama_allocations(world), timeout_s=5)


@pytest_twisted.ensureDeferred
async def test_a_failing_unload_keeps_the_model(world, ollama, client):
    ollama.behaviour.unload_fails = True
    await post(client, ollama.url + "/api/generate", {"model": "llama3"})
    reply = await post(client, ollama.url + "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert reply.code == 500 and reply.json()["error"] == "simulated unload failure"
    assert ollama.loaded_models() == ["llama3:latest"] and len(ollama_allocations(world)) == 1


@pytest_twisted.ensureDeferred
async def test_unload_waits_for_the_models_in_flight_requests(world, ollama, client):
    gates: dict[int, defer.Deferred] = {}
    ollama.behaviour.stream_gate = lambda i: gates.setdefault(i, defer.Deferred())
    stream = defer.ensureDeferred(post(client, ollama.url + "/api/generate",
                                       {"model": "llama3", "prompt": "hold"}))
    await wait_for(lambda: 1 in gates, timeout_s=5)
    reply = await post(client, ollama.url + "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert reply.json()["done_reason"] == "unload"  # answered at once...
    assert ollama.loaded_models() == ["llama3:latest"]  # ...but the runner is busy
    assert len(ollama_allocations(world)) == 1
    ollama.behaviour.stream_gate = None
    for gate in gates.values():
        gate.callback(None)
    done = await stream
    assert done.code == 200 and json.loads(done.body.splitlines()[-1])["done"] is True
    assert ollama.loaded_models() == [] and not ollama_allocations(world)


@pytest.mark.parametrize("path,body,code,message", [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, 'model "nope" not found'),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, 400, "model is required"),
    ("/api/generate", b"{broken", 400, "invalid request body"),
    ("/api/generate", {"model": "llama3", "keep_alive": "soon"}, 400, "invalid duration"),
    ("/api/embed", {"model": "llama3", "input": [1, 2]}, 400, "invalid input"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
    ("/api/generate", {"model": "nomic-embed-text", "prompt": "x"}, 400, "does not support"),
])
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_ollamas_errors(world, ollama, client, path, body, code, message):
    reply = await post(client, ollama.url + path, body)
    assert reply.code == code and message in reply.json()["error"]
    assert world.total_jobs == 0 and ollama.loaded_models() == []


@pytest_twisted.ensureDeferred
async def test_without_models_any_name_means_the_one_model(world, client):
    o = world["ollama"]  # as make_world builds it: no `models`
    reply = await post(client, o.url + "/api/generate", {"model": "m", "prompt": "x"})
    assert reply.code == 200
    assert o.loaded_models() == ["llama3:latest"] and world.gpu.used_mib >= 9000
    await post(client, o.url + "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert not o.loaded


# -- the native wire formats --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_generate_streams_ndjson_one_token_per_line(ollama, client):
    reply = await post(client, ollama.url + "/api/generate", {"model": "llama3", "prompt": "hi"})
    assert reply.code == 200 and reply.header("Content-Type") == b"application/x-ndjson"
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert [line["response"] for line in lines] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert all(line["model"] == "llama3" and line["created_at"] for line in lines)
    assert [line["done"] for line in lines] == [False, False, False, True]
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 3 and final["context"]
    for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_duration"):
        assert isinstance(final[key], int)
    # Each line was its own chunk on the wire.
    assert len(reply.collector.chunks) == 4


@pytest_twisted.ensureDeferred
async def test_chat_streams_messages_and_stream_false_gives_one_object(ollama, client):
    messages = [{"role": "user", "content": "hi"}]
    streamed = await post(client, ollama.url + "/api/chat", {"model": "qwen2.5:7b",
                                                             "messages": messages})
    lines = [json.loads(line) for line in streamed.body.splitlines()]
    assert [line["message"] for line in lines[:-1]] == [
        {"role": "assistant", "content": f"tok{i} "} for i in range(3)]
    assert lines[-1]["done"] is True and lines[-1]["message"]["content"] == ""
    single = await post(client, ollama.url + "/api/chat",
                        {"model": "qwen2.5:7b", "messages": messages, "stream": False})
    assert single.header("Content-Type").startswith(b"application/json")
    answer = single.json()
    assert answer["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 "}
    assert answer["done"] is True and answer["done_reason"] == "stop"


@pytest_twisted.ensureDeferred
async def test_a_stream_is_written_token_by_token(ollama, client):
    gates: dict[int, defer.Deferred] = {}
    ollama.behaviour.stream_gate = lambda i: gates.setdefault(i, defer.Deferred())
    received: list[int] = []
    reply_d = defer.ensureDeferred(client.request(
        "POST", ollama.url + "/api/generate", b'{"model":"llama3","prompt":"hi"}',
        on_chunk=lambda collector, data: received.append(collector.body.count(b"\n"))))
    for i in range(1, 4):
        await wait_for(lambda: i in gates and received and received[-1] == i, timeout_s=5)
        assert not reply_d.called  # the next token does not exist yet
        gates[i].callback(None)
    reply = await reply_d
    assert received == [1, 2, 3, 4] and reply.complete


@pytest_twisted.ensureDeferred
async def test_embeddings_old_and_new(world, ollama, client):
    reply = await post(client, ollama.url + "/api/embed",
                       {"model": "nomic-embed-text", "input": ["a", "b"]})
    vectors = reply.json()["embeddings"]
    assert reply.json()["model"] == "nomic-embed-text" and len(vectors) == 2
    assert all(len(v) == 16 and abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)
    assert vectors[0] != vectors[1]
    legacy = await post(client, ollama.url + "/api/embeddings",
                        {"model": "nomic-embed-text", "prompt": "a"})
    assert len(legacy.json()["embedding"]) == 16
    assert ollama.loaded_models() == ["nomic-embed-text:latest"] and world.total_jobs == 2


@pytest_twisted.ensureDeferred
async def test_tags_show_version_and_root(ollama, client):
    tags = (await client.request("GET", ollama.url + "/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == ["llama3:latest", "qwen2.5:7b", "nomic-embed-text:latest",
                                         "huge:70b"]
    assert all(m["model"] == m["name"] and m["size"] > 0 and len(m["digest"]) == 64
               and m["details"]["format"] == "gguf" and m["modified_at"] for m in tags)
    show = (await post(client, ollama.url + "/api/show", {"model": "nomic-embed-text"})).json()
    assert show["capabilities"] == ["embedding"] and show["details"]["family"] == "bert"
    version = await client.request("GET", ollama.url + "/api/version")
    assert version.json()["version"]
    root = await client.request("GET", ollama.url + "/")
    assert root.body == b"Ollama is running"
    head = await client.request("HEAD", ollama.url + "/")
    assert head.code == 200 and head.body == b""


# -- the OpenAI-compatible API ------------------------------------------------------------------------


def sse_events(body: bytes) -> list:
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest_twisted.ensureDeferred
async def test_openai_chat_streams_sse_chunks_then_done(ollama, client):
    reply = await post(client, ollama.url + "/v1/chat/completions", {
        "model": "llama3", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}]})
    assert reply.code == 200 and reply.header("Content-Type") == b"text/event-stream"
    events = sse_events(reply.body)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in events[:-1]}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert len(reply.collector.chunks) == 4  # one write per token, the last with [DONE]


@pytest_twisted.ensureDeferred
async def test_openai_non_streamed_completions_and_embeddings(ollama, client):
    chat = (await post(client, ollama.url + "/v1/chat/completions", {
        "model": "llama3", "messages": [{"role": "user", "content": "hi there"}]})).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"] == [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "tok0 tok1 tok2 "}}]
    assert chat["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    text = (await post(client, ollama.url + "/v1/completions",
                       {"model": "llama3", "prompt": "once"})).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "tok0 tok1 tok2 "
    streamed = sse_events((await post(client, ollama.url + "/v1/completions", {
        "model": "llama3", "prompt": "once", "stream": True})).body)
    assert [e["choices"][0]["text"] for e in streamed[:-1]] == ["tok0 ", "tok1 ", "tok2 ", ""]
    floats = (await post(client, ollama.url + "/v1/embeddings",
                         {"model": "nomic-embed-text", "input": "a"})).json()
    packed = (await post(client, ollama.url + "/v1/embeddings", {
        "model": "nomic-embed-text", "input": ["a"], "encoding_format": "base64"})).json()
    vector = floats["data"][0]["embedding"]
    decoded = struct.unpack("<16f", base64.b64decode(packed["data"][0]["embedding"]))
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    assert decoded == pytest.approx(vector, abs=1e-6)


@pytest_twisted.ensureDeferred
async def test_openai_models_and_errors(world, ollama, client):
    models = (await client.request("GET", ollama.url + "/v1/models")).json()
    assert models["object"] == "list"
    assert models["data"][0] == {"id": "llama3:latest", "object": "model",
                                 "created": models["data"][0]["created"], "owned_by": "library"}
    one = await client.request("GET", ollama.url + "/v1/models/qwen2.5:7b")
    assert one.json()["id"] == "qwen2.5:7b"
    missing = await client.request("GET", ollama.url + "/v1/models/nope")
    assert missing.code == 404 and missing.json()["error"]["type"] == "not_found_error"
    no_messages = await post(client, ollama.url + "/v1/chat/completions", {"model": "llama3"})
    assert no_messages.code == 400
    assert no_messages.json()["error"]["type"] == "invalid_request_error"
    oom = await post(client, ollama.url + "/v1/chat/completions", {
        "model": "huge:70b", "messages": [{"role": "user", "content": "x"}]})
    assert oom.code == 500 and "CUDA out of memory" in oom.json()["error"]["message"]
    assert world.total_jobs == 0


# -- the official clients ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_official_ollama_client_understands_the_simulation(ollama):
    import ollama as ollama_lib

    def use_client():
        c = ollama_lib.Client(host=ollama.url)
        messages = [{"role": "user", "content": "hi"}]
        streamed = "".join(part.message.content for part in c.chat(
            model="llama3", messages=messages, stream=True))
        whole = c.chat(model="llama3", messages=messages)
        generated = c.generate(model="qwen2.5:7b", prompt="hi")
        listed = [m.model for m in c.list().models]
        running = [(m.model, m.size_vram) for m in c.ps().models]
        embedded = c.embed(model="nomic-embed-text", input=["a", "b"]).embeddings
        try:
            c.chat(model="nope", messages=messages)
            missing = None
        except ollama_lib.ResponseError as e:
            missing = (e.status_code, e.error)
        return streamed, whole, generated, listed, running, embedded, missing

    streamed, whole, generated, listed, running, embedded, missing = await threads.deferToThread(
        use_client)
    assert streamed == "tok0 tok1 tok2 " and whole.message.content == streamed and whole.done
    assert generated.response == "tok0 tok1 tok2 " and generated.done_reason == "stop"
    assert listed == ["llama3:latest", "qwen2.5:7b", "nomic-embed-text:latest", "huge:70b"]
    assert running == [("llama3:latest", 9000 << 20), ("qwen2.5:7b", 6000 << 20)]
    assert len(embedded) == 2 and len(embedded[0]) == 16
    assert missing[0] == 404 and "not found" in missing[1]


@pytest_twisted.ensureDeferred
async def test_the_official_openai_client_understands_the_simulation(ollama):
    import openai

    def use_client():
        c = openai.OpenAI(base_url=ollama.url + "/v1", api_key="x", max_retries=0)
        try:
            chunks = list(c.chat.completions.create(
                model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True))
            whole = c.chat.completions.create(model="llama3",
                                              messages=[{"role": "user", "content": "hi"}])
            models = [m.id for m in c.models.list()]
            vector = c.embeddings.create(model="nomic-embed-text", input="a").data[0].embedding
            try:
                c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
                missing = None
            except openai.NotFoundError as e:
                missing = e.status_code
            return chunks, whole, models, vector, missing
        finally:
            c.close()

    chunks, whole, models, vector, missing = await threads.deferToThread(use_client)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content == "tok0 tok1 tok2 " and whole.usage.total_tokens == 4
    assert models == ["llama3:latest", "qwen2.5:7b", "nomic-embed-text:latest", "huge:70b"]
    assert len(vector) == 16 and missing == 404


@pytest_twisted.ensureDeferred
async def test_a_stopped_ollama_drops_its_streams_and_all_its_memory(world, ollama, client):
    from twisted.internet.error import ConnectionRefusedError

    gates: dict[int, defer.Deferred] = {}
    ollama.behaviour.stream_gate = lambda i: gates.setdefault(i, defer.Deferred())
    await post(client, ollama.url + "/api/generate", {"model": "qwen2.5:7b"})
    stream = defer.ensureDeferred(post(client, ollama.url + "/api/generate",
                                       {"model": "llama3", "prompt": "hold"}))
    await wait_for(lambda: 1 in gates, timeout_s=5)
    await world.stop_consumer("ollama")
    cut = await stream
    assert not cut.complete  # the body was cut off, not finished
    assert not ollama_allocations(world) and ollama.loaded_models() == []
    gates[1].callback(None)  # the dead stream's next write finds its client gone
    await wait_for(lambda: world.active_jobs == 0, timeout_s=5)
    assert ollama.jobs_cancelled == 1
    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", ollama.url + "/api/ps")
    world.restart_consumer("ollama")
    ollama.behaviour.stream_gate = None
    assert (await client.request("GET", ollama.url + "/api/ps")).json() == {"models": []}
    reply = await post(client, ollama.url + "/api/generate", {"model": "llama3", "prompt": "x"})
    assert reply.code == 200 and ollama.loaded_models() == ["llama3:latest"]
