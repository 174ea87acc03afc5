"""Batch norm on images: the lab's CNN (models.cnn: two blocks of a 3 x 3 convolution, batch norm
before the ReLU and a 2 x 2 max-pool, 32 and 64 channels, then global average pooling) on
scikit-learn's bundled 8 x 8 digits (1,797 images), or on the lab's own data when those are
images (``--data mnist:DIR``: real MNIST, 28 x 28). The scale's ``image_steps`` of batch 60,
each network at its tuned learning rate (Lab.tune)."""

from __future__ import annotations

from . import data as data_module
from . import plots
from .claims import Result, _chosen, _metrics, _pm, _settings, _steps_text, trains_faster

__all__ = ["image_lab", "images"]


def image_lab(lab):
    """A sibling of ``lab`` training the CNN: on its data if they are images, else on the digits."""
    if len(lab.dataset.example_shape) == 3:
        dataset, data = lab.dataset, lab.base.data
    else:
        dataset, data = data_module.digits(), "digits"
    steps, every = lab.scale.image_steps, lab.scale.image_eval_every
    return lab.sibling(dataset, data, model="cnn", activation="relu", steps=steps, eval_every=every)


def images(lab) -> Result:
    cnn = image_lab(lab)
    tuned_bn, tuned_none = cnn.tune({"norm": "bn"}, {"norm": "none"})
    named = {"with batch norm": cnn.runs(**tuned_bn), "without": cnn.runs(**tuned_none)}
    shape = "x".join(map(str, cnn.dataset.example_shape))
    faster, target, steps = trains_faster(
        f"On images too ({cnn.dataset.name}, {shape}, a CNN), batch norm trains faster: higher test accuracy "
        "after fewer steps.",
        *named.values(),
    )
    rows = [
        [label, _settings(runs), _pm(_chosen(runs)), _steps_text(to_target)]
        for (label, runs), to_target in zip(named.items(), steps, strict=True)
    ]
    figures = {
        f"Test accuracy during training, CNN on {cnn.dataset.name} (mean and range over seeds)": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", f"CNN on {cnn.dataset.name}"
        )
    }
    columns = ["network", "tuned learning rate", "test accuracy", f"steps to validation accuracy {target:.3f}"]
    return Result("images", f"Images: a CNN on {cnn.dataset.name}", columns, rows, [faster], figures, _metrics(named))
