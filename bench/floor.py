"""The floor: the least a Litestar + aiohttp pass-through costs, served like the gateway.

python -m bench.floor --port N --upstream http://127.0.0.1:M/v1/chat/completions
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn
from litestar import Litestar, Request, Response, post
from litestar.response import Stream

_HEADERS = {"Content-Type": "application/json"}


def create_app(upstream: str) -> Litestar:
    session: list[aiohttp.ClientSession] = []

    async def start() -> None:
        session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))

    async def stop() -> None:
        await session[0].close()

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request) -> Response[bytes] | Stream:
        resp = await session[0].post(upstream, data=await request.body(), headers=_HEADERS)
        if resp.content_type != "text/event-stream":
            async with resp:
                return Response(await resp.read(), media_type="application/json")

        async def relay():  # the SSE bytes as they come
            async with resp:
                async for data in resp.content.iter_any():
                    yield data

        return Stream(relay(), media_type="text/event-stream")

    return Litestar(
        [chat], on_startup=[start], on_shutdown=[stop], openapi_config=None, logging_config=None
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = create_app(args.upstream)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False,
    )  # fmt: skip
