"""Short real training runs: PerClassDice and PerClassDiceLogger with plain Ignite and with MONAI workflows.

A tiny 3D UNet (16^3, channels (4, 8), strides (2,)) on synthetic 3-class volumes, DicePlusLoss, two epochs.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
from ignite.metrics import BatchWise, MetricsLambda

from monai_gdl_plus import DicePlusLoss, PerClassDice, PerClassDiceLogger
from monai_gdl_plus.handlers import CSV_NAME, PLOT_NAME

pytestmark = pytest.mark.slow

NAMES = ["background", "large", "small"]
SIZE = 16


def make_volumes(n, seed):
    """Images (n, 1, 16, 16, 16) and labels (n, 1, 16, 16, 16): a large and a small ball at random places."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij"))
    labels = torch.zeros(n, 1, SIZE, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        for cls, radius in ((1, 5.0), (2, 2.5)):
            centre = (torch.rand(3, generator=g) * (SIZE - 2 * radius) + radius).view(3, 1, 1, 1)
            labels[i, 0][((grid - centre) ** 2).sum(0) <= radius**2] = cls
    images = labels.float() + 0.3 * torch.randn(labels.shape, generator=g)
    return images, labels


def make_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_per_class(metrics, prefix="dice"):
    for name in NAMES[1:]:
        value = metrics[f"{prefix}/{name}"]
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)
    assert metrics[f"{prefix}/mean"] == pytest.approx((metrics[f"{prefix}/large"] + metrics[f"{prefix}/small"]) / 2)


def test_plain_ignite_trainer_and_evaluator(tmp_path):
    images, labels = make_volumes(6, seed=0)
    train = [(images[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    val = [(images[4:6], labels[4:6])]
    model = make_unet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    trainer = create_supervised_trainer(
        model, optimizer, DicePlusLoss(to_onehot_y=True, softmax=True),
        output_transform=lambda x, y, y_pred, loss: {"y_pred": y_pred, "y": y, "loss": loss.item()},
    )  # fmt: skip
    # optional per-iteration training Dice: the same metric with BatchWise usage
    PerClassDice(3, class_names=NAMES, prefix="train_dice").attach(trainer, "train_dice", usage=BatchWise())
    train_logger = PerClassDiceLogger(prefix="train_dice", every=1, csv_path=tmp_path / "train.csv")
    train_logger.attach(trainer)

    dice = PerClassDice(3, class_names=NAMES)
    evaluator = create_supervised_evaluator(
        model, metrics={"dice": dice, "mean_dice": MetricsLambda(lambda d: d["dice/mean"], dice)}
    )
    val_logger = PerClassDiceLogger(log_dir=tmp_path / "val", global_epoch_transform=lambda _: trainer.state.epoch)
    val_logger.attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run(val))

    trainer.run(train, max_epochs=2)
    val_logger.close()

    check_per_class(evaluator.state.metrics)
    assert evaluator.state.metrics["mean_dice"] == evaluator.state.metrics["dice/mean"]  # a scalar key metric
    assert "dice" not in evaluator.state.metrics  # only scalars in engine.state.metrics
    assert [r["iteration"] for r in train_logger.history] == [1, 2, 3, 4]
    check_per_class(trainer.state.metrics, prefix="train_dice")

    assert [r["epoch"] for r in val_logger.history] == [1, 2]
    scalars = tensorboard_scalars(tmp_path / "val")
    assert {f"dice/{n}" for n in ("large", "small", "mean")} <= set(scalars)
    assert [step for step, _ in scalars["dice/small"]] == [1, 2]
    assert scalars["dice/large"][-1][1] == pytest.approx(evaluator.state.metrics["dice/large"])
    assert (tmp_path / "val" / CSV_NAME).exists() and (tmp_path / "val" / PLOT_NAME).exists()


def test_monai_supervised_trainer_and_evaluator(tmp_path, caplog):
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import (
        CheckpointSaver,
        MeanDice,
        StatsHandler,
        TensorBoardStatsHandler,
        ValidationHandler,
        from_engine,
    )  # fmt: skip
    from monai.transforms import AsDiscreted, Compose

    images, labels = make_volumes(6, seed=1)
    items = [{"image": images[i], "label": labels[i]} for i in range(6)]
    train_loader = DataLoader(Dataset(items[:4]), batch_size=2, shuffle=False)
    val_loader = DataLoader(Dataset(items[4:]), batch_size=2)
    model = make_unet()
    device = torch.device("cpu")
    max_epochs = 2
    trainer_epoch = {"epoch": 0}

    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=3), AsDiscreted(keys="label", to_onehot=3)])
    pred_label = from_engine(["pred", "label"])
    tb_dir, dice_dir = tmp_path / "tb", tmp_path / "dice"
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=model,
        postprocessing=post,
        key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=pred_label)},
        additional_metrics={
            "per_class": PerClassDice(3, activation=None, class_names=NAMES, output_transform=pred_label),
            "per_image": PerClassDice(3, activation=None, class_names=NAMES, aggregation="per_image",
                                      prefix="dice_img", output_transform=pred_label),
        },  # fmt: skip
        val_handlers=[
            StatsHandler(
                name="val_stats", iteration_log=False, global_epoch_transform=lambda _: trainer_epoch["epoch"]
            ),
            TensorBoardStatsHandler(
                log_dir=str(tb_dir), iteration_log=False, global_epoch_transform=lambda _: trainer_epoch["epoch"]
            ),
            PerClassDiceLogger(log_dir=dice_dir, global_epoch_transform=lambda _: trainer_epoch["epoch"]),
            CheckpointSaver(save_dir=str(tmp_path / "ckpt"), save_dict={"net": model}, save_key_metric=True),
        ],
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        loss_function=DicePlusLoss(to_onehot_y=True, softmax=True),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: trainer_epoch.update(epoch=e.state.epoch))

    stats_records = RecordingHandler()
    # MONAI's logger does not propagate; named above, as its default name differs by release (1.4: "StatsHandler")
    stats_logger = logging.getLogger("val_stats")
    stats_logger.addHandler(stats_records)
    try:
        with caplog.at_level(logging.INFO):
            trainer.run()
    finally:
        stats_logger.removeHandler(stats_records)

    metrics = evaluator.state.metrics
    check_per_class(metrics)
    check_per_class(metrics, prefix="dice_img")
    # every image holds both classes, so MONAI's mean of per-image Dice equals the per-image NaN-mean
    assert metrics["dice_img/mean"] == pytest.approx(metrics["val_mean_dice"], abs=1e-6)
    assert isinstance(metrics["val_mean_dice"], float)  # the key metric stays a scalar
    assert list((tmp_path / "ckpt").glob("*key_metric*.pt"))  # best-checkpoint selection still works

    # MONAI's own handlers log the per-class keys with no glue
    logged = "\n".join(stats_records.messages)
    assert "dice/large" in logged and "dice/small" in logged
    scalars = tensorboard_scalars(tb_dir)
    for key in ("dice/large", "dice/small", "dice/mean", "dice_img/small", "val_mean_dice"):
        assert [step for step, _ in scalars[key]] == list(range(1, max_epochs + 1)), key
    assert scalars["dice/small"][-1][1] == pytest.approx(metrics["dice/small"])
    assert evaluator.state.best_metric == pytest.approx(max(v for _, v in scalars["val_mean_dice"]))

    # and the logger, as a val_handlers entry, logs the trainer's epochs
    header = (dice_dir / CSV_NAME).read_text().splitlines()[0]
    assert header == "epoch,iteration,large,small,mean"
    assert [int(line.split(",")[0]) for line in (dice_dir / CSV_NAME).read_text().splitlines()[1:]] == [1, 2]
    assert (dice_dir / PLOT_NAME).exists()
    assert any("Per-class Dice" in r.getMessage() for r in caplog.records)
