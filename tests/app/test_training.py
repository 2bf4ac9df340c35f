"""One training run of the bundle (monai_gdl_plus.app.training): each loss variant builds what its name promises,
the overrides of a run, the loggers it quiets and the history it records. (Whole runs: test_cli.py, test_bundle.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from monai.bundle import ConfigParser

from monai_gdl_plus import DicePlusLoss, GeneralizedDicePlusLoss
from monai_gdl_plus.app import training
from monai_gdl_plus.app.training import LOSS_BASE, VARIANTS, RunResult


def _promise(name: str) -> dict:
    """What a variant's name says, read from its parts: ``[monai-]dice|gdl[-<w_type>][-squared][+ce]``."""
    owner, rest = ("monai", name[len("monai-") :]) if name.startswith("monai-") else ("ours", name)
    rest, ce = (rest[: -len("+ce")], True) if rest.endswith("+ce") else (rest, False)
    rest, squared = (rest[: -len("-squared")], True) if rest.endswith("-squared") else (rest, False)
    family, _, w_type = rest.partition("-")
    return {"owner": owner, "family": family, "w_type": w_type or None, "squared": squared, "ce": ce}


def _built_loss(name: str):
    """The loss a run of ``name`` trains with: the bundle's ``loss`` item as :func:`bundle_overrides` sets it."""
    _config, overrides = training.bundle_overrides(name, out_dir=Path("unused"), epochs=1, device="cpu")
    return ConfigParser({"loss": overrides["loss"]}).get_parsed_content("loss")


def test_variant_names_parse_into_known_parts():
    """Every name reads as owner, family and options (a name this grammar misreads would test nothing)."""
    for name in VARIANTS:
        p = _promise(name)
        assert p["family"] in ("dice", "gdl") and p["w_type"] in (None, "square", "simple", "uniform"), name
        assert p["owner"] == "monai" or p["family"] == "dice" or p["w_type"] is not None, f"{name}: which w_type?"
    assert _promise("gdl-square-squared") == {"owner": "ours", "family": "gdl", "w_type": "square", "squared": True,
                                              "ce": False}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_builds_the_loss_its_name_promises(name):
    """Class, CE term, squared denominator and GDL weighting as the name says, on LOSS_BASE's settings (the bundle's
    label maps: one-hot, softmax, background included, per-sample Dice)."""
    import monai.losses as ml

    p, loss = _promise(name), _built_loss(name)
    if p["owner"] == "monai":
        expected = {("dice", False): ml.DiceLoss, ("gdl", False): ml.GeneralizedDiceLoss, ("dice", True): ml.DiceCELoss}
        assert type(loss) is expected[p["family"], p["ce"]]
        dice = loss.dice if p["ce"] else loss
        assert (dice.squared_pred if p["family"] == "dice" else False) is p["squared"]
        assert not p["ce"] or loss.lambda_ce > 0
        assert (dice.include_background, dice.to_onehot_y, dice.softmax, dice.batch) == (True, True, True, False)
        return
    assert type(loss) is (DicePlusLoss if p["family"] == "dice" else GeneralizedDicePlusLoss)
    options = loss.options
    assert (options.lambda_ce > 0) is p["ce"], f"{name}: lambda_ce={options.lambda_ce}"
    assert options.squared_pred is p["squared"]
    if p["family"] == "gdl":
        assert options.w_type == p["w_type"]
    assert (options.lambda_focal, options.tversky, options.jaccard) == (0.0, None, False)  # nothing the name omits
    assert {k: getattr(options, k) for k in LOSS_BASE} == LOSS_BASE


def test_bundle_overrides_of_one_process_and_of_a_rank():
    config, overrides = training.bundle_overrides(
        "dice", out_dir=Path("runs/a"), epochs=3, device="cuda:1", data_dir="/data/Task09", size=24, seed=7
    )
    assert config == str(training.CONFIG_PATH)
    assert overrides["device"] == "$torch.device('cuda:1')" and overrides["patch_size"] == [24, 24, 24]
    assert (overrides["output_dir"], overrides["epochs"], overrides["seed"]) == ("runs/a", 3, 7)
    assert (overrides["data_dir"], overrides["check_labels"]) == ("/data/Task09", False)  # checked by the CLI
    assert "finalize" not in overrides
    for device, keeps_device in (("cpu", True), ("cuda", False)):  # on CUDA each rank takes its LOCAL_RANK's GPU
        config, overrides = training.bundle_overrides("dice", out_dir=Path("r"), epochs=1, device=device,
                                                      distributed=True)  # fmt: skip
        assert config == [str(training.CONFIG_PATH), str(training.MULTI_GPU_PATH)]
        assert overrides["finalize"] == []  # the process group outlives one run of compare
        assert ("device" in overrides) is keeps_device
        assert "data_dir" not in overrides


def test_history_recorder_keeps_the_prefixed_metrics_and_echoes_them():
    result = RunResult("dice", Path("."), ["bg", "organ", "lesion"], ["organ", "lesion"], "lesion", {})
    lines: list[str] = []
    record = training._history_recorder(result, "dice", lines.append, epochs=5)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=2, metrics={"dice/organ": 0.5, "dice/lesion": float("nan"),
                                                                      "dice/mean": 0.5, "val_loss": 3.0}))  # fmt: skip
    record(engine)
    assert list(result.history[0]) == ["organ", "lesion", "mean"] and result.final["organ"] == 0.5
    assert lines == ["[dice] epoch   2/5  val Dice  organ 0.500  lesion   n/a  mean 0.500"]
    silent = RunResult("dice", Path("."), ["bg", "organ"], ["organ"], "organ", {})
    training._history_recorder(silent, "dice", None, epochs=5)(engine)
    assert len(silent.history) == 1


def test_quiet_loggers_levels_and_error_filter():
    engine_logger = logging.getLogger("test_training.engine")
    engine_logger.setLevel(logging.INFO)
    handler_logger = logging.getLogger("val_stats")
    saved = (handler_logger.level, list(handler_logger.filters))
    try:
        handler_logger.setLevel(logging.INFO)
        training._quiet_loggers([engine_logger], engines_too=False, quiet_errors=False)
        assert handler_logger.level == logging.WARNING and engine_logger.level == logging.INFO
        training._quiet_loggers([engine_logger], engines_too=True, quiet_errors=True)
        assert engine_logger.level == logging.WARNING
        error = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
        warning = logging.LogRecord("x", logging.WARNING, __file__, 1, "careful", None, None)
        for logger in (engine_logger, handler_logger):
            assert not logger.filter(error) and logger.filter(warning)
    finally:
        handler_logger.setLevel(saved[0])
        handler_logger.filters[:] = saved[1]
        engine_logger.filters.clear()
