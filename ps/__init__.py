"""The server side of tinyps and the client that talks to it: store, servers, checkpoints,
placement, and `PSClient`. Imports kernels; never imports worker.

The names below load on first use (PEP 562), so that `import ps.keys` or a process that needs
one module does not pay for gRPC, protobuf and every kernel.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the table below loads, for readers, editors and tests/test_layering.py
    from ps import ps_pb2
    from ps.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, read_checkpoint
    from ps.client import PSClient, PSError, wait_healthy
    from ps.consistency import MODES
    from ps.placement import STRATEGIES, Placement, TensorSpec, place
    from ps.server import serve
    from ps.store import Store
    from ps.store_config import StoreConfig

__all__ = [
    "MODES",
    "STRATEGIES",
    "CheckpointError",
    "PSClient",
    "PSError",
    "Placement",
    "Store",
    "StoreConfig",
    "TensorSpec",
    "latest_checkpoint",
    "list_checkpoints",
    "place",
    "ps_pb2",  # the messages of proto/ps.proto: the wire contract, for raw gRPC calls
    "read_checkpoint",
    "serve",
    "wait_healthy",
]

# public name -> the module that defines it (a module's own name: the module itself)
_WHERE = {
    "MODES": "ps.consistency",
    "STRATEGIES": "ps.placement",
    "CheckpointError": "ps.checkpoint",
    "PSClient": "ps.client",
    "PSError": "ps.client",
    "Placement": "ps.placement",
    "Store": "ps.store",
    "StoreConfig": "ps.store_config",
    "TensorSpec": "ps.placement",
    "latest_checkpoint": "ps.checkpoint",
    "list_checkpoints": "ps.checkpoint",
    "place": "ps.placement",
    "ps_pb2": "ps.ps_pb2",
    "read_checkpoint": "ps.checkpoint",
    "serve": "ps.server",
    "wait_healthy": "ps.client",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:  # an AttributeError lets `from ps import keys` find the module
        raise AttributeError(f"module 'ps' has no attribute {name!r}")
    module = import_module(_WHERE[name])
    value = module if module.__name__ == f"ps.{name}" else getattr(module, name)
    globals()[name] = value  # the next lookup finds it without calling this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
