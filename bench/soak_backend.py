#!/usr/bin/env python3
"""A backend for bench/soak.sh whose faults the soak turns on and off.

Standard library only (asyncio). One process serves, on `--port`, HTTP/1.1
(keep-alive) and WebSocket echo (an `Upgrade: websocket` request), and on
`--tcp-port` (unless 0) a line echo for the TCP listener.

HTTP answers `ok <name>` (GET) or `ok <name> <body length>` (POST); `/health`
answers `ok`. The soak sets a mode, at once and without the proxy, with
`GET /__mode/<mode>`:

- `ok`: as above.
- `slow`: every response (health checks included) 2 s late.
- `error`: every response, health checks included, is a 500.
- `reset`: every request except health checks is read whole (body too)
  and answered with a head and half its body, then the connection is reset
  (RST): a reset mid-body.

`GET /__stats` answers `<requests> <health checks>`.
"""

import argparse
import asyncio
import base64
import hashlib
import socket
import struct
import sys

MODE = {"mode": "ok"}
STATS = {"requests": 0, "health": 0}
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def http_response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 500: b"Internal Server Error", 101: b"Switching Protocols"}
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
        % (status, reason.get(status, b"X"), len(body), extra)
        + body
    )


def reset(writer: asyncio.StreamWriter) -> None:
    """Closes with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes WebSocket text/binary frames until a close frame or EOF."""
    while True:
        head = await reader.readexactly(2)
        opcode = head[0] & 0x0F
        masked = head[1] & 0x80
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        mask = await reader.readexactly(4) if masked else b"\0\0\0\0"
        data = bytearray(await reader.readexactly(n))
        for i in range(n):
            data[i] ^= mask[i % 4]
        if opcode == 8:  # close: answer it and stop
            writer.write(b"\x88\x00")
            await writer.drain()
            return
        if opcode in (1, 2):
            out = bytes([0x80 | opcode])
            if n < 126:
                out += bytes([n])
            elif n < 65536:
                out += bytes([126]) + struct.pack("!H", n)
            else:
                out += bytes([127]) + struct.pack("!Q", n)
            writer.write(out + bytes(data))
            await writer.drain()


async def handle_http(reader, writer, name: bytes) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            line, _, rest = head.partition(b"\r\n")
            parts = line.split()
            method, path = (parts[0], parts[1]) if len(parts) > 1 else (b"GET", b"/")
            headers = {}
            for h in rest.split(b"\r\n"):
                k, _, v = h.partition(b":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get(b"content-length", b"0") or 0)
            body = await reader.readexactly(length) if length else b""
            if path.startswith(b"/__mode/"):
                MODE["mode"] = path[len(b"/__mode/"):].decode()
                writer.write(http_response(200, MODE["mode"].encode()))
                await writer.drain()
                continue
            if path.startswith(b"/__stats"):
                writer.write(http_response(200, b"%d %d" % (STATS["requests"], STATS["health"])))
                await writer.drain()
                continue
            health = path.startswith(b"/health")
            STATS["health" if health else "requests"] += 1
            mode = MODE["mode"]
            if mode == "slow":
                await asyncio.sleep(2)
            if mode == "error":
                writer.write(http_response(500, b"error " + name))
                await writer.drain()
                continue
            if b"websocket" in headers.get(b"upgrade", b"").lower():
                key = headers.get(b"sec-websocket-key", b"")
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                await writer.drain()
                await ws_echo(reader, writer)
                return
            if health:
                answer = b"ok"
            elif method == b"POST":
                answer = b"ok %s %d" % (name, len(body))
            else:
                answer = b"ok " + name
            if mode == "reset" and not health:
                full = http_response(200, answer + b" " + b"x" * 64)
                writer.write(full[: len(full) - 40])
                await writer.drain()
                reset(writer)
                return
            writer.write(http_response(200, answer))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def handle_tcp(reader, writer) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tcp-port", type=int, default=0, help="0: no TCP echo")
    ap.add_argument("--name", required=True)
    a = ap.parse_args()
    name = a.name.encode()
    http = await asyncio.start_server(lambda r, w: handle_http(r, w, name), "127.0.0.1", a.port, backlog=1024)
    if not a.tcp_port:
        async with http:
            await http.serve_forever()
        return
    tcp = await asyncio.start_server(handle_tcp, "127.0.0.1", a.tcp_port, backlog=1024)
    async with http, tcp:
        await asyncio.gather(http.serve_forever(), tcp.serve_forever())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
