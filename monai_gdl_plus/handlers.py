"""Ignite handler that logs the per-class Dice of :class:`monai_gdl_plus.PerClassDice` to a table, TensorBoard, a CSV
history and a PNG of per-class curves, and survives a checkpoint resume."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["PerClassDiceLogger"]

PathLike = str | os.PathLike

CSV_NAME = "per_class_dice.csv"
PLOT_NAME = "per_class_dice.png"
_FIXED_COLUMNS = ("epoch", "iteration")


class PerClassDiceLogger:
    """Log the per-class Dice found in ``engine.state.metrics`` at epoch end, or every N iterations.

    The logged values are the ``engine.state.metrics`` keys ``f"{prefix}/<name>"`` that a
    :class:`~monai_gdl_plus.PerClassDice` with the same ``prefix`` puts there (one per reported class, plus
    ``mean``). Each event becomes one history row ``(epoch, iteration, value per key)`` and goes to:

    - Python logging: a readable per-class table at INFO level;
    - TensorBoard: scalars with the metric keys as tags (``dice/<class>``), step = epoch (after
      ``global_epoch_transform``) or, with ``every=N``, the iteration -- given a ``writer`` or a ``log_dir``;
    - a CSV history: columns ``epoch, iteration`` then one per class (the key without ``prefix/``), header fixed
      by the first event;
    - a PNG of per-class curves, rewritten when the engine completes (matplotlib, Agg canvas; pyplot untouched).

    With only ``log_dir`` given, the CSV (``per_class_dice.csv``) and the PNG (``per_class_dice.png``) go there too.

    Attach it after the metric (Ignite runs handlers of one event in the order they were added; MONAI workflows
    attach metrics before ``handlers``/``val_handlers``). It works as a MONAI ``val_handlers`` entry, since MONAI
    calls ``handler.attach(engine)``. For an evaluator run as a separate engine each epoch, pass
    ``global_epoch_transform=lambda _: trainer.state.epoch`` so rows carry the trainer's epoch.

    ``state_dict()``/``load_state_dict()`` carry the whole history: put the logger in the ``to_save`` dict of
    Ignite's ``Checkpoint`` (registered after the evaluation that produces the row, so the checkpoint includes
    it). Loading replaces the history and rewrites the CSV from it, so a resumed run has every row exactly once,
    even when the CSV already held rows written after the checkpoint.

    Args:
        prefix: which ``engine.state.metrics`` keys to log (``f"{prefix}/..."``).
        log_dir: TensorBoard log directory (a ``SummaryWriter`` is created on the first event); also the default
            folder of the CSV and the PNG.
        writer: a TensorBoard ``SummaryWriter`` (or anything with ``add_scalar`` and ``flush``) to use instead.
        csv_path: CSV history file; default ``log_dir/per_class_dice.csv`` when ``log_dir`` is given.
        plot_path: PNG file; default ``log_dir/per_class_dice.png`` when ``log_dir`` is given.
        every: ``"epoch"`` (``EPOCH_COMPLETED``) or a positive int N (every N ``ITERATION_COMPLETED``). With N the
            TensorBoard step is ``engine.state.iteration``, which a trainer counts across epochs but an evaluator
            restarts at every run: on an evaluator keep ``"epoch"`` with ``global_epoch_transform``.
        global_epoch_transform: maps ``engine.state.epoch`` to the epoch written to the rows (MONAI's argument).
        logger: a ``logging.Logger`` or its name; default ``logging.getLogger("monai_gdl_plus.handlers")``.

    Raises:
        ValueError: a bad ``every`` or an empty ``prefix`` at construction; at an event, no key under ``prefix``
            (or a key of the first event missing later), with the keys that were found.
        TypeError: arguments of the wrong type.

    Examples:
        An engine whose metric (here a stand-in for :class:`~monai_gdl_plus.PerClassDice`) puts ``dice/...`` keys
        into ``engine.state.metrics`` at each epoch end; the logger, attached after it, keeps one row per epoch
        and writes the CSV:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from ignite.engine import Engine, Events
        >>> from monai_gdl_plus import PerClassDiceLogger
        >>> engine = Engine(lambda engine, batch: None)
        >>> @engine.on(Events.EPOCH_COMPLETED)
        ... def fake_metric(engine):
        ...     liver = 0.5 + 0.25 * engine.state.epoch
        ...     engine.state.metrics.update({"dice/liver": liver, "dice/tumour": 0.5, "dice/mean": (liver + 0.5) / 2})
        >>> folder = tempfile.TemporaryDirectory()
        >>> dice_logger = PerClassDiceLogger(csv_path=Path(folder.name) / "dice.csv")
        >>> dice_logger.attach(engine)
        >>> _ = engine.run([0, 1], max_epochs=2)
        >>> dice_logger.history[-1]
        {'epoch': 2, 'iteration': 4, 'liver': 1.0, 'tumour': 0.5, 'mean': 0.75}
        >>> (Path(folder.name) / "dice.csv").read_text().splitlines()
        ['epoch,iteration,liver,tumour,mean', '1,2,0.75,0.5,0.625', '2,4,1.0,0.5,0.75']
        >>> folder.cleanup()
    """

    def __init__(
        self,
        prefix: str = "dice",
        log_dir: PathLike | None = None,
        writer: Any | None = None,
        csv_path: PathLike | None = None,
        plot_path: PathLike | None = None,
        every: str | int = "epoch",
        global_epoch_transform: Callable[[int], int] | None = None,
        logger: logging.Logger | str | None = None,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {prefix!r}.")
        if not prefix:
            raise ValueError("`prefix` must be a non-empty string, got ''.")
        if isinstance(every, bool) or not (every == "epoch" or (isinstance(every, int) and every > 0)):
            raise ValueError(f"`every` must be 'epoch' or a positive int (a number of iterations), got {every!r}.")
        if writer is not None and not (hasattr(writer, "add_scalar") and hasattr(writer, "flush")):
            raise TypeError(
                f"`writer` must be a TensorBoard SummaryWriter (add_scalar, flush), got {type(writer).__name__}."
            )
        if global_epoch_transform is not None and not callable(global_epoch_transform):
            raise TypeError(f"`global_epoch_transform` must be callable or None, got {global_epoch_transform!r}.")
        if logger is None:
            logger = logging.getLogger("monai_gdl_plus.handlers")
        elif isinstance(logger, str):
            logger = logging.getLogger(logger)
        elif not isinstance(logger, logging.Logger):
            raise TypeError(f"`logger` must be a logging.Logger, its name, or None, got {type(logger).__name__}.")
        self.prefix = prefix
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writer = writer
        self._own_writer = False
        self.csv_path = Path(csv_path) if csv_path is not None else (self.log_dir / CSV_NAME if self.log_dir else None)
        self.plot_path = (
            Path(plot_path) if plot_path is not None else (self.log_dir / PLOT_NAME if self.log_dir else None)
        )
        self.every = every
        self.global_epoch_transform = global_epoch_transform or (lambda epoch: epoch)
        self.logger = logger
        self.columns: list[str] = []  # class columns (keys without "prefix/"), fixed by the first event
        self.history: list[dict[str, float | int]] = []
        self._csv_rows = 0  # history rows already in the CSV file (-1: the file must be rewritten)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(prefix={self.prefix!r}, log_dir={self.log_dir}, csv_path={self.csv_path}, "
            f"plot_path={self.plot_path}, every={self.every!r})"
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Ignite
    # ----------------------------------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Log on ``EPOCH_COMPLETED`` (or every ``every`` ``ITERATION_COMPLETED``), plot on ``COMPLETED``."""
        event = Events.EPOCH_COMPLETED if self.every == "epoch" else Events.ITERATION_COMPLETED(every=int(self.every))
        if not engine.has_event_handler(self.log_event):
            engine.add_event_handler(event, self.log_event)
        if not engine.has_event_handler(self.completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def __call__(self, engine: Engine) -> None:
        self.log_event(engine)

    def log_event(self, engine: Engine) -> None:
        """Read the per-class values from ``engine.state.metrics``, add a history row and write it out."""
        values = self._read_metrics(engine.state.metrics)
        epoch = int(self.global_epoch_transform(engine.state.epoch))
        row: dict[str, float | int] = {"epoch": epoch, "iteration": int(engine.state.iteration)}
        row.update(values)
        self.history.append(row)
        self._log_table(row)
        self._write_tensorboard(row)
        self._write_csv()

    def completed(self, engine: Engine | None = None) -> None:
        """Write the PNG and flush TensorBoard (the writer stays open: an evaluator completes every epoch)."""
        if self.writer is not None:
            self.writer.flush()
        self.plot()

    def close(self) -> None:
        """Close a SummaryWriter created from ``log_dir`` (a writer passed in is left to its owner)."""
        if self._own_writer and self.writer is not None:
            self.writer.close()
            self.writer = None
            self._own_writer = False

    # ----------------------------------------------------------------------------------------------------------------
    # state
    # ----------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The class columns and every history row, as plain Python values (``torch.load(weights_only=True)`` works)."""
        keys = list(_FIXED_COLUMNS) + self.columns
        return {"columns": list(self.columns), "rows": [[row[k] for k in keys] for row in self.history]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with the saved one and rewrite the CSV from it (no lost, no duplicated rows)."""
        if not isinstance(state_dict, Mapping) or "columns" not in state_dict or "rows" not in state_dict:
            got = list(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"`state_dict` must be a mapping with keys 'columns' and 'rows', got {got}.")
        columns = [str(c) for c in state_dict["columns"]]
        keys = list(_FIXED_COLUMNS) + columns
        history = []
        for row in state_dict["rows"]:
            if len(row) != len(keys):
                raise ValueError(f"`state_dict` rows must have {len(keys)} values ({keys}), got {list(row)}.")
            history.append({k: (int(v) if k in _FIXED_COLUMNS else float(v)) for k, v in zip(keys, row, strict=False)})
        self.columns = columns
        self.history = history
        self._csv_rows = -1
        self._write_csv()

    # ----------------------------------------------------------------------------------------------------------------
    # destinations
    # ----------------------------------------------------------------------------------------------------------------

    def _read_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        head = f"{self.prefix}/"
        found = {k[len(head) :]: v for k, v in metrics.items() if isinstance(k, str) and k.startswith(head)}
        if not found:
            raise ValueError(
                f"PerClassDiceLogger found no `engine.state.metrics` key starting with {head!r}; keys present: "
                f"{sorted(metrics)}. Attach PerClassDice(prefix={self.prefix!r}) to this engine before the logger."
            )
        if not self.columns:
            self.columns = list(found)
        missing = [f"{head}{c}" for c in self.columns if c not in found]
        if missing:
            raise ValueError(
                f"PerClassDiceLogger: metric key(s) {missing} logged before are missing from `engine.state.metrics` "
                f"(keys present: {sorted(metrics)})."
            )
        return {c: _to_float(found[c], f"{head}{c}") for c in self.columns}

    def _log_table(self, row: Mapping[str, float | int]) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        width = max(len(c) for c in [*self.columns, "class"])
        where = f"epoch {row['epoch']}" + ("" if self.every == "epoch" else f", iteration {row['iteration']}")
        lines = [f"Per-class Dice ({self.prefix}, {where}):", f"  {'class':<{width}}  {'dice':>7}"]
        lines += [f"  {c:<{width}}  {_fmt(float(row[c])):>7}" for c in self.columns]
        self.logger.info("\n".join(lines))

    def _write_tensorboard(self, row: Mapping[str, float | int]) -> None:
        if self.writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
            self._own_writer = True
        if self.writer is None:
            return
        step = int(row["epoch"] if self.every == "epoch" else row["iteration"])
        for c in self.columns:
            self.writer.add_scalar(f"{self.prefix}/{c}", float(row[c]), step)
        self.writer.flush()

    def _write_csv(self) -> None:
        if self.csv_path is None:
            return
        keys = list(_FIXED_COLUMNS) + self.columns
        rewrite = self._csv_rows != len(self.history) - 1 or self._csv_rows <= 0 or not self.csv_path.exists()
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if rewrite:
            with open(self.csv_path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(keys)
                w.writerows([row[k] for k in keys] for row in self.history)
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow([self.history[-1][k] for k in keys])
        self._csv_rows = len(self.history)

    def plot(self, path: PathLike | None = None) -> Path | None:
        """Draw the per-class curves of the history into ``path`` (default ``plot_path``); return the file or None."""
        target = Path(path) if path is not None else self.plot_path
        if target is None or not self.history:
            return None
        from matplotlib.figure import Figure  # Agg canvas through Figure.savefig; pyplot's backend is not touched

        x_key = "epoch" if self.every == "epoch" else "iteration"
        xs = [row[x_key] for row in self.history]
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for c in self.columns:
            ys = [float(row[c]) for row in self.history]
            style: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 2} if c == "mean" else {}
            ax.plot(xs, ys, marker="o", markersize=3, label=c, **style)
        ax.set_xlabel(x_key)
        ax.set_ylabel("Dice")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Per-class Dice ({self.prefix})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small", ncol=1 + len(self.columns) // 12)
        fig.tight_layout()
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        return target


def _to_float(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`engine.state.metrics[{key!r}]` must be a scalar, got {type(value).__name__}.") from None


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}"
