"""batchnorm: exact, fast batch normalization for PyTorch (Ioffe & Szegedy 2015)."""

from . import functional, ops
from .accumulate import accumulate
from .activated import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .conversion import convert, revert
from .fold import fold, fold_weights
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze, unfreeze
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .health import inspect
from .keras import keras_batch_norm, keras_weights, load_keras_weights
from .layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .lp import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from .normalizations import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .stats import ExactEstimator, PaperEstimator, population_statistics
from .sync import SyncBatchNorm
from .sync_conversion import convert_sync_batchnorm, revert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ExactEstimator",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LpBatchNorm",
    "LpBatchNorm1d",
    "LpBatchNorm2d",
    "LpBatchNorm3d",
    "PaperEstimator",
    "SyncBatchNorm",
    "accumulate",
    "convert",
    "convert_sync_batchnorm",
    "fold",
    "fold_weights",
    "freeze",
    "functional",
    "inspect",
    "keras_batch_norm",
    "keras_weights",
    "load_keras_weights",
    "ops",
    "population_statistics",
    "revert",
    "revert_sync_batchnorm",
    "unfreeze",
]
