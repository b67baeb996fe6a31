#!/usr/bin/env python3
"""A tiny HTTP/1.1 backend that answers every request with 200 "ok" after a
fixed delay (default 50 ms): the slow instance of the "degraded" scenario.

Standard library only (asyncio). Keep-alive like a real server: HTTP/1.1
connections stay open unless the client sends `Connection: close`; HTTP/1.0
requests (HAProxy's health checks) are answered and closed unless they ask
for keep-alive.

The delay is `await asyncio.sleep(delay)` before each response, health
checks included (a slow instance is slow for everything), so every
response is at least `delay` late; the event loop adds well under 1 ms on
an idle core.

`GET /__stats` answers at once, without the delay, with
`<requests> <health_checks>` counted since start or since the last
`GET /__stats?reset`; the bench reads it to see what share of a run's
requests each proxy sent to the slow instance. `/health*` paths count as
health checks, everything else as requests.
"""

import argparse
import asyncio
import signal
import sys

STATS = {"requests": 0, "health": 0}


def response(body: bytes, close: bool) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: %d\r\n" % len(body)
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                break
            line, _, rest = head.partition(b"\r\n")
            parts = line.split()
            path = parts[1] if len(parts) > 1 else b"/"
            version = parts[2] if len(parts) > 2 else b"HTTP/1.0"
            length = 0
            conn = b""
            for h in rest.split(b"\r\n"):
                k, _, v = h.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v.strip() or b"0")
                elif k == b"connection":
                    conn = v.strip().lower()
            if length:
                await reader.readexactly(length)
            close = conn == b"close" or (version == b"HTTP/1.0" and conn != b"keep-alive")
            if path.startswith(b"/__stats"):
                body = b"%d %d\n" % (STATS["requests"], STATS["health"])
                if b"reset" in path:
                    STATS["requests"] = 0
                    STATS["health"] = 0
            else:
                STATS["health" if path.startswith(b"/health") else "requests"] += 1
                if delay > 0:
                    await asyncio.sleep(delay)
                body = b"ok"
            writer.write(response(body, close))
            await writer.drain()
            if close:
                break
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.05, help="seconds added to every response")
    args = p.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.delay), args.host, args.port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
