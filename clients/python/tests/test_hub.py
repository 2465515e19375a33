"""The client against a real hub and a real agent (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncGenerator

import pytest
from conftest import Live

from shapeblock_hub import (
    FailedPrecondition,
    HubClient,
    HubError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    pb,
    wait_for,
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def project(name: str) -> str:
    return (
        "apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\n"
        f"metadata:\n  name: {name}\nspec: {{}}\n"
    )


async def test_a_wrong_key_is_unauthenticated(live: Live) -> None:
    async with HubClient(live.api, "sbk_" + "0" * 64, live.ca_pem) as wrong:
        with pytest.raises(Unauthenticated, match="unknown or revoked API key"):
            await wrong.list_clusters()
        with pytest.raises(Unauthenticated):
            await wrong.apply(live.cluster, project(unique("nope")))


async def test_the_connected_cluster_is_listed_with_what_its_agent_said(
    hub: HubClient, live: Live
) -> None:
    cluster = await hub.get_cluster(live.cluster)
    assert cluster.connected and not cluster.revoked
    assert cluster.session_epoch >= 1
    assert "apply" in cluster.capabilities
    assert cluster.inventory.node_count >= 1
    assert cluster.certificate_not_after > 0
    assert live.cluster in [c.id for c in await hub.list_clusters()]
    info = await hub.get_hub()
    assert info.ca_hash.startswith("sha256:") and info.sessions >= 1


async def test_tokens_are_created_listed_and_revoked_while_unused(hub: HubClient) -> None:
    cluster = unique("py")
    made = await hub.create_enrollment_token(cluster, ttl_seconds=600)
    assert made.secret.startswith("sbt_")
    assert made.install_line.startswith("helm install shapeblock-agent ")
    assert f"enrollment.token={made.secret}" in made.install_line
    listed = await hub.list_enrollment_tokens(cluster)
    assert [(t.id, t.used) for t in listed] == [(made.token.id, False)]
    assert made.secret not in str(listed), "a listing never shows a token"
    await hub.revoke_enrollment_token(made.token.id)
    assert await hub.list_enrollment_tokens(cluster) == []
    with pytest.raises(NotFound):
        await hub.revoke_enrollment_token(made.token.id)


async def test_bad_input_gets_the_hubs_reason_and_queues_nothing(
    hub: HubClient, live: Live
) -> None:
    with pytest.raises(InvalidArgument, match="invalid manifest"):
        await hub.apply(live.cluster, "kind: [Project")
    config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: default}\n"
    with pytest.raises(InvalidArgument, match="ConfigMap"):
        await hub.apply(live.cluster, config_map)
    with pytest.raises(InvalidArgument, match="the limit is"):
        await hub.apply(live.cluster, project("big") + "  x: " + "y" * (3 << 20) + "\n")
    with pytest.raises(NotFound, match="no cluster"):
        await hub.apply(unique("nobody"), project("p"))
    with pytest.raises(NotFound):
        await hub.get_cluster(unique("nobody"))


async def test_an_applied_project_is_queued_once_per_key_and_comes_back_ready(
    hub: HubClient, live: Live
) -> None:
    name = unique("py")
    key = f"Project//{name}"
    first = await hub.apply(live.cluster, project(name), idempotency_key=f"create-{name}")
    again = await hub.apply(live.cluster, project(name), idempotency_key=f"create-{name}")
    assert again.command_id == first.command_id and again.replayed and not first.replayed
    with pytest.raises(FailedPrecondition, match="another request"):
        await hub.apply(live.cluster, project(unique("other")), idempotency_key=f"create-{name}")

    async def answered() -> pb.Command | None:
        command = await hub.get_command(live.cluster, first.command_id)
        done = (pb.COMMAND_STATE_SUCCEEDED, pb.COMMAND_STATE_FAILED)
        return command if command.state in done else None

    command = await wait_for(answered, what="the command's result")
    assert command.state == pb.COMMAND_STATE_SUCCEEDED, command
    assert (command.kind, command.object) == ("apply", key)

    async def ready() -> bool:
        objects = await hub.list_objects(live.cluster)
        return any(o.key == key and o.phase == "Ready" for o in objects)

    await wait_for(ready, what="the Project Ready")
    # The feed has it all, in order: queued once, the result, the phase.
    seen: list[pb.Event] = []

    async def collect() -> None:
        async for event in hub.watch_events(0, cluster_id=live.cluster):
            seen.append(event)
            if event.kind == pb.EVENT_KIND_PHASE and event.object == key and event.phase == "Ready":
                return

    await asyncio.wait_for(collect(), 30)
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids))
    mine = [e for e in seen if e.object == key]
    kinds = [pb.EventKind.Name(e.kind) for e in mine]
    assert kinds.count("EVENT_KIND_COMMAND_QUEUED") == 1, kinds
    assert kinds.index("EVENT_KIND_COMMAND_QUEUED") < kinds.index("EVENT_KIND_COMMAND_RESULT")
    await hub.delete(live.cluster, "Project", name)


async def test_a_set_config_value_never_comes_back(hub: HubClient, live: Live) -> None:
    value = unique("s3cret")
    accepted = await hub.set_config(
        live.cluster, unique("ns"), "web", set={"DATABASE_PASSWORD": value}
    )

    async def answered() -> pb.Command | None:
        command = await hub.get_command(live.cluster, accepted.command_id)
        return command if command.state >= pb.COMMAND_STATE_SUCCEEDED else None

    command = await wait_for(answered, what="the set-config result")
    events: list[pb.Event] = []

    async def collect() -> None:
        async for event in hub.watch_events(0, cluster_id=live.cluster):
            events.append(event)
            if event.kind == pb.EVENT_KIND_COMMAND_RESULT and (
                event.command_id == accepted.command_id
            ):
                return

    await asyncio.wait_for(collect(), 30)
    assert value not in f"{accepted}{command}{events}"


async def test_watch_events_resumes_by_itself_after_the_hub_cuts_a_slow_watcher(
    live: Live,
) -> None:
    # The hub of this suite holds 8 events per watcher for half a second; this watcher stops
    # reading (no window growth) while 1500 are recorded, then reads on.
    slow_options = [("grpc.http2.bdp_probe", 0)]
    async with (
        HubClient(live.api, live.api_key, live.ca_pem) as writer,
        HubClient(live.api, live.api_key, live.ca_pem, options=slow_options) as reader,
    ):
        cluster = unique("py-feed")
        await writer.create_enrollment_token(cluster)
        resumes: list[tuple[HubError, int]] = []
        events: AsyncGenerator[pb.Event] = reader.watch_events(
            0, cluster_id=cluster, on_resume=lambda e, at: resumes.append((e, at))
        )
        total = 1500
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)
        names = [f"{'x' * 50}-{i}" for i in range(total)]
        for chunk in range(0, total, 50):
            await asyncio.gather(
                *(writer.apply(cluster, project(n)) for n in names[chunk : chunk + 50])
            )
        await asyncio.sleep(1.0)
        got = [await first]
        async for event in events:
            got.append(event)
            if len(got) == total:
                break
        await events.aclose()
    assert resumes, "the hub cut the watcher at least once"
    assert all(isinstance(e, ResourceExhausted) for e, _ in resumes)
    assert all("watch again with after_id" in e.message for e, _ in resumes)
    ids = [e.id for e in got]
    assert ids == sorted(set(ids)), "in order, no duplicate"
    assert sorted(e.object for e in got) == sorted(f"Project//{n}" for n in names), "no gap"


async def test_logs_of_a_cluster_without_streams_read_empty(hub: HubClient) -> None:
    cluster = unique("py-logs")
    await hub.create_enrollment_token(cluster)
    assert await hub.list_logs(cluster) == []
    data = await hub.read_log(cluster, "ns/build-1/build")
    assert (data.data, data.next_offset, data.eof) == (b"", 0, False)
    with pytest.raises(NotFound):
        await hub.list_logs(unique("nobody"))


async def test_a_build_log_is_followed_to_its_end_from_any_offset(
    hub: HubClient, live: Live
) -> None:
    stream = os.environ.get("SHAPEBLOCK_TEST_BUILD_LOG", "")
    assert stream, "SHAPEBLOCK_TEST_BUILD_LOG: the harness runs a build"
    received = b""

    async def follow() -> None:
        nonlocal received
        async for chunk in hub.follow_logs(live.cluster, stream):
            assert chunk.offset == len(received), "in order, no gap"
            received += chunk.data

    # Followed from before the build writes (or while it does) until the end.
    await asyncio.wait_for(follow(), 90)
    lines = int(os.environ.get("SHAPEBLOCK_TEST_BUILD_LOG_LINES", "0"))
    assert received.splitlines() == [f"line {i}".encode() for i in range(lines)]
    # From an offset in the middle: the rest, and the stream is listed as ended.
    middle = received.index(b"line 250\n")
    rest = b"".join([c.data async for c in hub.follow_logs(live.cluster, stream, middle)])
    assert rest == received[middle:]
    listed = {s.stream: s for s in await hub.list_logs(live.cluster)}
    assert listed[stream].ended and listed[stream].length == len(received)


class CuttingProxy:
    """A TCP proxy in front of the hub's API that drops every open connection when told to,
    as a broken network does; new connections go through again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.connections = 0

    async def start(self, host: str) -> int:
        self._server = await asyncio.start_server(self._serve, host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, upstream_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(16384):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (pipe(reader, upstream_writer), pipe(upstream_reader, writer)):
            t = asyncio.ensure_future(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()


async def test_a_followed_log_resumes_at_its_offset_when_the_connection_breaks(
    hub: HubClient, live: Live
) -> None:
    stream = os.environ.get("SHAPEBLOCK_TEST_BUILD_LOG", "")
    assert stream, "SHAPEBLOCK_TEST_BUILD_LOG: the harness runs a build"
    whole = b"".join([c.data async for c in hub.follow_logs(live.cluster, stream)])
    assert len(whole) > 256 << 10, "a log of several 64 KiB messages"
    host, port = live.api.removeprefix("https://").rstrip("/").rsplit(":", 1)
    proxy = CuttingProxy(host, int(port))
    proxy_port = await proxy.start(host)
    resumes: list[tuple[HubError, int]] = []
    received = b""
    # Without BDP probing the stream's window stays at 64 KiB: the rest of the log is still at
    # the hub when the connection breaks.
    options = [("grpc.http2.bdp_probe", 0)]
    try:
        async with HubClient(
            f"{host}:{proxy_port}", live.api_key, live.ca_pem, options=options
        ) as through:
            follow = through.follow_logs(
                live.cluster, stream, on_resume=lambda e, at: resumes.append((e, at))
            )
            async for chunk in follow:
                assert chunk.offset == len(received), "in order, no gap, no duplicate"
                received += chunk.data
                if proxy.connections == 1 and not resumes:
                    proxy.cut()
    finally:
        await proxy.close()
    assert received == whole
    assert len(resumes) == 1, resumes
    error, offset = resumes[0]
    assert isinstance(error, Unavailable), error
    assert 0 < offset < len(whole), "resumed from the middle"
    assert proxy.connections == 2


async def test_an_apps_live_logs_are_followed_scrubbed_and_stop_when_left(
    hub: HubClient, live: Live
) -> None:
    app = os.environ.get("SHAPEBLOCK_TEST_APP", "")
    assert app, "SHAPEBLOCK_TEST_APP: the harness deploys an App"
    namespace, name = app.split("/")
    received: list[pb.AppLogData] = []

    def text() -> bytes:
        return b"".join(d.data for d in received)

    async def follow() -> None:
        # Started before the App's pod may exist: a pod that comes later is followed too.
        stream = hub.follow_app_logs(live.cluster, namespace, name, process="web")
        async with contextlib.aclosing(stream):
            async for data in stream:
                received.append(data)
                if b"web ready\n" in text():
                    return

    await asyncio.wait_for(follow(), 150)
    lines = text().splitlines()
    assert lines[0] == b"web booting" and lines[-1] == b"web ready", lines
    assert b"hunter2hunter2" not in text(), "the password was scrubbed"
    assert all(d.process == "web" and d.container == "web" for d in received)
    pod = received[0].pod
    offset = 0
    for d in (d for d in received if d.pod == pod):
        assert d.offset == offset, "in order, no gap"
        offset += len(d.data) + d.dropped
    # Leaving the loop stopped the follow.

    async def none_left() -> bool:
        return (await hub.get_hub()).app_log_followers == 0

    await wait_for(none_left, what="no live log follower left")


async def test_live_logs_refuse_bad_names_and_unknown_clusters(hub: HubClient, live: Live) -> None:
    with pytest.raises(InvalidArgument, match="namespace"):
        async for _ in hub.follow_app_logs(live.cluster, "Not_A_Namespace", "web"):
            pass
    with pytest.raises(InvalidArgument, match="process"):
        async for _ in hub.follow_app_logs(live.cluster, "shop", "web", process="web,x"):
            pass
    with pytest.raises(NotFound):
        async for _ in hub.follow_app_logs(unique("nowhere"), "shop", "web"):
            pass
