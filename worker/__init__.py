"""What a worker is made of: the models and their layers, data sets and their shards, mixed
precision, data quality, DP-SGD and its accountant, and the single-process baseline.

The names below load on first use (PEP 562), so that a worker process or `import worker.data`
loads only the modules it uses.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the table below loads, for readers, editors and tests/test_layering.py
    from worker.accountant import RdpAccountant, dp_sgd_epsilon, sigma_for_epsilon
    from worker.baseline import TrainConfig, TrainResult, train_single_process
    from worker.data import DATASET_NAMES, DataError, load_dataset
    from worker.dataset import Dataset
    from worker.layers import Conv2d, Dense, Dropout, Embedding, Flatten, MaxPool2d, ReLU, Tanh
    from worker.model import MLP
    from worker.model_spec import build_model
    from worker.precision import PRECISIONS, LossScaler, Precision
    from worker.privacy import DPConfig, add_noise
    from worker.quality import QualityReport, data_report, format_report, total_variation
    from worker.sequential import Sequential
    from worker.shards import PARTITION_SCHEMES, Shard, class_histograms, partition

__all__ = [
    "DATASET_NAMES",
    "MLP",
    "PARTITION_SCHEMES",
    "PRECISIONS",
    "Conv2d",
    "DPConfig",
    "DataError",
    "Dataset",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "LossScaler",
    "MaxPool2d",
    "Precision",
    "QualityReport",
    "RdpAccountant",
    "ReLU",
    "Sequential",
    "Shard",
    "Tanh",
    "TrainConfig",
    "TrainResult",
    "add_noise",
    "build_model",
    "class_histograms",
    "data_report",
    "dp_sgd_epsilon",
    "format_report",
    "load_dataset",
    "partition",
    "sigma_for_epsilon",
    "total_variation",
    "train_single_process",
]

# public name -> the module that defines it
_WHERE = {
    "DATASET_NAMES": "worker.data",
    "MLP": "worker.model",
    "PARTITION_SCHEMES": "worker.shards",
    "PRECISIONS": "worker.precision",
    "Conv2d": "worker.layers",
    "DPConfig": "worker.privacy",
    "DataError": "worker.data",
    "Dataset": "worker.dataset",
    "Dense": "worker.layers",
    "Dropout": "worker.layers",
    "Embedding": "worker.layers",
    "Flatten": "worker.layers",
    "LossScaler": "worker.precision",
    "MaxPool2d": "worker.layers",
    "Precision": "worker.precision",
    "QualityReport": "worker.quality",
    "RdpAccountant": "worker.accountant",
    "ReLU": "worker.layers",
    "Sequential": "worker.sequential",
    "Shard": "worker.shards",
    "Tanh": "worker.layers",
    "TrainConfig": "worker.baseline",
    "TrainResult": "worker.baseline",
    "add_noise": "worker.privacy",
    "build_model": "worker.model_spec",
    "class_histograms": "worker.shards",
    "data_report": "worker.quality",
    "dp_sgd_epsilon": "worker.accountant",
    "format_report": "worker.quality",
    "load_dataset": "worker.data",
    "partition": "worker.shards",
    "sigma_for_epsilon": "worker.accountant",
    "total_variation": "worker.quality",
    "train_single_process": "worker.baseline",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:  # an AttributeError lets `from worker import data` find the module
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup finds it without calling this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
