"""The suite runs against a real hub process with a real agent on the test cluster, started by
`cargo test --test python_client` (tests/python_client.rs), which passes where they are in
the environment. Only the drift test needs neither."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shapeblock_hub import HubClient


@dataclass(frozen=True)
class Live:
    api: str
    api_key: str
    ca_pem: bytes
    # A cluster whose agent is connected.
    cluster: str


@pytest.fixture(scope="session")
def live() -> Live:
    names = [
        "SHAPEBLOCK_HUB_API",
        "SHAPEBLOCK_HUB_API_KEY",
        "SHAPEBLOCK_HUB_CA",
        "SHAPEBLOCK_TEST_CLUSTER",
    ]
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: run the suite with `cargo test --test python_client`, "
            "which starts the hub and an agent"
        )
    return Live(
        api=os.environ["SHAPEBLOCK_HUB_API"],
        api_key=os.environ["SHAPEBLOCK_HUB_API_KEY"],
        ca_pem=Path(os.environ["SHAPEBLOCK_HUB_CA"]).read_bytes(),
        cluster=os.environ["SHAPEBLOCK_TEST_CLUSTER"],
    )


@pytest.fixture
async def hub(live: Live) -> AsyncIterator[HubClient]:
    async with HubClient(live.api, live.api_key, live.ca_pem) as client:
        yield client
