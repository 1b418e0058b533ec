"""Bench clients, each run as its own process; each prints one JSON object.

    python bench/client.py latency  HOST PORT PATH N BODY_BYTES
    python bench/client.py stream   HOST PORT PATH
    python bench/client.py download HOST PORT PATH
    python bench/client.py upload   HOST PORT PATH MIB
    python bench/client.py burst    HOST PORT PATH N [hold_s]
    python bench/client.py status   HOST PORT N

Standard library only, so the client is the same program on every path.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import time


def latency(host, port, path, n, body_bytes):
    """Sequential POSTs on one keep-alive connection. A server that closes the
    connection without a response (nginx sometimes does after `return`) costs
    a reconnect; that request's time is dropped and the reconnect counted."""
    body = b"x" * int(body_bytes)
    conn = http.client.HTTPConnection(host, int(port))
    times = []
    reconnects = 0
    while len(times) < int(n):
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, {"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            reconnects += 1
            if reconnects > max(10, int(n) // 10):
                raise
            conn.close()
            conn = http.client.HTTPConnection(host, int(port))
            continue
        times.append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status} from {path}")
    return {"latency_ms": times, "reconnects": reconnects}


def stream(host, port, path):
    conn = http.client.HTTPConnection(host, int(port))
    t0 = time.time()
    conn.request("POST", path, b'{"prompt":"bench"}', {"Content-Type": "application/json"})
    resp = conn.getresponse()
    delays, reads, coalesced, first = [], 0, 0, None
    buf = b""
    while True:
        data = resp.read1(65536)
        if not data:
            break
        now = time.time()
        if first is None:
            first = now
        reads += 1
        buf += data
        lines = buf.split(b"\n")
        buf = lines.pop()
        complete = [line for line in lines if line]
        if len(complete) > 1:
            coalesced += 1
        for line in complete:
            delays.append((now - json.loads(line)["sent"]) * 1000)
    return {"ttfb_ms": (first - t0) * 1000, "relay_delay_ms": delays, "reads": reads,
            "lines": len(delays), "coalesced_reads": coalesced, "status": resp.status}


def download(host, port, path):
    conn = http.client.HTTPConnection(host, int(port))
    t0 = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = resp.readinto(view)
        if not n:
            break
        total += n
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "mib_s": total / seconds / 2**20,
            "status": resp.status}


def upload(host, port, path, mib):
    size = int(mib) * 2**20
    block = b"u" * (1 << 20)

    def body():
        for _ in range(size // len(block)):
            yield block

    conn = http.client.HTTPConnection(host, int(port))
    t0 = time.perf_counter()
    conn.request("POST", path, body(), {"Content-Length": str(size),
                                        "Content-Type": "application/octet-stream"})
    resp = conn.getresponse()
    resp.read()
    seconds = time.perf_counter() - t0
    return {"bytes": size, "seconds": seconds, "mib_s": size / seconds / 2**20,
            "status": resp.status}


async def _one(host, port, path, results, hold_s):
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n"
                 f"Connection: close\r\n\r\n{{}}".encode())
    await writer.drain()
    if hold_s:
        await asyncio.sleep(hold_s)  # sit in the queue, then leave
        writer.close()
        results.append("left")
        return
    data = await reader.read()
    results.append(data.split(b" ", 2)[1].decode() if data else "closed")
    writer.close()


async def _burst(host, port, path, n, hold_s):
    results: list[str] = []
    await asyncio.gather(*(_one(host, port, path, results, hold_s) for _ in range(n)))
    return results


def burst(host, port, path, n, hold_s="0"):
    t0 = time.perf_counter()
    results = asyncio.run(_burst(host, port, path, int(n), float(hold_s)))
    codes: dict[str, int] = {}
    for r in results:
        codes[r] = codes.get(r, 0) + 1
    return {"codes": codes, "seconds": time.perf_counter() - t0}


def status(host, port, n):
    conn = http.client.HTTPConnection(host, int(port))
    times, depth = [], None
    for _ in range(int(n)):
        t0 = time.perf_counter()
        conn.request("GET", "/v1/status")
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        times.append((time.perf_counter() - t0) * 1000)
        depth = doc["scheduler"]["queue_depth"]
    return {"latency_ms": times, "queue_depth": depth}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    try:
        print(json.dumps(globals()[command](*args)))
    except Exception as e:
        raise SystemExit(f"{command} {' '.join(args[:3])}: {type(e).__name__}: {e}") from None
