from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Slice(_message.Message):
    __slots__ = ("name", "start", "dtype", "shape", "data", "version", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    start: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    version: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., start: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class KeySpec(_message.Message):
    __slots__ = ("name", "tensor_shape", "start", "stop")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor_shape: _containers.RepeatedScalarFieldContainer[int]
    start: int
    stop: int
    def __init__(self, name: _Optional[str] = ..., tensor_shape: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class OptimizerSettings(_message.Message):
    __slots__ = ("name", "lr", "momentum", "nesterov", "beta1", "beta2", "eps", "weight_decay", "lr_schedule", "planned_steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    PLANNED_STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    lr_schedule: str
    planned_steps: int
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., nesterov: _Optional[bool] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., lr_schedule: _Optional[str] = ..., planned_steps: _Optional[int] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("optimizer", "keys", "values")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    optimizer: OptimizerSettings
    keys: _containers.RepeatedCompositeFieldContainer[KeySpec]
    values: _containers.RepeatedCompositeFieldContainer[Slice]
    def __init__(self, optimizer: _Optional[_Union[OptimizerSettings, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[KeySpec, _Mapping]]] = ..., values: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ...) -> None: ...

class InitReply(_message.Message):
    __slots__ = ("created", "keys_pending")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    KEYS_PENDING_FIELD_NUMBER: _ClassVar[int]
    created: bool
    keys_pending: int
    def __init__(self, created: _Optional[bool] = ..., keys_pending: _Optional[int] = ...) -> None: ...

class KeyRef(_message.Message):
    __slots__ = ("name", "start", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    start: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., start: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker", "step", "keys", "dtype", "mailbox")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    worker: int
    step: int
    keys: _containers.RepeatedCompositeFieldContainer[KeyRef]
    dtype: str
    mailbox: str
    def __init__(self, worker: _Optional[int] = ..., step: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[KeyRef, _Mapping]]] = ..., dtype: _Optional[str] = ..., mailbox: _Optional[str] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("values", "staleness_max", "step_skipped", "shared", "blocked_s")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    STEP_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_S_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Slice]
    staleness_max: int
    step_skipped: bool
    shared: bool
    blocked_s: float
    def __init__(self, values: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ..., staleness_max: _Optional[int] = ..., step_skipped: _Optional[bool] = ..., shared: _Optional[bool] = ..., blocked_s: _Optional[float] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("worker", "step", "grads", "grad_scale", "skip", "mailbox")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    worker: int
    step: int
    grads: _containers.RepeatedCompositeFieldContainer[Slice]
    grad_scale: float
    skip: bool
    mailbox: str
    def __init__(self, worker: _Optional[int] = ..., step: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ..., grad_scale: _Optional[float] = ..., skip: _Optional[bool] = ..., mailbox: _Optional[str] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "duplicates", "staleness_max")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    staleness_max: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., staleness_max: _Optional[int] = ...) -> None: ...

class LayoutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayoutReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeySpec]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeySpec, _Mapping]]] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: int
    def __init__(self, worker: _Optional[int] = ...) -> None: ...

class VersionReply(_message.Message):
    __slots__ = ("initialised", "min_version", "max_version", "clocks", "start_step")
    class ClocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    INITIALISED_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    initialised: bool
    min_version: int
    max_version: int
    clocks: _containers.ScalarMap[int, int]
    start_step: int
    def __init__(self, initialised: _Optional[bool] = ..., min_version: _Optional[int] = ..., max_version: _Optional[int] = ..., clocks: _Optional[_Mapping[int, int]] = ..., start_step: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: int
    def __init__(self, worker: _Optional[int] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("mode", "workers", "staleness_bound", "tensors", "keys", "params", "bytes_held", "pushes", "pulls", "updates", "bytes_in", "bytes_out", "staleness_count", "staleness_sum", "staleness_max", "staleness_histogram", "dropped_stale", "waiting", "clocks", "min_version", "max_version", "skipped_steps", "rejected_pushes", "dropped_gradients", "live_workers", "restored_from", "checkpoints_written", "suspect_workers", "grad_cosine", "grad_norm_ratio", "checkpoint_failures", "checkpoint_error")
    class ClocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class GradCosineEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class GradNormRatioEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    STALENESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SUM_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    STALENESS_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_PUSHES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_WORKERS_FIELD_NUMBER: _ClassVar[int]
    GRAD_COSINE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_RATIO_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    mode: str
    workers: int
    staleness_bound: int
    tensors: _containers.RepeatedScalarFieldContainer[str]
    keys: int
    params: int
    bytes_held: int
    pushes: int
    pulls: int
    updates: int
    bytes_in: int
    bytes_out: int
    staleness_count: int
    staleness_sum: int
    staleness_max: int
    staleness_histogram: _containers.RepeatedScalarFieldContainer[int]
    dropped_stale: int
    waiting: int
    clocks: _containers.ScalarMap[int, int]
    min_version: int
    max_version: int
    skipped_steps: int
    rejected_pushes: int
    dropped_gradients: int
    live_workers: _containers.RepeatedScalarFieldContainer[int]
    restored_from: int
    checkpoints_written: int
    suspect_workers: _containers.RepeatedScalarFieldContainer[int]
    grad_cosine: _containers.ScalarMap[int, float]
    grad_norm_ratio: _containers.ScalarMap[int, float]
    checkpoint_failures: int
    checkpoint_error: str
    def __init__(self, mode: _Optional[str] = ..., workers: _Optional[int] = ..., staleness_bound: _Optional[int] = ..., tensors: _Optional[_Iterable[str]] = ..., keys: _Optional[int] = ..., params: _Optional[int] = ..., bytes_held: _Optional[int] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., updates: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., staleness_count: _Optional[int] = ..., staleness_sum: _Optional[int] = ..., staleness_max: _Optional[int] = ..., staleness_histogram: _Optional[_Iterable[int]] = ..., dropped_stale: _Optional[int] = ..., waiting: _Optional[int] = ..., clocks: _Optional[_Mapping[int, int]] = ..., min_version: _Optional[int] = ..., max_version: _Optional[int] = ..., skipped_steps: _Optional[int] = ..., rejected_pushes: _Optional[int] = ..., dropped_gradients: _Optional[int] = ..., live_workers: _Optional[_Iterable[int]] = ..., restored_from: _Optional[int] = ..., checkpoints_written: _Optional[int] = ..., suspect_workers: _Optional[_Iterable[int]] = ..., grad_cosine: _Optional[_Mapping[int, float]] = ..., grad_norm_ratio: _Optional[_Mapping[int, float]] = ..., checkpoint_failures: _Optional[int] = ..., checkpoint_error: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("worker", "name", "size")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    worker: int
    name: str
    size: int
    def __init__(self, worker: _Optional[int] = ..., name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class AttachReply(_message.Message):
    __slots__ = ("channel", "channel_key")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_KEY_FIELD_NUMBER: _ClassVar[int]
    channel: str
    channel_key: bytes
    def __init__(self, channel: _Optional[str] = ..., channel_key: _Optional[bytes] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
