"""The async client of the hub's API (`shapeblock.hub.v1`), on `grpc.aio`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from ._generated import hub_pb2 as pb
from ._generated import hub_pb2_grpc

# Above the hub's manifest limit, so a manifest that is too large gets the hub's reason.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class HubError(Exception):
    """A call the hub refused or could not answer: its status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Unauthenticated(HubError):
    """No, a wrong or a revoked API key."""


class InvalidArgument(HubError):
    """A request the hub refuses (a manifest that is not YAML, not a ShapeBlock kind, too large)."""


class NotFound(HubError):
    """An unknown cluster, command, token or key."""


class FailedPrecondition(HubError):
    """E.g. an idempotency key reused for another request, or revoking a used token."""


class ResourceExhausted(HubError):
    """A watcher that left too many events unread was cut (watch_events resumes by itself)."""


class Unavailable(HubError):
    """The hub is not reachable (or shutting down)."""


_ERRORS: dict[grpc.StatusCode, type[HubError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _error(e: grpc.aio.AioRpcError) -> HubError:
    code: grpc.StatusCode = e.code()
    return _ERRORS.get(code, HubError)(code, e.details() or "")


# What a stream resumes after (the others are the caller's to handle).
_RESUMABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

ResumeHook = Callable[[HubError, int], None]


class HubClient:
    """A client of one hub. `address` is the API's `host:port` (or `https://host:port`),
    `ca_pem` the hub's CA certificate (its data directory's `ca.pem`).

    Use it as an async context manager, or call `close()`.
    """

    def __init__(
        self,
        address: str,
        api_key: str,
        ca_pem: bytes | str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        resume_delay: float = 0.2,
    ) -> None:
        target = address.removeprefix("https://").rstrip("/")
        ca = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=ca),
            # `authorization: Bearer <key>` on every call.
            grpc.access_token_call_credentials(api_key.strip()),
        )
        channel_options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *options,
        ]
        self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        self._stub = hub_pb2_grpc.HubStub(self._channel)
        self._resume_delay = resume_delay

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    async def get_hub(self) -> pb.HubInfo:
        """The hub's version, CA hash, agent address, store id and live stream counts."""
        response: pb.HubInfo = await self._call("GetHub", pb.GetHubRequest())
        return response

    # ---- API keys ----

    async def create_api_key(self, name: str) -> pb.CreateApiKeyResponse:
        response: pb.CreateApiKeyResponse = await self._call(
            "CreateApiKey", pb.CreateApiKeyRequest(name=name)
        )
        return response

    async def list_api_keys(self) -> list[pb.ApiKey]:
        response: pb.ListApiKeysResponse = await self._call("ListApiKeys", pb.ListApiKeysRequest())
        return list(response.keys)

    async def revoke_api_key(self, key_id: str) -> pb.ApiKey:
        response: pb.RevokeApiKeyResponse = await self._call(
            "RevokeApiKey", pb.RevokeApiKeyRequest(id=key_id)
        )
        return response.key

    # ---- enrollment tokens ----

    async def create_enrollment_token(
        self,
        cluster_id: str,
        *,
        ttl_seconds: int = 3600,
        hub_address: str = "",
        chart: str = "",
        namespace: str = "",
    ) -> pb.CreateEnrollmentTokenResponse:
        """A one-time token for `cluster_id`; `.install_line` is the one-line install."""
        request = pb.CreateEnrollmentTokenRequest(
            cluster_id=cluster_id,
            ttl_seconds=ttl_seconds,
            hub_address=hub_address,
            chart=chart,
            namespace=namespace,
        )
        response: pb.CreateEnrollmentTokenResponse = await self._call(
            "CreateEnrollmentToken", request
        )
        return response

    async def list_enrollment_tokens(self, cluster_id: str = "") -> list[pb.EnrollmentToken]:
        response: pb.ListEnrollmentTokensResponse = await self._call(
            "ListEnrollmentTokens", pb.ListEnrollmentTokensRequest(cluster_id=cluster_id)
        )
        return list(response.tokens)

    async def revoke_enrollment_token(self, token_id: str) -> None:
        await self._call("RevokeEnrollmentToken", pb.RevokeEnrollmentTokenRequest(id=token_id))

    # ---- clusters ----

    async def list_clusters(self) -> list[pb.Cluster]:
        response: pb.ListClustersResponse = await self._call(
            "ListClusters", pb.ListClustersRequest()
        )
        return list(response.clusters)

    async def get_cluster(self, cluster_id: str) -> pb.Cluster:
        response: pb.Cluster = await self._call(
            "GetCluster", pb.GetClusterRequest(cluster_id=cluster_id)
        )
        return response

    async def revoke_cluster(self, cluster_id: str) -> pb.Cluster:
        """Refuses the cluster's certificates and closes its session; a new token rejoins."""
        response: pb.Cluster = await self._call(
            "RevokeCluster", pb.RevokeClusterRequest(cluster_id=cluster_id)
        )
        return response

    # ---- commands ----

    async def apply(
        self, cluster_id: str, manifest: str, *, idempotency_key: str = ""
    ) -> pb.CommandAccepted:
        request = pb.ApplyRequest(
            cluster_id=cluster_id, manifest=manifest, idempotency_key=idempotency_key
        )
        response: pb.CommandAccepted = await self._call("Apply", request)
        return response

    async def delete(
        self,
        cluster_id: str,
        kind: str,
        name: str,
        *,
        namespace: str = "",
        idempotency_key: str = "",
    ) -> pb.CommandAccepted:
        request = pb.DeleteRequest(
            cluster_id=cluster_id,
            object=pb.ObjectRef(kind=kind, namespace=namespace, name=name),
            idempotency_key=idempotency_key,
        )
        response: pb.CommandAccepted = await self._call("Delete", request)
        return response

    async def sync(
        self,
        cluster_id: str,
        manifests: Sequence[str],
        *,
        prune_projects: Sequence[str] = (),
        prune_kinds: Sequence[str] = (),
        prune_namespaces: Sequence[str] = (),
        prune: bool = False,
        prune_max_percent: int = 0,
        force: bool = False,
        idempotency_key: str = "",
    ) -> pb.CommandAccepted:
        """The whole desired state; with `prune`, what the scope holds beyond it is deleted."""
        request = pb.SyncRequest(
            cluster_id=cluster_id,
            manifests=list(manifests),
            prune_max_percent=prune_max_percent,
            force=force,
            idempotency_key=idempotency_key,
        )
        if prune:
            request.prune.CopyFrom(
                pb.PruneScope(
                    projects=list(prune_projects),
                    kinds=list(prune_kinds),
                    namespaces=list(prune_namespaces),
                )
            )
        response: pb.CommandAccepted = await self._call("Sync", request)
        return response

    async def set_config(
        self,
        cluster_id: str,
        namespace: str,
        app: str,
        *,
        set: Mapping[str, str] | None = None,
        unset: Sequence[str] = (),
        idempotency_key: str = "",
    ) -> pb.CommandAccepted:
        """Secret config vars of an App; the values never come back in any response."""
        request = pb.SetConfigRequest(
            cluster_id=cluster_id,
            namespace=namespace,
            app=app,
            set=dict(set or {}),
            unset=list(unset),
            idempotency_key=idempotency_key,
        )
        response: pb.CommandAccepted = await self._call("SetConfig", request)
        return response

    async def cancel_build(
        self, cluster_id: str, namespace: str, build: str, *, idempotency_key: str = ""
    ) -> pb.CommandAccepted:
        request = pb.CancelBuildRequest(
            cluster_id=cluster_id,
            namespace=namespace,
            build=build,
            idempotency_key=idempotency_key,
        )
        response: pb.CommandAccepted = await self._call("CancelBuild", request)
        return response

    async def get_command(self, cluster_id: str, command_id: int) -> pb.Command:
        response: pb.Command = await self._call(
            "GetCommand", pb.GetCommandRequest(cluster_id=cluster_id, command_id=command_id)
        )
        return response

    # ---- status and logs ----

    async def list_objects(self, cluster_id: str) -> list[pb.ObjectStatus]:
        response: pb.ListObjectsResponse = await self._call(
            "ListObjects", pb.ListObjectsRequest(cluster_id=cluster_id)
        )
        return list(response.objects)

    async def list_logs(self, cluster_id: str) -> list[pb.LogStream]:
        response: pb.ListLogsResponse = await self._call(
            "ListLogs", pb.ListLogsRequest(cluster_id=cluster_id)
        )
        return list(response.streams)

    async def read_log(
        self, cluster_id: str, stream: str, offset: int = 0, limit: int = 0
    ) -> pb.LogData:
        request = pb.ReadLogRequest(
            cluster_id=cluster_id, stream=stream, offset=offset, limit=limit
        )
        response: pb.LogData = await self._call("ReadLog", request)
        return response

    # ---- streams that resume by themselves ----

    async def watch_events(
        self,
        cursor: int = 0,
        *,
        cluster_id: str = "",
        on_resume: ResumeHook | None = None,
    ) -> AsyncGenerator[pb.Event]:
        """Every event after `cursor` (an event id; 0: from the first), for one cluster or
        all, as long as the caller iterates. When the hub cuts the stream (this watcher was
        too slow) or goes away for a moment, it watches again from the last id received: no
        gap, no duplicate. `on_resume(error, cursor)` is told each time."""
        while True:
            call = self._stub.WatchEvents(
                pb.WatchEventsRequest(cluster_id=cluster_id, after_id=cursor)
            )
            try:
                async for event in call:
                    cursor = event.id
                    yield event
                return
            except grpc.aio.AioRpcError as e:
                error = _error(e)
                if e.code() not in _RESUMABLE:
                    raise error from None
                if on_resume is not None:
                    on_resume(error, cursor)
                await asyncio.sleep(self._resume_delay)
            finally:
                call.cancel()

    async def follow_logs(
        self,
        cluster_id: str,
        stream: str,
        offset: int = 0,
        *,
        on_resume: ResumeHook | None = None,
    ) -> AsyncGenerator[pb.LogData]:
        """A log from `offset` as it grows, until its end (`eof`); resumes from the next
        offset when the stream breaks."""
        while True:
            call = self._stub.FollowLog(
                pb.FollowLogRequest(cluster_id=cluster_id, stream=stream, offset=offset)
            )
            try:
                async for data in call:
                    offset = data.next_offset
                    yield data
                    if data.eof:
                        return
                return
            except grpc.aio.AioRpcError as e:
                error = _error(e)
                if e.code() not in _RESUMABLE:
                    raise error from None
                if on_resume is not None:
                    on_resume(error, offset)
                await asyncio.sleep(self._resume_delay)
            finally:
                call.cancel()

    async def follow_app_logs(
        self,
        cluster_id: str,
        namespace: str,
        app: str,
        *,
        process: str = "",
        container: str = "",
        since_seconds: int = 0,
        tail_lines: int | None = None,
        deadline: float | None = None,
    ) -> AsyncGenerator[pb.AppLogData]:
        """Live logs of an App's running pods (`heroku logs --tail`), new pods of a rollout
        included, as long as the caller iterates (or until `deadline` seconds have passed,
        which the hub enforces too). Each message is part of one pod container's log (`pod`,
        `container`, `offset`); `truncated` says `dropped` bytes were dropped there (to
        keep within the agent's rate, or while this caller fell behind). `tail_lines`: lines
        of each container's log from before the call (None: 100; 0: only new lines).

        It does not resume by itself: a live log has no cursor, so following again shows the
        tail again. The hub's reasons are raised: `Unavailable` (the cluster is not
        connected, or its session ended), `ResourceExhausted` (this caller did not keep up,
        or too many follow this cluster), `InvalidArgument`, `NotFound`. Leaving the loop
        stops the follow at the agent."""
        request = pb.FollowAppLogsRequest(
            cluster_id=cluster_id,
            namespace=namespace,
            app=app,
            process=process,
            container=container,
            since_seconds=since_seconds,
        )
        if tail_lines is not None:
            request.tail_lines = tail_lines
        call = self._stub.FollowAppLogs(request, timeout=deadline)
        try:
            async for data in call:
                yield data
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                return
            raise _error(e) from None
        finally:
            call.cancel()


async def wait_for(
    check: Callable[[], Any], *, within: float = 45.0, interval: float = 0.2, what: str = ""
) -> Any:
    """Calls the coroutine function `check` until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(interval)
