"""``SyncBatchNorm``: batch norm whose training statistics are those of the batch concatenated
over the processes of a torch.distributed group (see batchnorm.synced for the formulas),
a drop-in for ``torch.nn.SyncBatchNorm`` (its arguments and state_dict keys).

Unlike torch's, it runs on the CPU (gloo) as well as on CUDA (nccl); ranks may have batches of
different sizes, an empty one included (it gets an empty output, and neither hangs nor
poisons the others); the statistics are merged exactly in float64; a non-finite batch on any
rank leaves every rank's running statistics unchanged. Outside an initialized process group,
with a group of one process, and in evaluation it is BatchNorm (the kernels of this project).
"""

from __future__ import annotations

from .layers import BatchNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(BatchNorm):
    """Synchronized batch norm over input of rank 2 or more with its channels on ``axis``.

    Args: num_features, eps (1e-5), momentum (0.1), affine (True), track_running_stats (True),
    process_group (None: the default group), device, dtype, then keyword-only ``axis`` (1) and
    the other options of batchnorm.BatchNorm. The buffers and state_dict are BatchNorm's.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        **options,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self._sync_group = process_group

    @property
    def process_group(self):
        return self._sync_group

    @process_group.setter
    def process_group(self, group) -> None:
        self._sync_group = group

    def _check_input_dim(self, input) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
