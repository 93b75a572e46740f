"""A TCP relay: ``python tcp_relay.py LISTEN_PORT TARGET_PORT``, run inside a
pod's network namespace by tests/support/chartrun.py, so a Service port that differs
from its target port (the frontend's 443 -> 8443) answers as kube-proxy would."""

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def main(listen: int, target: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, tw), pipe(tr, w), return_exceptions=True)

    server = await asyncio.start_server(handle, "0.0.0.0", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
