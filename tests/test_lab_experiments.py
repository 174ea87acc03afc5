"""The experiments end to end at a tiny scale, the report, and the pieces the verdicts rest on."""

import base64
import html
import json
import math
import re

import pytest
import torch

import batchnorm
from batchnorm.lab import claims, experiments, report, verdicts
from batchnorm.lab.train import Config, Run

VERDICTS = {verdicts.HOLDS, verdicts.FAILS, verdicts.UNSURE}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results, path = report.reproduce(list(experiments.EXPERIMENTS), scale="tiny", out=str(out), log=None)
    return results, path, out


def test_every_experiment_fills_its_tables(reproduced):
    results, _, _ = reproduced
    assert [r.name for r in results] == list(experiments.EXPERIMENTS)
    for result in results:
        assert result.claims, result.name
        for claim in result.claims:
            assert claim.verdict in VERDICTS
            assert re.search(r"\d\.\d{2}", claim.measured), claim.measured  # numbers, not prose
            assert claim.rule.startswith("holds if") and "95% Student-t interval over 2 seeds" in claim.rule
            assert re.search(r"\[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", claim.interval), claim.interval
        assert result.rows and all(len(row) == len(result.columns) for row in result.rows)
        assert all(cell.strip() for row in result.rows for cell in row)
        assert result.figures and all(png.startswith(b"\x89PNG") for png in result.figures.values())


def test_report_html_and_files(reproduced):
    results, path, out = reproduced
    page = open(path, encoding="utf-8").read()
    for result in results:
        assert f"<h2 id='{result.name}'>" in page
        for claim in result.claims:
            assert claim.verdict in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == sum(len(r.figures) for r in results)
    assert base64.b64decode(images[0]).startswith(b"\x89PNG")
    assert "torch" in page and "git commit" in page and "tiny" in page
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "fig1-1.png" in pngs and "fig1-2.png" in pngs and len(pngs) == len(images)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["experiments"]) == set(experiments.EXPERIMENTS)
    runs = metrics["experiments"]["fig1"]["runs"]["with batch norm"]
    assert len(runs) == experiments.SCALES["tiny"].seeds and runs[0][-1]["step"] == experiments.SCALES["tiny"].steps
    tuning = metrics["settings"]["tuning"]
    assert "norm=none" in tuning and "digits, cnn: norm=bn" in tuning and "norm=none, dropout=0.0" not in tuning
    for tuned in tuning.values():  # the chosen point is the grid's best validation accuracy
        assert tuned["validation"][tuned["chosen"]] == max(tuned["validation"].values())
        assert f"{tuned['validation'][tuned['chosen']]:.3f} (chosen)" in page
    assert "<h2>Tuning</h2>" in page
    text = report.summary(results)
    assert len(text.splitlines()) == 1 + 2 * sum(len(r.claims) for r in results)
    for result in results:
        for claim in result.claims:
            assert html.escape(claim.interval) in page and claim.interval in text


def test_identical_configurations_train_once():
    lab = experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset())
    first = lab.runs(norm="bn")
    again = lab.runs(norm="bn")
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert [r.config.seed for r in first] == [0, 1]


def _tiny_dataset():
    from batchnorm.lab import data

    full = data.mnist1d()
    return data.Dataset("tiny", full.x_train[:300], full.y_train[:300], full.x_test[:100], full.y_test[:100])


def _run(accuracies, percentiles=None):
    records = []
    for i, accuracy in enumerate(accuracies):
        p = percentiles[i] if percentiles else (0.0, 0.0, 0.0)
        records.append(
            {"step": 10 * (i + 1), "test_accuracy": accuracy, "probe_p15": p[0], "probe_p50": p[1], "probe_p85": p[2]}
        )
    return Run(Config(), None, records)


def test_steps_to_and_drift():
    run = _run([0.1, 0.3, 0.5, 0.4])
    assert claims._steps_to(run, 0.3) == 20
    assert claims._steps_to(run, 0.6) is None
    assert claims._steps_text([20, None]) == "20 (1 of 2 seeds)"
    assert claims._steps_text([None]) == "never"
    # percentiles at -1, 0, +1 around their mean with a spread of 2: RMS deviation sqrt(2/3), over 2
    moving = _run([0, 0, 0], [(-1, 0, 1), (0, 1, 2), (1, 2, 3)])
    assert experiments._drift(moving) == pytest.approx((2 / 3) ** 0.5 / 2)
    # the same movement seen at twice the evaluations gives the same number
    denser = _run([0] * 6, [(-1, 0, 1), (-1, 0, 1), (0, 1, 2), (0, 1, 2), (1, 2, 3), (1, 2, 3)])
    assert experiments._drift(denser) == pytest.approx(experiments._drift(moving))


def test_log_steps_count_a_run_that_never_gets_there_one_evaluation_past_its_end():
    run = _run([0.1, 0.3, 0.5, 0.4])
    run.config = Config(steps=40, eval_every=10)
    assert claims._log_steps([run, run], 0.3) == pytest.approx([math.log(20)] * 2)
    assert claims._log_steps([run], 0.9) == pytest.approx([math.log(50)])


def test_batch_statistics_with_one_example_give_beta():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), batchnorm.BatchNorm1d(4))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
        model[1].weight.fill_(2.0)
    x = torch.randn(5, 3)
    with experiments.batch_statistics(model):
        single = model(x[:1])
        whole = model(x)
    torch.testing.assert_close(single, model[1].bias.detach()[None])
    h = model[0](x).detach()
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * 2.0 + model[1].bias.detach()
    torch.testing.assert_close(whole, expected)
    assert model[1].forward.__func__ is batchnorm.BatchNorm1d.forward  # restored


def test_train_mode_accuracy_leaves_buffers_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), batchnorm.BatchNorm1d(2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = experiments.train_mode_accuracy(model, torch.randn(10, 3), torch.randint(0, 2, (10,)), 4)
    assert 0.0 <= accuracy <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_unknown_experiment_and_scale(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'fig2'; choose from fig1, learning-rates"):
        report.reproduce(["fig2"], out=str(tmp_path))
    with pytest.raises(ValueError, match="scale must be one of tiny, quick, full, got scale='huge'"):
        report.reproduce(["fig1"], scale="huge", out=str(tmp_path))


def test_worker_processes_give_the_same_numbers(tmp_path, monkeypatch):
    """jobs=2 trains in forked workers with one torch thread each, as jobs=1 does in-process.

    With routing.TABLE the MLP's batch norm takes torch's kernel in both (forked workers
    never launch the Numba kernels, whose sums may differ in the last bits)."""
    import routing
    from batchnorm import crossover

    monkeypatch.setattr(crossover, "OVERRIDE", routing.TABLE)
    names = ["fig1", "placement"]
    serial, _ = report.reproduce(names, scale="tiny", out=str(tmp_path / "one"), log=None, jobs=1)
    parallel, _ = report.reproduce(names, scale="tiny", out=str(tmp_path / "two"), log=None, jobs=2)
    for a, b in zip(serial, parallel, strict=True):
        assert a.metrics == b.metrics
        assert a.rows == b.rows
        assert [c.measured for c in a.claims] == [c.measured for c in b.claims]
    with pytest.raises(ValueError, match="jobs must be a positive integer, got jobs=0"):
        experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset(), jobs=0)


def test_a_rerun_into_the_same_folder_reuses_finished_runs(tmp_path):
    lines = []
    first = experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset(), store=str(tmp_path), log=lines.append)
    runs = first.runs(norm="bn")
    assert sum(line.startswith("  train") for line in lines) == 2 and len(list(tmp_path.glob("*.pt"))) == 2
    lines.clear()
    second = experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset(), store=str(tmp_path), log=lines.append)
    again = second.runs(norm="bn")
    assert [line.split()[0] for line in lines] == ["kept", "kept"]
    for a, b in zip(runs, again, strict=True):
        assert a.metrics == b.metrics
        for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
            assert torch.equal(p, q)
    assert not list(tmp_path.glob("*.tmp"))


def test_bars_accept_equal_seeds():
    from batchnorm.lab import plots

    png = plots.bars({"test accuracy": {"a": [0.1, 0.1, 0.1], "b": [0.30000000000000004, 0.3, 0.3]}}, "y", "t")
    assert png.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "bn_small, renorm_small, verdict",
    [(0.60, 0.75, verdicts.HOLDS), (0.60, 0.59, verdicts.FAILS), (0.60, 0.65, verdicts.FAILS),
     (0.79, 0.70, verdicts.UNSURE)],
)  # fmt: skip
def test_the_renorm_claim_follows_its_rule(bn_small, renorm_small, verdict):
    """Batch norm at 0.80 at the reference batch; what renorm wins back at batches <= 8 decides:
    more than half (holds), less than half (does not hold), or nothing lost to win back (0.01)."""
    per_size = {
        2: ([bn_small] * 2, None, None, [renorm_small] * 2, None),
        64: ([0.80] * 2, None, None, [0.8] * 2, None),
    }
    claim = experiments._renorm_claim(per_size, (2, 64), 64)
    assert claim.verdict == verdict
    assert f"batch renorm {renorm_small:.3f}" in claim.measured and claim.rule.startswith("holds if")


@pytest.mark.parametrize(
    "noniid, renormed, verdict",
    [(0.60, 0.75, verdicts.HOLDS), (0.60, 0.59, verdicts.FAILS), (0.60, 0.65, verdicts.FAILS),
     (0.79, 0.70, verdicts.UNSURE)],
)  # fmt: skip
def test_the_noniid_claim_follows_its_rule(noniid, renormed, verdict):
    """Batch norm at 0.80 with i.i.d. batches; what renorm wins back with non-i.i.d. ones decides."""
    claim = experiments._noniid_claim([0.8, 0.8], [noniid] * 2, [renormed] * 2)
    assert claim.verdict == verdict
    assert f"batch renorm with them {renormed:.3f}" in claim.measured and claim.rule.startswith("holds if")


def test_noniid_batches_hold_few_labels():
    from batchnorm.lab import train

    labels = torch.arange(200) % 10
    config = train.Config(batch_size=experiments.NONIID_BATCH, same_label=experiments.NONIID_BATCH // 4)
    seen = set()
    for step in range(12):  # past the first epoch (5 batches of 32 from 20 groups of 8)
        index = train.batch_indices(config, step, 200, labels)
        assert len(index) == 32 and len(set(labels[index].tolist())) <= experiments.NONIID_LABELS
        groups = labels[index].view(-1, 8)
        assert (groups == groups[:, :1]).all()  # 8 examples of one label, together
        seen.update(index.tolist())
    assert len(seen) > 150
    iid = train.Config(batch_size=32)
    assert torch.equal(train.batch_indices(iid, 3, 200, labels), train.batch_indices(iid, 3, 200))
    with pytest.raises(ValueError, match="batch_size must be a multiple of same_label=3, got batch_size=32"):
        train.Config(batch_size=32, same_label=3)


def test_the_recovery_rule_is_inconclusive_when_seeds_disagree():
    """Renorm wins back more than half at one seed and less at the other: the interval straddles 0."""
    claim = experiments._noniid_claim([0.8, 0.8], [0.6, 0.6], [0.79, 0.65])
    assert claim.verdict == verdicts.UNSURE
    assert "recovered - half the loss" in claim.interval


def _fake_training(score):
    """train() replaced: a run whose validation accuracy is score(config), its test accuracy 0.5."""
    from batchnorm.lab.train import build_model

    def fake(config, dataset):
        record = {"step": config.steps, "val_accuracy": score(config), "test_accuracy": 0.5}
        return Run(config, build_model(config, dataset), [record])

    return fake


def test_tune_picks_the_grid_point_best_on_the_first_seeds_validation_accuracy(monkeypatch):
    peak = {"bn": 0.25, "none": 0.01}  # each norm's best learning rate in this made-up landscape
    score = lambda c: 0.9 - abs(math.log(c.lr / peak[c.norm])) / 10 - (0.2 if c.seed else 0.0)  # noqa: E731
    monkeypatch.setattr(experiments, "_train_one_thread", _fake_training(score))
    lab = experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset())
    grid = {"sgd": (0.01, 0.05, 0.25, 1.25)}
    chosen = lab.tune({"norm": "bn"}, {"norm": "none"}, grid=grid)
    assert chosen == [{"norm": "bn", "optimizer": "sgd", "lr": 0.25}, {"norm": "none", "optimizer": "sgd", "lr": 0.01}]
    trained = set(lab._done)
    # every grid point on the first seed only, then the other seed at the chosen point
    first = {lab.base.replace(seed=0, norm=n, optimizer="sgd", lr=lr) for n in peak for lr in grid["sgd"]}
    rest = {lab.base.replace(seed=1, norm=n, optimizer="sgd", lr=peak[n]) for n in peak}
    assert trained == first | rest
    assert lab.tuning["norm=bn"]["chosen"] == "sgd 0.25"
    assert lab.tuning["norm=none"]["validation"]["sgd 1.25"] == pytest.approx(
        score(lab.base.replace(norm="none", lr=1.25))
    )
    assert [r.config.lr for r in lab.runs(**chosen[0])] == [0.25, 0.25]


def test_tune_breaks_ties_by_the_grid_order_and_searches_optimizers(monkeypatch):
    score = lambda c: 0.7 if c.optimizer == "adam" else 0.6  # noqa: E731
    monkeypatch.setattr(experiments, "_train_one_thread", _fake_training(score))
    lab = experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset())
    (chosen,) = lab.tune({"norm": "none"}, grid={"sgd": (0.05, 0.25), "adam": (0.001, 0.01)})
    assert chosen == {"norm": "none", "optimizer": "adam", "lr": 0.001}
    (flat,) = lab.tune({"norm": "bn"}, grid={"sgd": (0.25, 0.05)})
    assert flat["lr"] == 0.25  # equal accuracies: the first in the grid's order


def test_gap_at_fit_takes_the_first_evaluation_that_reaches_the_level():
    records = [
        {"train_accuracy": 0.5, "test_accuracy": 0.45},
        {"train_accuracy": 0.72, "test_accuracy": 0.6},
        {"train_accuracy": 0.9, "test_accuracy": 0.61},
    ]
    run = Run(Config(), None, records)
    assert experiments.gap_at_fit(run, 0.7) == pytest.approx(0.12)
    assert experiments.gap_at_fit(run, 0.5) == pytest.approx(0.05)
    assert experiments.gap_at_fit(run, 0.9) == pytest.approx(0.29)


def test_image_lab_trains_the_cnn_on_the_digits_or_on_image_data():
    from batchnorm.lab import data, images

    lab = experiments.Lab(experiments.SCALES["tiny"], _tiny_dataset())
    cnn = images.image_lab(lab)
    assert cnn.dataset.name == "digits" and cnn.dataset.example_shape == (1, 8, 8)
    assert (cnn.base.model, cnn.base.activation, cnn.base.data) == ("cnn", "relu", "digits")
    assert cnn.base.steps == lab.scale.image_steps and cnn.seeds == lab.seeds
    assert cnn.tuning is lab.tuning and cnn.store == lab.store and cnn.fingerprint != lab.fingerprint
    assert lab.base.model == "mlp" and not cnn._done  # the MLP lab unchanged
    pictures = data.Dataset("pictures", torch.rand(20, 1, 8, 8), torch.arange(20) % 3, torch.rand(6, 1, 8, 8),
                            torch.arange(6) % 3)  # fmt: skip
    on_images = experiments.Lab(experiments.SCALES["tiny"], pictures, data="npz:pictures.npz")
    assert images.image_lab(on_images).dataset is pictures
    assert images.image_lab(on_images).base.data == "npz:pictures.npz"
