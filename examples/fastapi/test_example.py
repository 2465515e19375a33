"""The example against a real uvicorn server, a real hub and a real agent: an AppBuild applied
through REST is followed on the events WebSocket to Completed, and its build log arrives on
the logs WebSocket in order with no gap after the client reconnects with its cursor.

Run by `cargo test --test fastapi_example`, which starts the hub and the agent, makes the
Project, and scripts the build's pods (the environment says where everything is).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from shapeblock_hub import HubClient

HERE = Path(__file__).resolve().parent
CLUSTER = os.environ.get("SHAPEBLOCK_TEST_CLUSTER", "")
NAMESPACE = os.environ.get("SHAPEBLOCK_TEST_NAMESPACE", "")
TRANSCRIPT = os.environ.get("SHAPEBLOCK_TRANSCRIPT", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not CLUSTER:
        pytest.fail("run through `cargo test --test fastapi_example` (it starts hub and agent)")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            "5",
        ],
        cwd=HERE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/clusters", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None:
                    raise RuntimeError("uvicorn exited") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            # Left running, it would hold pytest's stdout open and the cargo test that reads
            # it would wait forever: the failure is reported, the server does not outlive it.
            process.kill()
            process.wait(10)
            raise


@pytest.fixture
async def hub() -> AsyncIterator[HubClient]:
    ca = Path(os.environ["SHAPEBLOCK_HUB_CA"]).read_bytes()
    async with HubClient(
        os.environ["SHAPEBLOCK_HUB_API"], os.environ["SHAPEBLOCK_HUB_API_KEY"], ca
    ) as client:
        yield client


def manifest(kind: str, name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }
    )


def say(line: str) -> None:
    print(line)
    if TRANSCRIPT:
        with open(TRANSCRIPT, "a") as f:
            f.write(line + "\n")


async def test_rest_routes_answer_with_the_hubs_words(server: str) -> None:
    async with httpx.AsyncClient(base_url=server) as http:
        clusters = (await http.get("/clusters")).json()
        assert any(c["id"] == CLUSTER and c["connected"] for c in clusters), clusters
        token = (await http.post("/clusters/example-new/tokens", json={"ttl_seconds": 600})).json()
        assert token["install_line"].startswith("helm install shapeblock-agent ")
        bad = await http.post(f"/clusters/{CLUSTER}/apply", json={"manifest": "kind: [x"})
        assert bad.status_code == 422 and "invalid manifest" in bad.json()["detail"]
        project = "apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata: {name: p}\n"
        unknown = await http.post("/clusters/nobody/apply", json={"manifest": project})
        assert unknown.status_code == 404 and "no cluster" in unknown.json()["detail"]


async def test_an_appbuild_is_followed_to_completed_and_its_log_survives_a_reconnect(
    server: str, hub: HubClient
) -> None:
    ws_url = server.replace("http://", "ws://")
    app = manifest(
        "App",
        "api",
        {
            "registry": {"url": "registry.example.com"},
            "build": {"type": "dockerfile"},
            "git": {"url": "https://github.com/example/api.git"},
        },
    )
    build = manifest("AppBuild", "api-1", {"appName": "api", "gitRef": "main"})
    key = f"AppBuild/{NAMESPACE}/api-1"
    async with (
        httpx.AsyncClient(base_url=server) as http,
        websockets.connect(f"{ws_url}/ws/clusters/{CLUSTER}/events?cursor=0") as events,
    ):
        for body, idem in ((app, "app-api"), (build, "build-api-1")):
            sent = await http.post(
                f"/clusters/{CLUSTER}/apply",
                json={"manifest": body},
                headers={"Idempotency-Key": idem},
            )
            sent.raise_for_status()
            again = await http.post(
                f"/clusters/{CLUSTER}/apply",
                json={"manifest": body},
                headers={"Idempotency-Key": idem},
            )
            assert again.json() == {**sent.json(), "replayed": True}
            say(f"POST /clusters/{CLUSTER}/apply ({idem}) -> {sent.json()}")

        phases: list[str] = []

        async def until_completed() -> None:
            async for message in events:
                text = message if isinstance(message, str) else message.decode()
                event = json.loads(text)
                if event["object"] == key or event["kind"] in ("log_opened", "log_ended"):
                    say(f"ws events <- {text}")
                if event["kind"] == "phase" and event["object"] == key:
                    phases.append(event["phase"])
                    if event["phase"] in ("Completed", "Failed", "Cancelled"):
                        return

        await asyncio.wait_for(until_completed(), 120)
    assert phases[-1] == "Completed", phases
    assert "Building" in phases, phases

    # The build log: two messages, a reconnect from the cursor, then the rest.
    stream = f"{NAMESPACE}/api-1/build"
    received = b""
    cursor = 0
    url = f"{ws_url}/ws/clusters/{CLUSTER}/logs?stream={stream}"
    async with websockets.connect(f"{url}&offset=0", max_size=None) as logs:
        for _ in range(2):
            chunk = json.loads(await logs.recv())
            assert chunk["offset"] == cursor, "in order, no gap"
            received += base64.b64decode(chunk["data"])
            cursor = chunk["next_offset"]
    say(f"ws logs: {len(received)} bytes in 2 messages, disconnected at offset {cursor}")
    ended = False
    async with websockets.connect(f"{url}&offset={cursor}", max_size=None) as logs:
        async for message in logs:
            chunk = json.loads(message)
            assert chunk["offset"] == cursor, "in order, no gap after the reconnect"
            received += base64.b64decode(chunk["data"])
            cursor = chunk["next_offset"]
            ended = chunk["eof"]
    say(f"ws logs: reconnected with offset; {len(received)} bytes in all, eof {ended}")
    assert ended
    whole = await hub.read_log(CLUSTER, stream, 0, 0)
    stored = whole.data
    while not whole.eof and whole.data:
        whole = await hub.read_log(CLUSTER, stream, whole.next_offset, 0)
        stored += whole.data
    assert received == stored, "exactly the hub's copy"
    assert received.count(b"\n") > 1000
    assert received.startswith(b"step 0 ") and b"\nstep 1999 " in received
