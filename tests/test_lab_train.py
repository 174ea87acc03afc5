"""The lab's models and training loop: structure, agreement with torch's layers, determinism, resume."""

import json
import os
import re

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import data, models, train


@pytest.fixture(scope="module")
def tiny():
    """A small slice of MNIST-1D, enough for a few dozen steps."""
    full = data.mnist1d()
    return data.Dataset("mnist1d-tiny", full.x_train[:600], full.y_train[:600], full.x_test[:200], full.y_test[:200])


def _kinds(model):
    return [type(m).__name__ for m in model]


def test_mlp_layout_and_init():
    model = models.mlp(40, 10, activation="sigmoid", norm="bn", placement="before")
    assert _kinds(model) == ["Flatten"] + ["Linear", "BatchNorm1d", "Probe", "Sigmoid"] * 3 + ["Linear"]
    assert all(isinstance(m, batchnorm.BatchNorm1d) for m in model if type(m).__name__ == "BatchNorm1d")
    assert model[1].bias is None  # BN's beta replaces the bias before it
    after = models.mlp(40, 10, activation="relu", norm="torch", placement="after", dropout=0.2, depth=2, width=7)
    assert _kinds(after) == ["Flatten"] + ["Linear", "Probe", "ReLU", "BatchNorm1d", "Dropout"] * 2 + ["Linear"]
    assert isinstance(after[4], nn.BatchNorm1d) and after[1].out_features == 7
    plain = models.mlp(784, 10, norm="none")
    weights = torch.cat([m.weight.flatten() for m in plain if isinstance(m, nn.Linear)])
    assert abs(weights.std().item() - models.INIT_STD) < 0.002 and abs(weights.mean().item()) < 0.002
    with pytest.raises(ValueError, match="placement must be 'before' or 'after', got placement='middle'"):
        models.mlp(4, placement="middle")
    with pytest.raises(ValueError, match=r"norm must be one of \('bn', 'torch', .*, 'none'\), got norm='wn'"):
        models.mlp(4, norm="wn")


@pytest.mark.parametrize("shape", [(40,), (2, 40), (1, 8, 8)])
def test_cnn_shapes(shape):
    model = models.cnn(shape, 10)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    norms = [m for m in model.modules() if isinstance(m, batchnorm.layers._BatchNorm)]
    assert len(norms) == 2
    assert isinstance(norms[0], batchnorm.BatchNorm2d if len(shape) == 3 else batchnorm.BatchNorm1d)


def test_ours_and_torch_train_the_same_network(tiny):
    """Same seed, same batches: this project's BN and torch's give the same training run."""
    config = train.Config(steps=40, eval_every=20, lr=0.5, batch_size=30)
    ours = train.train(config, tiny, progress=False)
    theirs = train.train(config.replace(norm="torch"), tiny, progress=False)
    for a, b in zip(ours.metrics, theirs.metrics, strict=True):
        for key in ("train_loss", "test_loss", "probe_p50"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    bn_ours = [m for m in ours.model if isinstance(m, batchnorm.BatchNorm1d)]
    bn_theirs = [m for m in theirs.model if isinstance(m, nn.BatchNorm1d)]
    for a, b in zip(bn_ours, bn_theirs, strict=True):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-5)
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 40


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_deterministic_and_learning(tiny, optimizer):
    lr = {"sgd": 0.5, "adam": 0.01, "rmsprop": 0.01}[optimizer]
    config = train.Config(optimizer=optimizer, lr=lr, steps=60, eval_every=30, activation="relu", dropout=0.1)
    first = train.train(config, tiny, progress=False)
    second = train.train(config, tiny, progress=False)
    assert first.metrics == second.metrics
    assert first.final["train_loss"] < first.metrics[0]["train_loss"] or first.final["test_accuracy"] > 0.2


def test_resume_ends_with_the_uninterrupted_numbers(tiny, tmp_path):
    config = train.Config(steps=60, eval_every=10, checkpoint_every=20, dropout=0.2, activation="relu", seed=3)
    whole = train.train(config, tiny, out=str(tmp_path / "whole"), progress=False)

    def stop_after_40(line):
        if line.startswith("step 40/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(config, tiny, out=str(tmp_path / "cut"), log=stop_after_40, progress=False)
    assert not os.path.exists(tmp_path / "cut" / "metrics.json")
    assert [f for f in os.listdir(tmp_path / "cut") if f.endswith(".tmp")] == []
    resumed = train.train(config, tiny, out=str(tmp_path / "cut"), resume=True, progress=False)
    assert resumed.metrics == whole.metrics
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with open(tmp_path / "cut" / "metrics.json") as handle:
        written = json.load(handle)
    assert written["config"]["seed"] == 3 and written["metrics"][-1]["step"] == 60
    lines = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,train_loss,test_loss,test_accuracy") and len(lines) == 7
    with pytest.raises(ValueError, match="resume: .* was written with another configuration"):
        train.train(config.replace(seed=4), tiny, out=str(tmp_path / "cut"), resume=True, progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got batch_size=0"):
        train.Config(batch_size=0)
    with pytest.raises(ValueError, match="batch norm needs batch_size >= 2 in training, got batch_size=1"):
        train.Config(batch_size=1)
    with pytest.raises(ValueError, match="optimizer must be one of .*got optimizer='lbfgs'"):
        train.Config(optimizer="lbfgs")
    with pytest.raises(
        ValueError, match="checkpoint_every must be 0 or a multiple of eval_every=100, got checkpoint_every=150"
    ):
        train.Config(checkpoint_every=150)
    with pytest.raises(ValueError, match="depth=5, dropout=0.2 applies to the MLP only: model='cnn' has two conv"):
        train.Config(model="cnn", depth=5, dropout=0.2)
    with pytest.raises(ValueError, match="measure must be True or False, got measure=1"):
        train.Config(measure=1)


def test_measured_runs_train_the_same_numbers_and_record_the_measures(tiny):
    config = train.Config(norm="bn-noisy", activation="relu", steps=30, eval_every=10, lr=0.05)
    plain = train.train(config, tiny, progress=False)
    measured = train.train(config.replace(measure=True), tiny, progress=False)
    extra = {"loss_range", "gradient_change", "beta_smoothness", "ics_distance", "ics_relative", "ics_cosine",
             "probe_batch_mean", "probe_batch_std"}  # fmt: skip
    for a, b in zip(plain.metrics, measured.metrics, strict=True):
        assert set(b) == set(a) | extra
        assert {k: b[k] for k in a} == a  # measuring leaves the training (and its noise draws) alone
    # the probe's training-mode statistics on the next step's batch, recomputed by hand
    last = measured.metrics[-1]
    index = train.batch_indices(config, config.steps, len(tiny.y_train), tiny.y_train)
    seen = []
    probe = [m for m in measured.model.modules() if isinstance(m, models.Probe)][-1]
    handle = probe.register_forward_hook(lambda _m, _i, out: seen.append(out[:, 0].double()))
    torch.manual_seed(123)  # the noise draw differs, and so must the mean, but not by more than the noise
    with torch.no_grad():
        measured.model.train()(tiny.x_train[index])
    handle.remove()
    assert abs(float(seen[0].mean()) - last["probe_batch_mean"]) < 1.0
    assert last["probe_batch_std"] > 0


def test_noise_is_the_papers_distribution():
    noise = models.Noise()
    x = torch.zeros(20000, 3)
    torch.manual_seed(0)
    y = noise(x)  # x = 0: y = m, per channel mu_j + 0.1 N(0, 1) with mu_j in (-0.5, 0.5)
    assert (y.mean(0).abs() < 0.5 + 0.01).all()
    torch.testing.assert_close(y.std(0), torch.full((3,), 0.1), atol=0.005, rtol=0)
    x = torch.ones(20000, 3)
    torch.manual_seed(1)
    ones = noise(torch.ones(20000, 2))
    torch.manual_seed(1)
    zeros = noise(torch.zeros(20000, 2))
    scale = (ones - zeros).mean(0)  # the same draws: x * s, with E[s] = sigma_j in [1, 1.25]
    assert ((scale > 1 - 0.01) & (scale < 1.25 + 0.01)).all()
    assert torch.equal(noise.eval()(x), x)
    with pytest.raises(ValueError, match="Noise needs shift >= 0, scale >= 1 and per_example >= 0, got shift=0.5, "
                                         "scale=0.9"):  # fmt: skip
        models.Noise(scale=0.9)


def test_probe_percentiles_follow_the_data():
    model = nn.Sequential(models.Probe())
    x = torch.arange(101, dtype=torch.float32)[:, None]
    assert train.probe_percentiles(model, x) == pytest.approx((15.0, 50.0, 85.0))


def test_renorm_models_scale_the_papers_schedule_to_the_run():
    from batchnorm.renorm import BatchRenorm1d

    model = models.mlp(20, norm="renorm", steps=1000)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm1d)]
    assert len(layers) == 3
    assert (layers[0].warmup_steps, layers[0].dmax_steps, layers[0].rmax_steps) == (100, 500, 800)
    with pytest.raises(ValueError, match=re.escape("norm='renorm' needs a bn_momentum in [0, 1]")):
        models.mlp(20, norm="renorm", bn_momentum=None)


@pytest.mark.parametrize(
    "norm, mlp_layer, cnn_layer",
    [
        ("bn-l1", "LpBatchNorm1d", "LpBatchNorm2d"),
        ("bn-linf", "LpBatchNorm1d", "LpBatchNorm2d"),
        ("ln", "LayerNorm", "GroupNorm"),
        ("gn", "GroupNorm", "GroupNorm"),
        ("in", None, "InstanceNorm2d"),
    ],
)
def test_the_other_normalizations_build_and_train(norm, mlp_layer, cnn_layer, tiny):
    image = models.cnn((1, 8, 8), norm=norm, channels=(12, 16))
    found = [m for m in image.modules() if type(m).__name__ == cnn_layer]
    assert len(found) == 2
    if norm == "gn":
        assert [m.num_groups for m in found] == [4, 8]  # gcd(channels, 8)
    if norm == "ln":
        assert [m.num_groups for m in found] == [1, 1]  # over channels and positions
    if mlp_layer is None:
        with pytest.raises(ValueError, match="norm='in' .* needs positions"):
            models.mlp(40, norm=norm)
        return
    model = models.mlp(40, norm=norm)
    assert sum(type(m).__name__ == mlp_layer for m in model) == 3
    y = model(torch.randn(16, 40))
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    if norm.startswith("bn-"):
        assert {m.p for m in model if type(m).__name__ == mlp_layer} == {1 if norm == "bn-l1" else float("inf")}


def test_hold_out_is_fixed_and_disjoint(tiny):
    rest, x_val, y_val = data.hold_out(tiny, 0.1)
    again, x_again, _ = data.hold_out(tiny, 0.1)
    assert len(y_val) == 60 and len(rest.y_train) == 540
    assert torch.equal(x_val, x_again) and torch.equal(rest.x_train, again.x_train)
    together = torch.cat([rest.x_train, x_val])
    assert torch.equal(together[together[:, 0].argsort()], tiny.x_train[tiny.x_train[:, 0].argsort()])
    assert rest.x_test is tiny.x_test
    with pytest.raises(ValueError, match="validation=0.999 of 600 training examples leaves 599 for validation"):
        data.hold_out(tiny, 0.999)
    with pytest.raises(ValueError, match="validation must be a fraction in \\[0, 1\\), got validation=1.0"):
        train.Config(validation=1.0)


def test_validation_records_and_the_chosen_evaluation(tiny):
    config = train.Config(steps=40, eval_every=10, validation=0.1, lr=0.05)
    run = train.train(config, tiny, progress=False)
    rest, x_val, y_val = data.hold_out(tiny, 0.1)
    assert all({"val_loss", "val_accuracy"} <= set(r) for r in run.metrics)
    # the last record's validation numbers, recomputed on the held-out examples
    loss, accuracy = train.evaluate(run.model.eval(), x_val, y_val)
    assert run.final["val_loss"] == pytest.approx(loss) and run.final["val_accuracy"] == accuracy
    best = max(r["val_accuracy"] for r in run.metrics)
    assert run.chosen is next(r for r in run.metrics if r["val_accuracy"] == best)
    # trained on the rest only: the same numbers as training on that dataset without a split
    plain = train.train(config.replace(validation=0.0), rest, progress=False)
    assert [r["test_accuracy"] for r in plain.metrics] == [r["test_accuracy"] for r in run.metrics]
    assert plain.chosen is plain.final
