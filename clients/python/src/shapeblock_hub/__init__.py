"""Async client of the ShapeBlock hub's API (`shapeblock.hub.v1`).

async with HubClient("127.0.0.1:7444", api_key, ca_pem) as hub:
    token = await hub.create_enrollment_token("prod")
    print(token.install_line)
    async for event in hub.watch_events(cursor):
        ...
"""

from ._generated import hub_pb2 as pb
from .client import (
    FailedPrecondition,
    HubClient,
    HubError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    wait_for,
)

__all__ = [
    "FailedPrecondition",
    "HubClient",
    "HubError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "pb",
    "wait_for",
]
