"""A small ShapeBlock server on the hub's API: a few REST routes and two WebSocket relays.

    SHAPEBLOCK_HUB_API=https://127.0.0.1:7444 SHAPEBLOCK_HUB_API_KEY=sbk_... \\
    SHAPEBLOCK_HUB_CA=hub-data/ca.pem uvicorn app:app

What a browser gets over the WebSockets is JSON, one message per event or log chunk, each with
the cursor to reconnect with (`id` for events, `next_offset` for logs): a browser that
reconnects with it misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, HTTPException, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

from shapeblock_hub import HubClient, HubError, InvalidArgument, NotFound, pb


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ca = Path(os.environ["SHAPEBLOCK_HUB_CA"]).read_bytes()
    async with HubClient(
        os.environ["SHAPEBLOCK_HUB_API"], os.environ["SHAPEBLOCK_HUB_API_KEY"], ca
    ) as hub:
        app.state.hub = hub
        yield


app = FastAPI(title="ShapeBlock example server", lifespan=lifespan)


def hub_of(app_: Any) -> HubClient:
    hub: HubClient = app_.state.hub
    return hub


def refused(e: HubError) -> HTTPException:
    status = 404 if isinstance(e, NotFound) else 422 if isinstance(e, InvalidArgument) else 502
    return HTTPException(status_code=status, detail=e.message)


class TokenRequest(BaseModel):
    ttl_seconds: int = 3600


class ApplyRequest(BaseModel):
    manifest: str


@app.post("/clusters/{cluster_id}/tokens")
async def create_token(cluster_id: str, body: TokenRequest) -> dict[str, Any]:
    try:
        made = await hub_of(app).create_enrollment_token(cluster_id, ttl_seconds=body.ttl_seconds)
    except HubError as e:
        raise refused(e) from None
    return {"token_id": made.token.id, "install_line": made.install_line}


@app.get("/clusters")
async def list_clusters() -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "connected": c.connected,
            "agent_version": c.agent_version,
            "last_heartbeat": c.last_heartbeat,
        }
        for c in await hub_of(app).list_clusters()
    ]


@app.post("/clusters/{cluster_id}/apply")
async def apply(
    cluster_id: str,
    body: ApplyRequest,
    idempotency_key: str = Header(default=""),
) -> dict[str, Any]:
    """A manifest to apply; the `Idempotency-Key` header makes a retried request harmless."""
    try:
        accepted = await hub_of(app).apply(
            cluster_id, body.manifest, idempotency_key=idempotency_key
        )
    except HubError as e:
        raise refused(e) from None
    return {"command_id": accepted.command_id, "replayed": accepted.replayed}


@app.get("/clusters/{cluster_id}/commands/{command_id}")
async def command(cluster_id: str, command_id: int) -> dict[str, Any]:
    try:
        c = await hub_of(app).get_command(cluster_id, command_id)
    except HubError as e:
        raise refused(e) from None
    return {
        "state": pb.CommandState.Name(c.state).removeprefix("COMMAND_STATE_").lower(),
        "message": c.message,
    }


def event_json(e: pb.Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower(),
        "object": e.object,
        "phase": e.phase,
        "reason": e.reason,
        "message": e.message,
        "command_id": e.command_id,
        "ok": e.ok,
    }


async def until_disconnected(websocket: WebSocket) -> None:
    """Returns when the browser goes (anything it sends is ignored)."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


@app.websocket("/ws/clusters/{cluster_id}/events")
async def events(websocket: WebSocket, cluster_id: str, cursor: int = 0) -> None:
    """A cluster's events after `cursor`, live."""
    await websocket.accept()

    async def relay() -> None:
        try:
            async for event in hub_of(app).watch_events(cursor, cluster_id=cluster_id):
                await websocket.send_json(event_json(event))
        except WebSocketDisconnect:
            return
        except HubError as e:
            await websocket.close(code=4404 if isinstance(e, NotFound) else 1011, reason=e.message)

    # A watch with nothing new to send would not notice a browser that left until the next
    # event, holding a hub watcher (and the server's shutdown) meanwhile: whichever ends
    # first, the relay or the browser, ends both.
    relaying = asyncio.ensure_future(relay())
    gone = asyncio.ensure_future(until_disconnected(websocket))
    await asyncio.wait({relaying, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in (relaying, gone):
        task.cancel()
    relayed, _ = await asyncio.gather(relaying, gone, return_exceptions=True)
    if isinstance(relayed, Exception):
        raise relayed


@app.websocket("/ws/clusters/{cluster_id}/logs")
async def logs(websocket: WebSocket, cluster_id: str, stream: str, offset: int = 0) -> None:
    """A log stream from `offset` until its end; the data base64 (logs are bytes)."""
    await websocket.accept()
    try:
        async for chunk in hub_of(app).follow_logs(cluster_id, stream, offset):
            await websocket.send_json(
                {
                    "offset": chunk.offset,
                    "data": base64.b64encode(chunk.data).decode(),
                    "next_offset": chunk.next_offset,
                    "truncated": chunk.truncated,
                    "eof": chunk.eof,
                }
            )
        await websocket.close()
    except WebSocketDisconnect:
        return
    except HubError as e:
        await websocket.close(code=4404 if isinstance(e, NotFound) else 1011, reason=e.message)
