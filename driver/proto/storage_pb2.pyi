from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("name", "labels", "nbd_address", "nbd_tls", "version", "api_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NBD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NBD_TLS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    nbd_address: str
    nbd_tls: bool
    version: str
    api_version: int
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., nbd_address: _Optional[str] = ..., nbd_tls: bool = ..., version: _Optional[str] = ..., api_version: _Optional[int] = ...) -> None: ...

class GetCapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapacityResponse(_message.Message):
    __slots__ = ("available_bytes", "total_bytes", "volumes")
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    available_bytes: int
    total_bytes: int
    volumes: int
    def __init__(self, available_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., volumes: _Optional[int] = ...) -> None: ...

class StoredVolume(_message.Message):
    __slots__ = ("volume_id", "name", "size_bytes", "parameters", "source_snapshot_id", "source_volume_id", "spread_group", "created_at", "in_use", "allocated_bytes", "published_node", "published_readonly", "export_name")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SPREAD_GROUP_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_NODE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_READONLY_FIELD_NUMBER: _ClassVar[int]
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    name: str
    size_bytes: int
    parameters: _containers.ScalarMap[str, str]
    source_snapshot_id: str
    source_volume_id: str
    spread_group: str
    created_at: float
    in_use: bool
    allocated_bytes: int
    published_node: str
    published_readonly: bool
    export_name: str
    def __init__(self, volume_id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., parameters: _Optional[_Mapping[str, str]] = ..., source_snapshot_id: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., spread_group: _Optional[str] = ..., created_at: _Optional[float] = ..., in_use: bool = ..., allocated_bytes: _Optional[int] = ..., published_node: _Optional[str] = ..., published_readonly: bool = ..., export_name: _Optional[str] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "name", "size_bytes", "parameters", "source_snapshot_id", "source_volume_id", "spread_group")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SPREAD_GROUP_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    name: str
    size_bytes: int
    parameters: _containers.ScalarMap[str, str]
    source_snapshot_id: str
    source_volume_id: str
    spread_group: str
    def __init__(self, volume_id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., parameters: _Optional[_Mapping[str, str]] = ..., source_snapshot_id: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., spread_group: _Optional[str] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ("spread_group",)
    SPREAD_GROUP_FIELD_NUMBER: _ClassVar[int]
    spread_group: str
    def __init__(self, spread_group: _Optional[str] = ...) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[StoredVolume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[StoredVolume, _Mapping]]] = ...) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "size_bytes")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    size_bytes: int
    def __init__(self, volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class StoredSnapshot(_message.Message):
    __slots__ = ("snapshot_id", "name", "source_volume_id", "size_bytes", "created_at")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_at: float
    def __init__(self, snapshot_id: _Optional[str] = ..., name: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_at: _Optional[float] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id", "name", "source_volume_id")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    name: str
    source_volume_id: str
    def __init__(self, snapshot_id: _Optional[str] = ..., name: _Optional[str] = ..., source_volume_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[StoredSnapshot]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[StoredSnapshot, _Mapping]]] = ...) -> None: ...

class PublishVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "node_id", "readonly")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    node_id: str
    readonly: bool
    def __init__(self, volume_id: _Optional[str] = ..., node_id: _Optional[str] = ..., readonly: bool = ...) -> None: ...

class UnpublishVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "node_id")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    node_id: str
    def __init__(self, volume_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class UnpublishVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
