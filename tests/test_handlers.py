"""Tests of monai_gdl_plus.handlers.PerClassDiceLogger: destinations, schedules, resume, errors."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.metrics import BatchWise

from monai_gdl_plus import PerClassDice, PerClassDiceLogger
from monai_gdl_plus.handlers import CSV_NAME, PLOT_NAME


class RecordingWriter:
    """Stands in for a SummaryWriter: records add_scalar calls."""

    def __init__(self):
        self.scalars = []
        self.flushes = 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def flat(history):
    """History rows as one flat list of floats (pytest.approx does not compare lists of dicts)."""
    return [float(v) for row in history for v in row.values()]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def bare_engine():
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {}
    return engine


def fire_epoch(engine, epoch, values, iteration=None):
    engine.state.epoch = epoch
    engine.state.iteration = iteration if iteration is not None else epoch * 10
    engine.state.metrics.clear()
    engine.state.metrics.update(values)
    engine.fire_event(Events.EPOCH_COMPLETED)


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------------------------------------------------
# destinations on a bare engine
# --------------------------------------------------------------------------------------------------------------------


def test_all_destinations_from_fired_events(tmp_path, caplog):
    engine = bare_engine()
    writer = RecordingWriter()
    csv_path, plot_path = tmp_path / "out" / "dice.csv", tmp_path / "out" / "dice.png"
    handler = PerClassDiceLogger(writer=writer, csv_path=csv_path, plot_path=plot_path, logger="test.dice")
    handler.attach(engine)
    epochs = [
        {"dice/liver": 0.5, "dice/tumour": float("nan"), "dice/mean": 0.5, "loss": 1.0},
        {"dice/liver": 0.7, "dice/tumour": 0.1, "dice/mean": 0.4, "loss": 0.5},
    ]
    with caplog.at_level(logging.INFO, logger="test.dice"):
        for epoch, values in enumerate(epochs, start=1):
            fire_epoch(engine, epoch, values)

    expected_rows = [
        {"epoch": e, "iteration": e * 10, **{k.split("/")[1]: v for k, v in values.items() if k.startswith("dice/")}}
        for e, values in enumerate(epochs, start=1)
    ]
    assert flat(handler.history) == pytest.approx(flat(expected_rows), nan_ok=True)

    header, rows = read_csv(csv_path)
    assert header == ["epoch", "iteration", "liver", "tumour", "mean"]
    assert [float(v) for r in rows for v in r] == pytest.approx(flat(expected_rows), nan_ok=True)

    expected_scalars = [(f"dice/{k}", row[k], row["epoch"]) for row in expected_rows for k in header[2:]]
    assert [(tag, step) for tag, _, step in writer.scalars] == [(tag, step) for tag, _, step in expected_scalars]
    assert [v for _, v, _ in writer.scalars] == pytest.approx([v for _, v, _ in expected_scalars], nan_ok=True)

    tables = [r.getMessage() for r in caplog.records if r.name == "test.dice"]
    assert len(tables) == 2
    assert "epoch 2" in tables[1] and "tumour" in tables[1] and "0.1000" in tables[1]
    assert "nan" in tables[0]

    assert not plot_path.exists()
    engine.fire_event(Events.COMPLETED)
    assert is_png(plot_path)


def test_log_dir_only_gets_tensorboard_csv_and_png(tmp_path):
    engine = bare_engine()
    handler = PerClassDiceLogger(log_dir=tmp_path)
    handler.attach(engine)
    for epoch in (1, 2, 3):
        fire_epoch(engine, epoch, {"dice/1": 0.1 * epoch, "dice/2": 0.2 * epoch, "dice/mean": 0.15 * epoch})
    engine.fire_event(Events.COMPLETED)
    handler.close()

    assert is_png(tmp_path / PLOT_NAME)
    header, rows = read_csv(tmp_path / CSV_NAME)
    assert header == ["epoch", "iteration", "1", "2", "mean"] and len(rows) == 3
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == {"dice/1", "dice/2", "dice/mean"}
    assert [s for s, _ in scalars["dice/2"]] == [1, 2, 3]
    assert [v for _, v in scalars["dice/2"]] == pytest.approx([0.2, 0.4, 0.6])


def test_prefix_selects_keys():
    engine = bare_engine()
    handler = PerClassDiceLogger(prefix="val_dice")
    handler.attach(engine)
    fire_epoch(engine, 1, {"val_dice/a": 0.3, "val_dice/mean": 0.3, "dice/a": 0.9})
    assert handler.history == [{"epoch": 1, "iteration": 10, "a": 0.3, "mean": 0.3}]


# --------------------------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------------------------


def labelled_batches(n, seed=0, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, num_classes, 4, 4, generator=g), torch.randint(0, num_classes, (2, 1, 4, 4), generator=g))
        for _ in range(n)
    ]


def test_every_n_iterations_with_batchwise_metric(tmp_path):
    engine = Engine(lambda e, batch: batch)
    PerClassDice(3).attach(engine, "dice", usage=BatchWise())
    writer = RecordingWriter()
    handler = PerClassDiceLogger(every=2, writer=writer, csv_path=tmp_path / "it.csv")
    handler.attach(engine)
    batches = labelled_batches(5)
    engine.run(batches, max_epochs=2)

    assert [row["iteration"] for row in handler.history] == [2, 4, 6, 8, 10]
    assert [row["epoch"] for row in handler.history] == [1, 1, 2, 2, 2]
    # each row is the Dice of the batch of that iteration alone
    for row in handler.history:
        expected = PerClassDice(3)
        expected.update(batches[(row["iteration"] - 1) % len(batches)])
        assert row["1"] == pytest.approx(expected.compute()["dice/1"], nan_ok=True)
    assert {step for _, _, step in writer.scalars} == {2, 4, 6, 8, 10}
    assert len(read_csv(tmp_path / "it.csv")[1]) == 5


def test_global_epoch_transform_for_a_separate_evaluator():
    data = labelled_batches(2)
    trainer = Engine(lambda e, b: None)
    evaluators = {}
    for name, transform in (("plain", None), ("global", lambda _: trainer.state.epoch)):
        ev = Engine(lambda e, batch: batch)
        PerClassDice(3).attach(ev, "dice")
        handler = PerClassDiceLogger(global_epoch_transform=transform)
        handler.attach(ev)
        evaluators[name] = (ev, handler)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(_):
        for ev, _h in evaluators.values():
            ev.run(data)

    trainer.run([0], max_epochs=3)
    assert [r["epoch"] for r in evaluators["global"][1].history] == [1, 2, 3]
    assert [r["epoch"] for r in evaluators["plain"][1].history] == [1, 1, 1]  # why the transform exists


# --------------------------------------------------------------------------------------------------------------------
# checkpoint resume
# --------------------------------------------------------------------------------------------------------------------


def _training(tmp_path, data):
    """A trainer whose own metric is logged, then checkpointed (the order a real run registers them in).

    Each epoch sees a different batch, so every history row differs.
    """
    model = torch.nn.Linear(1, 1)
    trainer = Engine(lambda e, _: data[(e.state.epoch - 1) % len(data)])
    PerClassDice(3).attach(trainer, "dice")
    handler = PerClassDiceLogger(csv_path=tmp_path / "history.csv", plot_path=tmp_path / "history.png")
    handler.attach(trainer)
    to_save = {"trainer": trainer, "model": model, "dice_logger": handler}
    checkpoint = Checkpoint(to_save, DiskSaver(tmp_path / "ckpt", require_empty=False), n_saved=None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    return trainer, handler, to_save


def test_checkpoint_resume_keeps_history_once(tmp_path):
    data = labelled_batches(4, seed=3)
    trainer, first, _ = _training(tmp_path, data)
    trainer.run([0], max_epochs=3)
    assert [r["epoch"] for r in first.history] == [1, 2, 3]
    assert len(read_csv(tmp_path / "history.csv")[1]) == 3  # say the run dies after epoch 3 was written

    # resume from the epoch-2 checkpoint: epoch 3 runs again, then 4
    ckpt = sorted((tmp_path / "ckpt").glob("*_2.pt"))
    assert len(ckpt) == 1
    trainer2, second, to_load = _training(tmp_path, data)
    Checkpoint.load_objects(to_load=to_load, checkpoint=torch.load(ckpt[0], weights_only=True))
    assert [r["epoch"] for r in second.history] == [1, 2]
    assert len(read_csv(tmp_path / "history.csv")[1]) == 2  # rewritten from the restored history
    trainer2.run([0], max_epochs=4)

    assert [r["epoch"] for r in second.history] == [1, 2, 3, 4]
    assert flat(second.history[:3]) == pytest.approx(flat(first.history), nan_ok=True)  # same rows as the first run
    assert flat(second.history[3:])[2:] != pytest.approx(flat(second.history[2:3])[2:], nan_ok=True)
    header, rows = read_csv(tmp_path / "history.csv")
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert [float(v) for r in rows for v in r] == pytest.approx(flat(second.history), nan_ok=True)
    assert is_png(tmp_path / "history.png")


def test_state_dict_round_trip_and_bad_state(tmp_path):
    engine = bare_engine()
    h = PerClassDiceLogger()
    h.attach(engine)
    fire_epoch(engine, 1, {"dice/a": 0.25, "dice/mean": 0.25})
    other = PerClassDiceLogger(csv_path=tmp_path / "x.csv")
    other.load_state_dict(h.state_dict())
    assert other.history == h.history and other.columns == ["a", "mean"]
    with pytest.raises(ValueError, match=r"`state_dict` must be a mapping with keys 'columns' and 'rows', got \['x'\]"):
        other.load_state_dict({"x": 1})
    with pytest.raises(ValueError, match=r"`state_dict` rows must have 4 values"):
        other.load_state_dict({"columns": ["a", "mean"], "rows": [[1, 2, 0.5]]})


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0, -3, "epochs", True, 1.5, None])
def test_bad_every(every):
    with pytest.raises(ValueError, match=r"`every` must be 'epoch' or a positive int"):
        PerClassDiceLogger(every=every)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prefix": ""}, ValueError, r"`prefix` must be a non-empty string"),
        ({"prefix": 3}, TypeError, r"`prefix` must be a str, got 3"),
        ({"logger": 3}, TypeError, r"`logger` must be a logging.Logger, its name, or None, got int"),
        ({"writer": object()}, TypeError, r"`writer` must be a TensorBoard SummaryWriter"),
        ({"global_epoch_transform": 2}, TypeError, r"`global_epoch_transform` must be callable"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PerClassDiceLogger(**kwargs)


def test_missing_keys_are_named():
    engine = bare_engine()
    handler = PerClassDiceLogger()
    handler.attach(engine)
    with pytest.raises(ValueError, match=r"no `engine.state.metrics` key starting with 'dice/'.*\['loss'\]"):
        fire_epoch(engine, 1, {"loss": 0.3})
    fire_epoch(engine, 1, {"dice/a": 0.3, "dice/b": 0.1, "dice/mean": 0.2})
    with pytest.raises(ValueError, match=r"metric key\(s\) \['dice/b'\] logged before are missing"):
        fire_epoch(engine, 2, {"dice/a": 0.3, "dice/mean": 0.3})
    with pytest.raises(TypeError, match=r"`engine.state.metrics\['dice/a'\]` must be a scalar, got dict"):
        fire_epoch(engine, 3, {"dice/a": {"x": 1}, "dice/b": 0.1, "dice/mean": 0.2})


def test_attach_twice_logs_once():
    engine = bare_engine()
    handler = PerClassDiceLogger()
    handler.attach(engine)
    handler.attach(engine)
    fire_epoch(engine, 1, {"dice/a": 0.5, "dice/mean": 0.5})
    assert len(handler.history) == 1
    assert math.isclose(handler.history[0]["a"], 0.5)
