"""convert_sync_batchnorm and revert_sync_batchnorm in one process: which layers become what,
with which state; refusals and warnings. (Across processes: tests/test_sync.py.)"""

import warnings

import pytest
import torch
from torch import nn

import batchnorm


class UsersBatchNorm(nn.BatchNorm2d):
    """A user's subclass: its forward is the user's code."""

    def forward(self, x):
        return super().forward(x) * 2


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), batchnorm.BatchNorm2d(4),
        nn.SyncBatchNorm(4), nn.Flatten(), nn.Linear(64, 6), batchnorm.BatchNorm(6, axis=-1),
        batchnorm.FrozenBatchNorm1d(6), batchnorm.LayerNorm(6),
    )  # fmt: skip
    model(torch.randn(5, 3, 6, 6))  # running statistics that are not the initial ones
    return model


def test_every_plain_layer_becomes_sync_with_its_state():
    model = _model()
    group = object()  # stands for a process group: kept as given, unused outside one
    converted = batchnorm.convert_sync_batchnorm(model, group)
    kinds = [type(m).__name__ for m in converted]
    assert kinds == ["Conv2d", "SyncBatchNorm", "ReLU", "Conv2d", "SyncBatchNorm", "SyncBatchNorm", "Flatten",
                     "Linear", "SyncBatchNorm", "FrozenBatchNorm1d", "LayerNorm"]  # fmt: skip
    assert all(m.process_group is group for m in converted if isinstance(m, batchnorm.SyncBatchNorm))
    assert converted[8].axis == -1
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    assert type(model[1]) is nn.BatchNorm2d  # the input model is left as it was
    x = torch.randn(4, 3, 6, 6)
    model.eval(), converted.eval()
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    reverted = batchnorm.revert_sync_batchnorm(converted)
    assert [type(m).__name__ for m in reverted][1:9] == [
        "BatchNorm", "ReLU", "Conv2d", "BatchNorm", "BatchNorm", "Flatten", "Linear", "BatchNorm"
    ]  # fmt: skip
    assert not any(isinstance(m, (batchnorm.SyncBatchNorm, nn.SyncBatchNorm)) for m in reverted.modules())
    assert reverted[8].axis == -1 and type(reverted[1]) is batchnorm.BatchNorm
    torch.testing.assert_close(reverted(x), model(x), rtol=1e-5, atol=1e-5)


def test_training_mode_and_one_process_training_equal_the_unconverted_model():
    model = _model().train()
    converted = batchnorm.convert_sync_batchnorm(model)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted[1].running_var, model[1].running_var, rtol=1e-6, atol=1e-7)


def test_users_subclasses_are_kept_unless_asked():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), UsersBatchNorm(4))
    with pytest.warns(UserWarning, match=r"kept 1 subclass\(es\) of torch's batch norm \(1\)"):
        kept = batchnorm.convert_sync_batchnorm(model)
    assert type(kept[1]) is UsersBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flattened = batchnorm.convert_sync_batchnorm(model, subclasses=True)
    assert type(flattened[1]) is batchnorm.SyncBatchNorm


@pytest.mark.parametrize(
    "layer, name",
    [
        (batchnorm.BatchNormAct2d(4), "BatchNormAct2d"),
        (batchnorm.GhostBatchNorm2d(4, 2), "GhostBatchNorm2d"),
        (batchnorm.BatchRenorm2d(4), "BatchRenorm2d"),
        (batchnorm.LpBatchNorm2d(4), "LpBatchNorm2d"),
        (batchnorm.LazyBatchNorm2d(), "LazyBatchNorm2d"),
    ],
)
def test_layers_without_a_synchronized_form_are_named(layer, name):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    with pytest.raises(ValueError, match=rf"no synchronized form for 1 \({name}\)"):
        batchnorm.convert_sync_batchnorm(model)
    assert model[1] is layer


def test_a_fused_model_converts_after_convert_without_fusion():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="fuse=False"):
        batchnorm.convert_sync_batchnorm(batchnorm.convert(model))
    synced = batchnorm.convert_sync_batchnorm(batchnorm.convert(model, fuse=False))
    assert type(synced[1]) is batchnorm.SyncBatchNorm
    assert type(batchnorm.convert_sync_batchnorm(nn.BatchNorm1d(3))) is batchnorm.SyncBatchNorm
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        batchnorm.convert_sync_batchnorm(3)
