#!/usr/bin/env python3
"""The mixed load of bench/soak.sh: HTTP/1.1, TCP and WebSocket clients
against datapunk-lb, each outcome counted by cause. (HTTP/2 load is h2load,
started beside it by soak.sh.)

Standard library only (asyncio). Every client runs a closed loop with a
pause between requests (`--pause`), so the load is steady and modest: the
soak is about losing nothing, not about speed.

- HTTP/1.1 (`--http N` keep-alive connections): 80 % `GET /item`, 20 %
  `POST /item` with a 1 KiB body; ok = 200 with a body that starts `ok `.
- HTTP/1.1 to the etcd-discovered service (`--disc N` keep-alive
  connections, counted as `http1_disc`): `GET /disc/item` only.
- TCP (`--tcp N` connections): a line out, the same line back; each
  connection is replaced after 100 lines so new connections get balanced.
- WebSocket (`--ws N` connections through the HTTP listener): a text frame
  out, the same back; replaced after 200 messages.

Causes: `ok`, `status_<code>`, `connect` (refused or failed), `reset` (the
connection broke before the answer was whole), `timeout` (no answer within
`--timeout`), `bad_answer` (an answer that is not the expected one),
`handshake_<code>` (a WebSocket upgrade answered without 101).

Every second one JSON line `{"t": …, "<proto>": {"<cause>": count}}` with
the counts of that second goes to stdout; at the end (after `--duration`
seconds, or SIGTERM) one line `{"total": {…}}`.
"""

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import struct
import time
from collections import Counter

COUNTS = {"http1_get": Counter(), "http1_post": Counter(), "tcp": Counter(), "ws": Counter(), "http1_disc": Counter()}
TOTAL = {k: Counter() for k in COUNTS}


def count(proto: str, cause: str) -> None:
    COUNTS[proto][cause] += 1
    TOTAL[proto][cause] += 1


async def connect(host, port, a, proto):
    """A connection, or None after counting a `connect` failure and pausing."""
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), a.timeout)
    except (OSError, asyncio.TimeoutError):
        count(proto, "connect")
        await asyncio.sleep(a.pause)
        return None


async def read_response(reader: asyncio.StreamReader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    body = await reader.readexactly(length)
    return status, body


async def http_client(host, port, a, stop, path=b"/item", get_proto="http1_get", post_share=0.2) -> None:
    reader = writer = None
    rng = random.Random()
    while not stop.is_set():
        post = rng.random() < post_share
        proto = "http1_post" if post else get_proto
        try:
            if writer is None:
                conn = await connect(host, port, a, proto)
                if conn is None:
                    continue
                reader, writer = conn
            if post:
                body = b"p" * 1024
                writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: soak\r\nContent-Length: 1024\r\n\r\n" + body)
            else:
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: soak\r\n\r\n")
            await writer.drain()
            status, answer = await asyncio.wait_for(read_response(reader), a.timeout)
            if status != 200:
                count(proto, f"status_{status}")
            elif not answer.startswith(b"ok "):
                count(proto, "bad_answer")
            else:
                count(proto, "ok")
        except asyncio.TimeoutError:
            count(proto, "timeout")
            writer.close()
            writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            count(proto, "reset")
            if writer is not None:
                writer.close()
            writer = None
        await asyncio.sleep(a.pause)
    if writer is not None:
        writer.close()


async def tcp_client(host, port, a, stop) -> None:
    n = 0
    while not stop.is_set():
        conn = await connect(host, port, a, "tcp")
        if conn is None:
            continue
        reader, writer = conn
        try:
            for _ in range(100):
                if stop.is_set():
                    break
                n += 1
                line = b"line %d\n" % n
                writer.write(line)
                await writer.drain()
                got = await asyncio.wait_for(reader.readline(), a.timeout)
                if not got:
                    count("tcp", "reset")
                    break
                count("tcp", "ok" if got == line else "bad_answer")
                await asyncio.sleep(a.pause)
        except asyncio.TimeoutError:
            count("tcp", "timeout")
        except OSError:
            count("tcp", "reset")
        writer.close()


def ws_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = b"\x81" + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + masked


async def ws_read(reader) -> bytes:
    head = await reader.readexactly(2)
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return await reader.readexactly(n)


async def ws_client(host, port, a, stop) -> None:
    n = 0
    while not stop.is_set():
        conn = await connect(host, port, a, "ws")
        if conn is None:
            continue
        reader, writer = conn
        try:
            key = base64.b64encode(os.urandom(16))
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), a.timeout)
            status = int(head.split(b" ", 2)[1])
            if status != 101:
                count("ws", f"handshake_{status}")
                writer.close()
                await asyncio.sleep(a.pause)
                continue
            for _ in range(200):
                if stop.is_set():
                    break
                n += 1
                msg = b"message %d" % n
                writer.write(ws_frame(msg))
                await writer.drain()
                got = await asyncio.wait_for(ws_read(reader), a.timeout)
                count("ws", "ok" if got == msg else "bad_answer")
                await asyncio.sleep(a.pause)
            writer.write(b"\x88\x80" + os.urandom(4))
            await writer.drain()
        except asyncio.TimeoutError:
            count("ws", "timeout")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            count("ws", "reset")
        writer.close()


async def report(stop) -> None:
    start = time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
        line = {"t": round(time.monotonic() - start, 1)}
        for proto, c in COUNTS.items():
            line[proto] = dict(c)
            c.clear()
        print(json.dumps(line), flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--http-addr", required=True, help="host:port of the HTTP listener")
    ap.add_argument("--tcp-addr", required=True, help="host:port of the TCP listener")
    ap.add_argument("--http", type=int, default=16)
    ap.add_argument("--tcp", type=int, default=4)
    ap.add_argument("--ws", type=int, default=4)
    ap.add_argument("--disc", type=int, default=0, help="clients of GET /disc/item (the etcd-discovered service)")
    ap.add_argument("--pause", type=float, default=0.01, help="seconds between a client's requests")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=60.0)
    a = ap.parse_args()
    hh, hp = a.http_addr.rsplit(":", 1)
    th, tp = a.tcp_addr.rsplit(":", 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.call_later(a.duration, stop.set)
    tasks = [asyncio.create_task(http_client(hh, int(hp), a, stop)) for _ in range(a.http)]
    tasks += [asyncio.create_task(tcp_client(th, int(tp), a, stop)) for _ in range(a.tcp)]
    tasks += [asyncio.create_task(ws_client(hh, int(hp), a, stop)) for _ in range(a.ws)]
    tasks += [
        asyncio.create_task(http_client(hh, int(hp), a, stop, b"/disc/item", "http1_disc", 0.0)) for _ in range(a.disc)
    ]
    reporter = asyncio.create_task(report(stop))
    await stop.wait()
    await asyncio.wait(tasks, timeout=a.timeout + 1)
    await reporter
    print(json.dumps({"total": {k: dict(v) for k, v in TOTAL.items()}}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
