"""One training run of the shipped bundle (``configs/train.yaml``) with one loss variant, through MONAI's
``ConfigWorkflow``: what ``gdl-plus demo`` runs once and ``gdl-plus compare`` once per variant.

:func:`train_bundle` runs in steps of one job each: the config overrides, the workflow, the loggers quieted, the
per-class history recorded after each validation, the run (handlers closed whatever happens).

Examples:
    >>> sorted(VARIANTS)[:3], VARIANTS["dice+ce"]
    (['dice', 'dice+ce', 'dice-squared'], {'_target_': 'monai_gdl_plus.DicePlusLoss', 'lambda_ce': 1.0})
    >>> config, overrides = bundle_overrides("gdl-simple", out_dir=Path("runs/x"), epochs=1, device="cpu")
    >>> config == str(CONFIG_PATH), overrides["loss"]["w_type"], overrides["epochs"]
    (True, 'simple', 1)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_gdl_plus.app.common import format_number
from monai_gdl_plus.app.distributed import release_process_group

__all__ = [
    "CONFIG_PATH", "DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_SAMPLES", "DEFAULT_SIZE", "LOSS_BASE", "META_PATH",
    "MULTI_GPU_PATH", "VARIANTS", "RunResult", "bundle_overrides", "is_rank0", "train_bundle",
]  # fmt: skip

CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "train.yaml"
MULTI_GPU_PATH = Path(__file__).resolve().parent / "configs" / "multi_gpu_train.yaml"
META_PATH = Path(__file__).resolve().parent / "configs" / "metadata.json"

# loss variants: each replaces the bundle's whole `loss` item with LOSS_BASE plus its own arguments
_OURS_DICE, _OURS_GDL = "monai_gdl_plus.DicePlusLoss", "monai_gdl_plus.GeneralizedDicePlusLoss"
LOSS_BASE: dict[str, Any] = {"include_background": True, "to_onehot_y": True, "softmax": True, "batch": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "dice": {"_target_": _OURS_DICE},
    "dice+ce": {"_target_": _OURS_DICE, "lambda_ce": 1.0},
    "dice-squared": {"_target_": _OURS_DICE, "squared_pred": True},
    "gdl-square": {"_target_": _OURS_GDL, "w_type": "square"},
    "gdl-simple": {"_target_": _OURS_GDL, "w_type": "simple"},
    "gdl-uniform": {"_target_": _OURS_GDL, "w_type": "uniform"},
    "gdl-square-squared": {"_target_": _OURS_GDL, "w_type": "square", "squared_pred": True},
    "gdl-square+ce": {"_target_": _OURS_GDL, "w_type": "square", "lambda_ce": 1.0},
    "gdl-simple+ce": {"_target_": _OURS_GDL, "w_type": "simple", "lambda_ce": 1.0},
    "monai-dice": {"_target_": "monai.losses.DiceLoss"},
    "monai-gdl": {"_target_": "monai.losses.GeneralizedDiceLoss"},
    "monai-dice+ce": {"_target_": "monai.losses.DiceCELoss"},
}

# training defaults, sized for about two minutes of `gdl-plus demo` on 2 CPU cores
DEFAULT_SAMPLES = 16
DEFAULT_SIZE = 32
DEFAULT_BATCH = 2
DEFAULT_LR = 0.01

# the bundle's StatsHandler / PerClassDiceLogger loggers: the CLI prints its own lines and tables instead
_QUIET_LOGGERS = ("train_stats", "val_stats", "per_class_dice")


@dataclass
class RunResult:
    """One training run of the bundle."""

    variant: str
    out_dir: Path
    class_names: list[str]
    reported: list[str]
    rare: str
    shares: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        """Per-class Dice of the last validation (``{"organ": 0.9, ..., "mean": 0.6}``)."""
        return self.history[-1] if self.history else {}


def is_rank0() -> bool:
    """Whether this process prints and writes: rank 0 of a torchrun launch, or a process outside any launch."""
    return int(os.environ.get("RANK", "0")) == 0


def train_bundle(
    *,
    variant: str,
    out_dir: Path,
    epochs: int,
    device: str,
    data_dir: str | None = None,
    decathlon: Any = None,
    num_samples: int = DEFAULT_SAMPLES,
    size: int = DEFAULT_SIZE,
    batch_size: int = DEFAULT_BATCH,
    learning_rate: float = DEFAULT_LR,
    seed: int = 0,
    progress: bool = True,
    echo: bool = True,
    quiet_errors: bool = False,
    distributed: bool = False,
) -> RunResult:
    """Train the shipped bundle once with one loss variant, through MONAI's ``ConfigWorkflow``.

    Args:
        variant: a key of :data:`VARIANTS`.
        out_dir: the run folder (``output_dir`` of the bundle).
        epochs: training epochs (one validation after each).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        data_dir: a Decathlon folder, already checked, or None for synthetic volumes.
        decathlon: the :class:`~monai_gdl_plus.app.data.DecathlonDataset` of ``data_dir`` (class voxel counts).
        num_samples: synthetic volumes (training and validation together).
        size: edge of the synthetic volumes and of the training patches.
        batch_size: training batch size.
        learning_rate: Adam's learning rate.
        seed: seed of the data, the split, the network initialisation and the shuffling.
        progress: show a progress bar (tqdm).
        echo: print one line of per-class Dice after each validation.
        quiet_errors: keep tracebacks of a failure out of the bundle's and engines' logs (the CLI reports it).
        distributed: this process is one rank of a torchrun launch (``torch.distributed`` environment set): the
            bundle runs with ``multi_gpu_train.yaml`` (DDP, distributed samplers, ``sync_batch``, files from rank 0
            only); ``device`` ``"cpu"`` keeps every rank on the CPU, ``"cuda"`` gives each rank its
            ``LOCAL_RANK``'s GPU. The process group is left initialised (for the next run of ``compare``).
            Only rank 0 shows a progress bar and echoes.

    Returns:
        A :class:`RunResult` with the per-class Dice history.
    """
    from ignite.engine import Events

    config_file, overrides = bundle_overrides(
        variant, out_dir=out_dir, epochs=epochs, device=device, data_dir=data_dir, num_samples=num_samples, size=size,
        batch_size=batch_size, learning_rate=learning_rate, seed=seed, distributed=distributed,
    )  # fmt: skip
    if distributed:
        rank0 = is_rank0()
        progress, echo = progress and rank0, echo and rank0
    workflow = _initialized_workflow(config_file, overrides)
    parsed = workflow.parser.get_parsed_content
    data, trainer, evaluator = parsed("data"), parsed("train#trainer"), parsed("validate#evaluator")
    _quiet_loggers([trainer.logger, evaluator.logger], engines_too=distributed, quiet_errors=quiet_errors)
    result = _new_result(variant, out_dir, data, decathlon, parsed("validate#per_class_dice"))
    say = _progress_bar(trainer, variant) if progress else print
    recorder = _history_recorder(result, parsed("validate#per_class_dice").prefix, say if echo else None, epochs)
    evaluator.add_event_handler(Events.COMPLETED, recorder)
    start = time.perf_counter()
    _run_and_close(workflow, parsed, distributed)
    result.seconds = time.perf_counter() - start
    return result


def bundle_overrides(
    variant: str, *, out_dir: Path, epochs: int, device: str, data_dir: str | None = None,
    num_samples: int = DEFAULT_SAMPLES, size: int = DEFAULT_SIZE, batch_size: int = DEFAULT_BATCH,
    learning_rate: float = DEFAULT_LR, seed: int = 0, distributed: bool = False,
) -> tuple[str | list[str], dict[str, Any]]:  # fmt: skip
    """The config file(s) and the overrides of one run (arguments as :func:`train_bundle`'s)."""
    overrides: dict[str, Any] = {
        "output_dir": str(out_dir),
        "epochs": epochs,
        "device": f"$torch.device({device!r})",
        "patch_size": [size] * 3,
        "synthetic#num_samples": num_samples,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
    }
    overrides["loss"] = {**LOSS_BASE, **VARIANTS[variant]}
    if data_dir is not None:
        overrides.update({"data_dir": str(data_dir), "check_labels": False})  # the CLI has checked them already
    if not distributed:
        return str(CONFIG_PATH), overrides
    if device != "cpu":  # multi_gpu_train.yaml's own device: the GPU of this rank's LOCAL_RANK
        del overrides["device"]
    overrides["finalize"] = []  # the process group outlives one run (compare trains several in a row)
    return [str(CONFIG_PATH), str(MULTI_GPU_PATH)], overrides


def _initialized_workflow(config_file: str | list[str], overrides: dict[str, Any]) -> Any:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=config_file, meta_file=str(META_PATH), logging_file=False, workflow_type="train", **overrides
    )
    workflow.initialize()
    return workflow


def _quiet_loggers(engine_loggers: list[logging.Logger], *, engines_too: bool, quiet_errors: bool) -> None:
    """The bundle's handler loggers to WARNING (they reset themselves to INFO when built); the engines' too in a
    distributed run (multi_gpu_train.yaml sets them to INFO on rank 0): the CLI prints its own lines. With
    ``quiet_errors`` none of them logs an error: the CLI reports a failure (or Ctrl-C) in one line, where MONAI and
    Ignite would log tracebacks."""
    handler_loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    for logger in handler_loggers + (engine_loggers if engines_too else []):
        logger.setLevel(logging.WARNING)
    if quiet_errors:
        for logger in handler_loggers + engine_loggers:
            logger.addFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _new_result(variant: str, out_dir: Path, data: Any, decathlon: Any, metric: Any) -> RunResult:
    """An empty history, with the classes the metric reports and the rare class of the data."""
    return RunResult(
        variant=variant, out_dir=out_dir, class_names=list(data.class_names),
        reported=[metric.class_names[c] for c in metric.reported], rare=data.class_names[_rare_index(data, decathlon)],
        shares=_class_shares(data, decathlon),
    )  # fmt: skip


def _class_shares(data: Any, decathlon: Any) -> dict[str, float]:
    """Share of labelled voxels per class: all synthetic volumes, or the Decathlon training labels."""
    import numpy as np

    if decathlon is not None:
        counts = np.asarray(decathlon.class_voxels or [0] * len(data.class_names), dtype=np.float64)
    else:
        counts = np.zeros(data.num_classes, dtype=np.float64)
        for item in list(data.train) + list(data.val):
            counts += np.bincount(np.asarray(item["label"]).ravel(), minlength=data.num_classes)[: data.num_classes]
    total = counts.sum()
    shares = zip(data.class_names, counts, strict=True)
    return {name: (float(c / total) if total else float("nan")) for name, c in shares}


def _rare_index(data: Any, decathlon: Any) -> int:
    import numpy as np

    if decathlon is not None and decathlon.class_voxels is not None:
        return 1 + int(np.argmin(decathlon.class_voxels[1:]))
    return int(data.rare_class)


def _progress_bar(trainer: Any, variant: str) -> Callable[[str], None]:
    """A progress bar over the trainer's iterations; returns how to print a line without breaking it."""
    from ignite.handlers import ProgressBar
    from monai.handlers import from_engine

    pbar = ProgressBar(persist=False, desc=f"{variant} epoch")
    pbar.attach(trainer, output_transform=lambda out: {"loss": float(from_engine(["loss"], first=True)(out))})
    return pbar.log_message


def _history_recorder(
    result: RunResult, prefix: str, say: Callable[[str], None] | None, epochs: int
) -> Callable[[Any], None]:
    """The evaluator's COMPLETED handler: appends the per-class Dice of ``engine.state.metrics`` (keys
    ``<prefix>/<class>``) to ``result.history`` and, given ``say``, prints them on one line."""
    prefix = prefix + "/"

    def record(engine: Any) -> None:
        metrics = engine.state.metrics
        row = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
        result.history.append(row)
        if say is not None:
            cells = "  ".join(f"{name} {format_number(row.get(name, math.nan))}" for name in result.reported + ["mean"])
            say(f"[{result.variant}] epoch {engine.state.epoch:>3}/{epochs}  val Dice  {cells}")

    return record


def _run_and_close(workflow: Any, parsed: Callable[[str], Any], distributed: bool) -> None:
    """Run and finalize the workflow; close the handlers that hold a thread or a file, also after a failure."""
    try:
        workflow.run()
        workflow.finalize()
    finally:  # TensorBoard writers run a thread each: close them, also after a failure or Ctrl-C
        handlers = [*parsed("train#handlers"), *parsed("validate#handlers"), parsed("validate#per_class_dice_logger")]
        # (a handler disabled on ranks > 0 by multi_gpu_train.yaml is None or left out here)
        for handler in handlers:
            if hasattr(handler, "close"):
                handler.close()
        if distributed:  # the group outlives this run (main() ends it), but this run's DDP network must not hold it
            release_process_group(parsed("network"))
