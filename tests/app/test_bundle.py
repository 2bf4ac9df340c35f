"""Tests of the shipped MONAI bundle (monai_gdl_plus/app/configs/train.yaml)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml")
from monai.bundle import ConfigParser, ConfigWorkflow  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402

from monai_gdl_plus import DicePlusLoss, GeneralizedDicePlusLoss, PerClassDice, PerClassDiceLogger  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "monai_gdl_plus" / "app" / "configs" / "train.yaml"
META = CONFIG.with_name("metadata.json")

# the smallest run that still exercises every component: 2 synthetic volumes of 16^3 (1 train, 1 val), 1 epoch
TINY = {"epochs": 1, "patch_size": [16, 16, 16], "synthetic#num_samples": 2, "batch_size": 1, "device": "cpu"}


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(overrides)
    return parser


def _tiny_case(num_classes: int = 4):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 8, 8, 8, generator=g)
    return logits, torch.randint(0, num_classes, (2, 1, 8, 8, 8), generator=g)


# ------------------------------------------------------------------------------------------------ static checks


def test_shipped_files_exist_and_parse():
    assert CONFIG.is_file() and META.is_file()
    assert json.loads(META.read_text())["version"]
    parser = _parser()
    assert parser["loss"]["_target_"] == "monai_gdl_plus.GeneralizedDicePlusLoss"  # dotted: no `imports` needed
    assert "$import monai_gdl_plus" in parser["imports"]
    assert parser["validate#evaluator#val_handlers"] == "$@validate#handlers + [@validate#per_class_dice_logger]"


def test_default_loss_resolves_to_gdl_plus_ce():
    loss = _parser().get_parsed_content("loss")
    assert isinstance(loss, GeneralizedDicePlusLoss)
    assert loss.w_type == "square" and loss.lambda_ce == 1.0
    assert loss.to_onehot_y and loss.softmax


def test_variant_by_override():
    loss = _parser(**{"loss#w_type": "simple", "loss#lambda_ce": 0.0}).get_parsed_content("loss")
    assert loss.w_type == "simple" and loss.lambda_ce == 0.0


@pytest.mark.parametrize(
    ("target", "cls"),
    [
        ("monai_gdl_plus.DicePlusLoss", DicePlusLoss),
        ("monai_gdl_plus.GeneralizedDicePlusLoss", GeneralizedDicePlusLoss),
        ("monai.losses.DiceCELoss", DiceCELoss),
        ("DicePlusLoss", DicePlusLoss),  # short names: the config imports monai_gdl_plus
        ("GeneralizedDicePlusLoss", GeneralizedDicePlusLoss),
        ("DiceCELoss", DiceCELoss),
    ],
)
def test_swapping_loss_target_alone_works(target, cls):
    # the bundle's loss arguments are valid for all three, so `--loss#_target_ X` is the whole swap
    loss = _parser(**{"loss#_target_": target}).get_parsed_content("loss")
    assert type(loss) is cls
    logits, labels = _tiny_case()
    value = loss(logits.requires_grad_(True), labels)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_swapped_losses_agree_with_monai_dicece():
    # same arguments, same value: our DicePlusLoss is a drop-in for the DiceCELoss the swap replaces
    logits, labels = _tiny_case()
    ours = _parser(**{"loss#_target_": "monai_gdl_plus.DicePlusLoss"}).get_parsed_content("loss")
    theirs = _parser(**{"loss#_target_": "monai.losses.DiceCELoss"}).get_parsed_content("loss")
    torch.testing.assert_close(ours(logits, labels), theirs(logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours", ["monai_gdl_plus.GeneralizedDicePlusLoss", "GeneralizedDicePlusLoss", "DicePlusLoss"])
def test_model_zoo_dicece_config_with_only_target_changed(ours):
    # spleen_ct_segmentation's loss block, as shipped in MONAI's model zoo, with only `_target_` replaced
    config = {
        "imports": ["$import monai_gdl_plus"],
        "loss": {
            "_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "squared_pred": True, "batch": True,
            "lambda_dice": 0.5, "lambda_ce": 0.5,
        },
    }  # fmt: skip
    reference = ConfigParser(config).get_parsed_content("loss")
    config["loss"]["_target_"] = ours
    loss = ConfigParser(config).get_parsed_content("loss")
    assert loss.squared_pred and loss.batch and loss.lambda_ce == 0.5
    logits, labels = _tiny_case(num_classes=2)
    value = loss(logits, labels)
    assert torch.isfinite(value) and value.ndim == 0
    if ours.endswith("DicePlusLoss") and "Generalized" not in ours:
        torch.testing.assert_close(value, reference(logits, labels), rtol=1e-5, atol=1e-5)


def test_metric_and_logger_resolve_by_short_name():
    config = {
        "imports": ["$import monai_gdl_plus"],
        "metric": {"_target_": "PerClassDice", "num_classes": 3},
        "logger": {"_target_": "PerClassDiceLogger"},
    }
    parser = ConfigParser(config)
    assert isinstance(parser.get_parsed_content("metric"), PerClassDice)
    assert isinstance(parser.get_parsed_content("logger"), PerClassDiceLogger)


@pytest.mark.slow
def test_name_resolution_in_a_fresh_interpreter():
    # MONAI's ComponentLocator only knows the `monai*` modules in sys.modules when it first builds its (per-parser,
    # cached) table: a short name needs "$import monai_gdl_plus"; a dotted name resolves without any import.
    script = textwrap.dedent(
        """
        import sys
        from monai.bundle import ConfigParser

        assert "monai_gdl_plus" not in sys.modules
        loss = ConfigParser({"loss": {"_target_": "monai_gdl_plus.GeneralizedDicePlusLoss"}}).get_parsed_content("loss")
        print("dotted-without-imports:", type(loss).__module__, type(loss).__name__)

        for name in [m for m in sys.modules if m.startswith("monai_gdl_plus")]:
            del sys.modules[name]  # back to a state where nothing of ours was imported
        try:
            ConfigParser({"loss": {"_target_": "GeneralizedDicePlusLoss"}}).get_parsed_content("loss")
        except ModuleNotFoundError as e:  # what MONAI's locator raises for a name it has not seen; nothing else
            assert "Cannot locate class or function path: 'GeneralizedDicePlusLoss'" in str(e), str(e)
            print("short-without-imports: not found")
        else:
            raise AssertionError("a short `_target_` resolved without `$import monai_gdl_plus`")

        loss_cfg = {"_target_": "GeneralizedDicePlusLoss", "w_type": "simple"}
        loss = ConfigParser({"imports": ["$import monai_gdl_plus"], "loss": loss_cfg}).get_parsed_content("loss")
        print("short-with-imports:", type(loss).__module__, type(loss).__name__, loss.w_type)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dotted-without-imports: monai_gdl_plus.losses GeneralizedDicePlusLoss" in out.stdout
    assert "short-without-imports: not found" in out.stdout
    assert "short-with-imports: monai_gdl_plus.losses GeneralizedDicePlusLoss simple" in out.stdout


# ------------------------------------------------------------------------------------------------ training runs


def _check_run_folder(out: Path, epochs: int, reported: list[str]) -> None:
    assert (out / "per_class_dice.png").stat().st_size > 0
    assert (out / "model.pt").is_file()
    assert list(out.glob("events.out.tfevents.*"))
    with open(out / "per_class_dice.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    for name in reported + ["mean"]:
        assert name in rows[-1]


@pytest.mark.slow
def test_bundle_trains_one_epoch_in_process(tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIG), meta_file=str(META), logging_file=False, output_dir=str(tmp_path), **TINY
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and evaluator.state.epoch == 1
    metrics = evaluator.state.metrics
    reported = ["organ", "structure2", "lesion"]
    assert {f"dice/{n}" for n in reported + ["mean"]} <= set(metrics)
    for key, value in metrics.items():  # scalars only: nothing for MONAI's handlers to drop
        assert isinstance(value, float), key
    # the key metric is the mean of the per-class values, read from the same (single) PerClassDice
    assert metrics["val_mean_dice"] == pytest.approx(metrics["dice/mean"], nan_ok=True)
    assert isinstance(workflow.parser.get_parsed_content("loss"), GeneralizedDicePlusLoss)
    _check_run_folder(tmp_path, 1, reported)


@pytest.mark.slow
def test_monai_bundle_cli_runs_with_a_short_name_variant(tmp_path):
    # MONAI's own command line (python-fire), the short `_target_` (the config imports monai_gdl_plus) and a
    # GDL variant chosen by override
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG), "--meta_file", str(META),
        "--output_dir", str(out), "--epochs", "1", "--patch_size", "[16,16,16]", "--synthetic#num_samples", "2",
        "--batch_size", "1", "--device", "$torch.device('cpu')",
        "--loss#_target_", "GeneralizedDicePlusLoss", "--loss#w_type", "simple",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    log = proc.stdout + proc.stderr
    assert "dice/lesion" in log and "val_mean_dice" in log  # StatsHandler and PerClassDiceLogger output
    _check_run_folder(out, 1, ["organ", "structure2", "lesion"])


# ------------------------------------------------------------------------------------------------ multi-process

MULTI = CONFIG.with_name("multi_gpu_train.yaml")
# 7 synthetic volumes with val_fraction 0.45: round(3.15) = 3 validation volumes (odd: 2 + 1 over two ranks, no
# padding duplicates) and 4 training volumes (2 per rank, one batch of 2 each)
MULTI_ARGS = ["--epochs", "2", "--patch_size", "[16, 16, 16]", "--synthetic#num_samples", "7", "--val_fraction", "0.45"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port())]  # fmt: skip


def test_multi_gpu_config_disables_the_intended_handlers_on_other_ranks():
    # multi_gpu_train.yaml disables handlers by index in train.yaml's lists: the indices must name the file
    # writers/loggers, never the LrScheduleHandler/ValidationHandler that every rank has to run
    parser = ConfigParser()
    parser.read_config([str(CONFIG), str(MULTI)])
    disabled = {k.rsplit("#", 1)[0] for k in ConfigParser.load_config_file(str(MULTI)) if k.endswith("#_disabled_")}
    targets = {k: parser[f"{k}#_target_"] for k in disabled}
    assert targets == {
        "train#handlers#2": "StatsHandler",
        "train#handlers#3": "TensorBoardStatsHandler",
        "validate#handlers#0": "StatsHandler",
        "validate#handlers#1": "TensorBoardStatsHandler",
        "validate#handlers#2": "CheckpointSaver",
        "validate#per_class_dice_logger": "monai_gdl_plus.PerClassDiceLogger",
    }
    assert [h["_target_"] for h in parser["train#handlers"][:2]] == ["LrScheduleHandler", "ValidationHandler"]
    assert parser["loss#batch"] is True and parser["loss#sync_batch"] is True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bundle_under_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        *_torchrun(2), "-m", "monai.bundle", "run", "--config_file", f"['{CONFIG}','{MULTI}']",
        *MULTI_ARGS, "--output_dir", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_cpu_env(), check=False, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    _check_run_folder(out, 2, ["organ", "structure2", "lesion"])  # one CSV row per epoch: no duplicates
    with open(out / "per_class_dice.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    # rank 0 alone wrote the folder: the two TensorBoard handlers' event files (as one process writes), both from
    # one process id (event file names end in <host>.<pid>.<n>), the checkpoint, the CSV and the PNG
    events = sorted(p.name for p in out.glob("events.out.tfevents.*"))
    assert len(events) == 2 and len({name.split(".")[-2] for name in events}) == 1, events
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("events."))
    assert files == ["model.pt", "per_class_dice.csv", "per_class_dice.png"]
    state = torch.load(out / "model.pt", map_location="cpu")  # the plain network's weights (no DDP "module.")
    assert not any(k.startswith("module.") for k in state)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stalled_rank_fails_the_launch_after_dist_timeout(tmp_path):
    """A rank that stops answering (here: sleeps instead of training) fails the launch once ``dist_timeout`` has
    passed, with an exit status and gloo's one-line reason, instead of hanging it for PyTorch's 30 minutes."""
    stall = tmp_path / "stall.yaml"
    sleep = "sys.modules['time'].sleep(600)"
    stall.write_text(f'run:\n  - "$@train#trainer.run() if dist.get_rank() == 0 else {sleep}"\n')
    cmd = [
        *_torchrun(2), "-m", "monai.bundle", "run", "--config_file", f"['{CONFIG}','{MULTI}','{stall}']",
        *MULTI_ARGS, "--output_dir", str(tmp_path / "run"), "--dist_timeout", "5",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_cpu_env(), check=False, cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Timed out waiting 5000ms" in proc.stdout + proc.stderr


_VALIDATE_ONCE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from monai.bundle import ConfigParser

    out_dir, files, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    parser.get_parsed_content("initialize")  # multi: the process group (gloo), ignite's view of it
    evaluator = parser.get_parsed_content("validate#evaluator")
    net = getattr(evaluator.network, "module", evaluator.network)  # DDP shares the module's parameters
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same fixed weights on every process, whatever the global RNG went through
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    evaluator.run()
    if "finalize" in parser:
        parser.get_parsed_content("finalize")
    threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    rank = int(os.environ.get("RANK", "-1"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"volumes": evaluator.state.iteration, "metrics": evaluator.state.metrics, "threads": threads}, f)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_distributed_validation_equals_one_process(tmp_path):
    script = tmp_path / "validate_once.py"
    script.write_text(_VALIDATE_ONCE)
    overrides = {"patch_size": [16, 16, 16], "synthetic#num_samples": 7, "val_fraction": 0.45}
    runs = {
        "single": ([sys.executable, str(script)], [str(CONFIG)]),
        "multi": ([*_torchrun(2), str(script)], [str(CONFIG), str(MULTI)]),
    }
    results = {}
    for name, (launcher, files) in runs.items():
        out = tmp_path / name
        out.mkdir()
        args = [str(out), json.dumps(files), json.dumps({**overrides, "output_dir": str(out / "run")})]
        proc = subprocess.run(
            [*launcher, *args], capture_output=True, text=True, timeout=300, env=_cpu_env(), check=False, cwd=out
        )
        assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-3000:])
        results[name] = {p.stem: json.loads(p.read_text()) for p in out.glob("rank*.json")}
    single = results["single"]["rank-1"]
    assert single["volumes"] == 3
    # the validation volumes split 2 + 1 over the ranks, each counted once (no padding duplicates)
    assert sorted(r["volumes"] for r in results["multi"].values()) == [1, 2]
    for rank in ("rank0", "rank1"):  # the all-reduced metric: the same, exact value on every rank
        # and the config's finalize left no gloo thread running into interpreter exit (where one could abort it)
        assert [t for t in results["multi"][rank]["threads"] if "gloo" in t] == [], results["multi"][rank]["threads"]
        metrics = results["multi"][rank]["metrics"]
        assert set(metrics) == set(single["metrics"]) and {"dice/lesion", "dice/mean", "val_mean_dice"} <= set(metrics)
        for key, value in single["metrics"].items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (rank, key)
