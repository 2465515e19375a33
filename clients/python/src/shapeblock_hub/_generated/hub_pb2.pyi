from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CommandState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_STATE_UNSPECIFIED: _ClassVar[CommandState]
    COMMAND_STATE_QUEUED: _ClassVar[CommandState]
    COMMAND_STATE_DELIVERED: _ClassVar[CommandState]
    COMMAND_STATE_SUCCEEDED: _ClassVar[CommandState]
    COMMAND_STATE_FAILED: _ClassVar[CommandState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_PHASE: _ClassVar[EventKind]
    EVENT_KIND_COMMAND_RESULT: _ClassVar[EventKind]
    EVENT_KIND_COMMAND_QUEUED: _ClassVar[EventKind]
    EVENT_KIND_SESSION_UP: _ClassVar[EventKind]
    EVENT_KIND_SESSION_DOWN: _ClassVar[EventKind]
    EVENT_KIND_LOG_OPENED: _ClassVar[EventKind]
    EVENT_KIND_LOG_ENDED: _ClassVar[EventKind]
    EVENT_KIND_LOG_GAP: _ClassVar[EventKind]
    EVENT_KIND_CLUSTER_REVOKED: _ClassVar[EventKind]
COMMAND_STATE_UNSPECIFIED: CommandState
COMMAND_STATE_QUEUED: CommandState
COMMAND_STATE_DELIVERED: CommandState
COMMAND_STATE_SUCCEEDED: CommandState
COMMAND_STATE_FAILED: CommandState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_PHASE: EventKind
EVENT_KIND_COMMAND_RESULT: EventKind
EVENT_KIND_COMMAND_QUEUED: EventKind
EVENT_KIND_SESSION_UP: EventKind
EVENT_KIND_SESSION_DOWN: EventKind
EVENT_KIND_LOG_OPENED: EventKind
EVENT_KIND_LOG_ENDED: EventKind
EVENT_KIND_LOG_GAP: EventKind
EVENT_KIND_CLUSTER_REVOKED: EventKind

class GetHubRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HubInfo(_message.Message):
    __slots__ = ("version", "ca_hash", "agent_address", "store_id", "watchers", "log_followers", "sessions", "app_log_followers", "replica_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CA_HASH_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    LOG_FOLLOWERS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    APP_LOG_FOLLOWERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    version: str
    ca_hash: str
    agent_address: str
    store_id: str
    watchers: int
    log_followers: int
    sessions: int
    app_log_followers: int
    replica_id: str
    def __init__(self, version: _Optional[str] = ..., ca_hash: _Optional[str] = ..., agent_address: _Optional[str] = ..., store_id: _Optional[str] = ..., watchers: _Optional[int] = ..., log_followers: _Optional[int] = ..., sessions: _Optional[int] = ..., app_log_followers: _Optional[int] = ..., replica_id: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "name", "created_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    created_at: int
    revoked_at: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[int] = ..., revoked_at: _Optional[int] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("cluster_id", "ttl_seconds", "hub_address", "chart", "namespace")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HUB_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHART_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    ttl_seconds: int
    hub_address: str
    chart: str
    namespace: str
    def __init__(self, cluster_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., hub_address: _Optional[str] = ..., chart: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class CreateEnrollmentTokenResponse(_message.Message):
    __slots__ = ("token", "secret", "install_line")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    INSTALL_LINE_FIELD_NUMBER: _ClassVar[int]
    token: EnrollmentToken
    secret: str
    install_line: str
    def __init__(self, token: _Optional[_Union[EnrollmentToken, _Mapping]] = ..., secret: _Optional[str] = ..., install_line: _Optional[str] = ...) -> None: ...

class EnrollmentToken(_message.Message):
    __slots__ = ("id", "cluster_id", "expires_at", "used")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    id: str
    cluster_id: str
    expires_at: int
    used: bool
    def __init__(self, id: _Optional[str] = ..., cluster_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., used: _Optional[bool] = ...) -> None: ...

class ListEnrollmentTokensRequest(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class ListEnrollmentTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[EnrollmentToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[EnrollmentToken, _Mapping]]] = ...) -> None: ...

class RevokeEnrollmentTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeEnrollmentTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClustersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ("clusters",)
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[Cluster]
    def __init__(self, clusters: _Optional[_Iterable[_Union[Cluster, _Mapping]]] = ...) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class RevokeClusterRequest(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("id", "connected", "session_epoch", "agent_version", "capabilities", "inventory", "last_heartbeat", "certificate_not_after", "revoked", "clock_skew_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SESSION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    connected: bool
    session_epoch: int
    agent_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    inventory: Inventory
    last_heartbeat: int
    certificate_not_after: int
    revoked: bool
    clock_skew_ms: int
    def __init__(self, id: _Optional[str] = ..., connected: _Optional[bool] = ..., session_epoch: _Optional[int] = ..., agent_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., last_heartbeat: _Optional[int] = ..., certificate_not_after: _Optional[int] = ..., revoked: _Optional[bool] = ..., clock_skew_ms: _Optional[int] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("kubernetes_version", "node_count", "allocatable_cpu_millis", "allocatable_memory_bytes", "received_at")
    KUBERNETES_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATABLE_CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    kubernetes_version: str
    node_count: int
    allocatable_cpu_millis: int
    allocatable_memory_bytes: int
    received_at: int
    def __init__(self, kubernetes_version: _Optional[str] = ..., node_count: _Optional[int] = ..., allocatable_cpu_millis: _Optional[int] = ..., allocatable_memory_bytes: _Optional[int] = ..., received_at: _Optional[int] = ...) -> None: ...

class ObjectRef(_message.Message):
    __slots__ = ("kind", "namespace", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("cluster_id", "manifest", "idempotency_key")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    manifest: str
    idempotency_key: str
    def __init__(self, cluster_id: _Optional[str] = ..., manifest: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("cluster_id", "object", "idempotency_key")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    object: ObjectRef
    idempotency_key: str
    def __init__(self, cluster_id: _Optional[str] = ..., object: _Optional[_Union[ObjectRef, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class PruneScope(_message.Message):
    __slots__ = ("projects", "kinds", "namespaces")
    PROJECTS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    projects: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, projects: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[str]] = ..., namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("cluster_id", "manifests", "prune", "prune_max_percent", "force", "idempotency_key")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    PRUNE_MAX_PERCENT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    manifests: _containers.RepeatedScalarFieldContainer[str]
    prune: PruneScope
    prune_max_percent: int
    force: bool
    idempotency_key: str
    def __init__(self, cluster_id: _Optional[str] = ..., manifests: _Optional[_Iterable[str]] = ..., prune: _Optional[_Union[PruneScope, _Mapping]] = ..., prune_max_percent: _Optional[int] = ..., force: _Optional[bool] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SetConfigRequest(_message.Message):
    __slots__ = ("cluster_id", "namespace", "app", "set", "unset", "idempotency_key")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    UNSET_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    namespace: str
    app: str
    set: _containers.ScalarMap[str, str]
    unset: _containers.RepeatedScalarFieldContainer[str]
    idempotency_key: str
    def __init__(self, cluster_id: _Optional[str] = ..., namespace: _Optional[str] = ..., app: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., unset: _Optional[_Iterable[str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CancelBuildRequest(_message.Message):
    __slots__ = ("cluster_id", "namespace", "build", "idempotency_key")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    namespace: str
    build: str
    idempotency_key: str
    def __init__(self, cluster_id: _Optional[str] = ..., namespace: _Optional[str] = ..., build: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CommandAccepted(_message.Message):
    __slots__ = ("cluster_id", "command_id", "replayed")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    command_id: int
    replayed: bool
    def __init__(self, cluster_id: _Optional[str] = ..., command_id: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetCommandRequest(_message.Message):
    __slots__ = ("cluster_id", "command_id")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    command_id: int
    def __init__(self, cluster_id: _Optional[str] = ..., command_id: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("cluster_id", "command_id", "kind", "object", "state", "message", "created_at")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    command_id: int
    kind: str
    object: str
    state: CommandState
    message: str
    created_at: int
    def __init__(self, cluster_id: _Optional[str] = ..., command_id: _Optional[int] = ..., kind: _Optional[str] = ..., object: _Optional[str] = ..., state: _Optional[_Union[CommandState, str]] = ..., message: _Optional[str] = ..., created_at: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("cluster_id", "after_id")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    after_id: int
    def __init__(self, cluster_id: _Optional[str] = ..., after_id: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "cluster_id", "kind", "at_ms", "epoch", "object", "phase", "reason", "message", "command_id", "ok", "truncated")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    id: int
    cluster_id: str
    kind: EventKind
    at_ms: int
    epoch: int
    object: str
    phase: str
    reason: str
    message: str
    command_id: int
    ok: bool
    truncated: bool
    def __init__(self, id: _Optional[int] = ..., cluster_id: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., at_ms: _Optional[int] = ..., epoch: _Optional[int] = ..., object: _Optional[str] = ..., phase: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., command_id: _Optional[int] = ..., ok: _Optional[bool] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ListObjectsRequest(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class ObjectStatus(_message.Message):
    __slots__ = ("key", "object", "phase", "observed_generation", "reason", "message")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    object: ObjectRef
    phase: str
    observed_generation: int
    reason: str
    message: str
    def __init__(self, key: _Optional[str] = ..., object: _Optional[_Union[ObjectRef, _Mapping]] = ..., phase: _Optional[str] = ..., observed_generation: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ListObjectsResponse(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[ObjectStatus]
    def __init__(self, objects: _Optional[_Iterable[_Union[ObjectStatus, _Mapping]]] = ...) -> None: ...

class ListLogsRequest(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class LogStream(_message.Message):
    __slots__ = ("stream", "length", "ended", "truncated", "first_offset")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    stream: str
    length: int
    ended: bool
    truncated: bool
    first_offset: int
    def __init__(self, stream: _Optional[str] = ..., length: _Optional[int] = ..., ended: _Optional[bool] = ..., truncated: _Optional[bool] = ..., first_offset: _Optional[int] = ...) -> None: ...

class ListLogsResponse(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[LogStream]
    def __init__(self, streams: _Optional[_Iterable[_Union[LogStream, _Mapping]]] = ...) -> None: ...

class ReadLogRequest(_message.Message):
    __slots__ = ("cluster_id", "stream", "offset", "limit")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    stream: str
    offset: int
    limit: int
    def __init__(self, cluster_id: _Optional[str] = ..., stream: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class FollowLogRequest(_message.Message):
    __slots__ = ("cluster_id", "stream", "offset")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    stream: str
    offset: int
    def __init__(self, cluster_id: _Optional[str] = ..., stream: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class LogData(_message.Message):
    __slots__ = ("offset", "data", "next_offset", "truncated", "eof", "first_offset")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    next_offset: int
    truncated: bool
    eof: bool
    first_offset: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., next_offset: _Optional[int] = ..., truncated: _Optional[bool] = ..., eof: _Optional[bool] = ..., first_offset: _Optional[int] = ...) -> None: ...

class FollowAppLogsRequest(_message.Message):
    __slots__ = ("cluster_id", "namespace", "app", "process", "container", "since_seconds", "tail_lines")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SINCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    namespace: str
    app: str
    process: str
    container: str
    since_seconds: int
    tail_lines: int
    def __init__(self, cluster_id: _Optional[str] = ..., namespace: _Optional[str] = ..., app: _Optional[str] = ..., process: _Optional[str] = ..., container: _Optional[str] = ..., since_seconds: _Optional[int] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class AppLogData(_message.Message):
    __slots__ = ("pod", "container", "process", "offset", "data", "truncated", "dropped", "eof")
    POD_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    pod: str
    container: str
    process: str
    offset: int
    data: bytes
    truncated: bool
    dropped: int
    eof: bool
    def __init__(self, pod: _Optional[str] = ..., container: _Optional[str] = ..., process: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., truncated: _Optional[bool] = ..., dropped: _Optional[int] = ..., eof: _Optional[bool] = ...) -> None: ...
