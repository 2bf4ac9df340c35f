"""Tests of the ``gdl-plus`` command line (monai_gdl_plus.app.cli), on tiny sizes."""

from __future__ import annotations

import csv
import importlib.metadata
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_gdl_plus.app import cli
from monai_gdl_plus.app.cli import main
from monai_gdl_plus.app.training import RunResult

# 2 synthetic volumes of 16^3 (one for training, one for validation), one epoch of one iteration
TINY = ["--epochs", "1", "--num-samples", "2", "--size", "16", "--batch-size", "1", "--device", "cpu"]
REPORTED = ["organ", "structure2", "lesion"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


def _table_rows(out: str, first_cells: list[str]) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in first_cells:
            rows[cells[0]] = cells
    return rows


def _write_decathlon(root: Path, **kwargs) -> Path:
    from test_data import write_decathlon  # the tiny NIfTI folder builder shared with test_data.py

    return write_decathlon(root, **kwargs)


# ------------------------------------------------------------------------------------------------ plumbing


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("gdl-plus") == "monai_gdl_plus.app.cli:main"


def test_python_dash_m_runs_main(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["monai_gdl_plus", "config"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("monai_gdl_plus", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == str(cli.CONFIG_PATH)


def test_config_prints_the_shipped_bundle(capsys):
    code, out, _ = _run(capsys, "config")
    assert code == 0 and Path(out.strip()).is_file() and out.strip().endswith("train.yaml")


def test_no_command_prints_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 2 and "demo" in out and "compare" in out and "bench" in out


def test_version(capsys):
    from monai_gdl_plus import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--loss", "gdl-squar"], "unknown variant 'gdl-squar' (did you mean 'gdl-square'?)"),
        (["compare", "--variants", "dice,focal"], "`--variants`: unknown variant 'focal'"),
        (["compare", "--variants", "dice,dice"], "names a variant twice"),
        (["compare", "--variants", ","], "`--variants` must name at least one of"),
        (["demo", "--device", "tpu"], "`--device` must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_bad_options_give_one_line(capsys, tmp_path, argv, match):
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path / "run"))
    _assert_one_line_error(code, err, match)
    assert not (tmp_path / "run").exists()  # nothing written before the input was checked


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--size", "20"], "--size must be a multiple of 8"),
        (["demo", "--size", "8"], "--size must be >= 16"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1"),
        (["demo", "--num-samples", "x"], "--num-samples must be an integer"),
        (["demo", "--lr", "-1"], "--lr must be a positive finite number, got -1"),
        (["compare", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["demo", "--unknown"], "unrecognized arguments: --unknown"),
        (["demo", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["compare", "--seed", str(2**32)], f"--seed must be <= {2**32 - 1}, got {2**32}"),
    ],
)
def test_argparse_errors_exit_2(capsys, argv, match):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and match in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "compare"])
@pytest.mark.parametrize("wrote_a_file", [False, True])
def test_failed_run_leaves_no_empty_run_folder(capsys, tmp_path, monkeypatch, command, wrote_a_file):
    """A run that fails before writing anything removes the folder it created; one that wrote files keeps them."""

    def failing_train(out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        if wrote_a_file:
            (out_dir / "metrics.csv").write_text("epoch\n")
        raise ValueError("`image` has 2 channels, expected 1")

    monkeypatch.setattr(cli, "train_bundle", failing_train)
    out = tmp_path / "sub" / "run"
    code, _, err = _run(capsys, command, *TINY, "--out", str(out))
    _assert_one_line_error(code, err, "expected 1")
    assert out.exists() == wrote_a_file
    assert (tmp_path / "sub").exists()  # the run folder goes, not the parents `mkdir(parents=True)` made
    # an empty folder given with --out is the user's: emptied of what the run made, but kept
    given = tmp_path / "given"
    given.mkdir()
    if not wrote_a_file:
        code, _, _ = _run(capsys, command, *TINY, "--out", str(given))
        assert code == 2 and given.is_dir() and not any(given.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, tmp_path):
    code, _, err = _run(capsys, "demo", "--device", "cuda", "--out", str(tmp_path / "r"))
    _assert_one_line_error(code, err, "CUDA is not available on this machine")


def test_out_folder_must_be_new_or_empty(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = _run(capsys, "demo", *TINY, "--out", str(tmp_path))
    _assert_one_line_error(code, err, "already exists and is not an empty folder")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("missing_folder", "does not exist or is not a directory"),
        ("missing_json", "no dataset.json"),
        ("malformed_json", "dataset.json: malformed JSON"),
        ("class_beyond", "contains class 7, but dataset.json 'labels' defines 3 classes (0..2)"),
    ],
)
def test_bad_dataset_gives_one_line(capsys, tmp_path, breakage, match):
    nib = pytest.importorskip("nibabel")
    root = _write_decathlon(tmp_path / "Task", num_cases=2, size=16)
    if breakage == "missing_folder":
        root = tmp_path / "nowhere"
    elif breakage == "missing_json":
        (root / "dataset.json").unlink()
    elif breakage == "malformed_json":
        (root / "dataset.json").write_text('{"labels": ')
    elif breakage == "class_beyond":
        label = np.zeros((16, 16, 16), dtype=np.uint8)
        label[3, 3, 3] = 7
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / "case_1.nii.gz"))
    for command in ("demo", "compare"):
        code, _, err = _run(capsys, command, *TINY, "--data", str(root), "--out", str(tmp_path / command))
        _assert_one_line_error(code, err, match)
        assert err.startswith(f"gdl-plus {command}: error: ")


def test_unexpected_failure_is_one_line_with_a_hint(capsys, tmp_path, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("Failed to evaluate x") from ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "train_bundle", boom)
    code, _, err = _run(capsys, "demo", *TINY, "--out", str(tmp_path / "r"))
    assert code == 1 and "Traceback" not in err
    assert err.strip() == "gdl-plus demo: error: ZeroDivisionError: division by zero (run with --traceback for details)"
    with pytest.raises(RuntimeError, match="Failed to evaluate"):
        main(["--traceback", "demo", *TINY, "--out", str(tmp_path / "r2")])


# ------------------------------------------------------------------------------------------------ commands


def _check_demo_output(out: str, run: Path, epochs: int, reported: list[str]) -> None:
    rows = _table_rows(out, reported + ["mean"])
    assert set(rows) == set(reported + ["mean"]), out
    for name in reported:
        share, dice = rows[name][1], rows[name][2]
        assert share.endswith("%") and 0.0 <= float(share[:-1]) <= 100.0
        assert dice == "n/a" or 0.0 <= float(dice) <= 1.0
    assert f"Run folder: {run}" in out
    for name in ("per_class_dice.csv", "per_class_dice.png", "events.out.tfevents.*"):
        assert name in out  # each output is named where it is printed
    with open(run / "per_class_dice.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert len(history) == epochs and set(reported) <= set(history[0])
    assert (run / "per_class_dice.png").stat().st_size > 0
    assert list(run.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_demo_synthetic(capsys, tmp_path):
    run = tmp_path / "demo"
    code, out, err = _run(capsys, "demo", *TINY, "--epochs", "2", "--out", str(run))
    assert code == 0, err
    _check_demo_output(out, run, 2, REPORTED)
    lesion = _table_rows(out, ["lesion"])["lesion"]
    assert lesion[-2:] == ["<-", "rare"]
    assert 0.0 < float(lesion[1][:-1]) < 1.0  # the synthetic rare class is well under 1% of the voxels
    assert "epoch [1/2]" in err and "loss=" in err  # the progress bar (tqdm writes to stderr)
    assert out.count("val Dice") == 2  # one line per validation


@pytest.mark.slow
def test_demo_on_a_decathlon_folder(capsys, tmp_path):
    pytest.importorskip("nibabel")
    root = _write_decathlon(tmp_path / "Task", num_cases=2, size=16, num_classes=3)
    run = tmp_path / "demo"
    code, out, err = _run(capsys, "demo", *TINY, "--data", str(root), "--no-progress", "--out", str(run))
    assert code == 0, err
    assert "data Tiny (2 cases from" in out
    _check_demo_output(out, run, 1, ["c1", "c2"])


@pytest.mark.slow
def test_compare_two_variants(capsys, tmp_path):
    run = tmp_path / "cmp"
    code, out, err = _run(capsys, "compare", *TINY, "--variants", "dice,gdl-square", "--no-progress", "--out", str(run))
    assert code == 0, err
    rows = _table_rows(out, ["dice", "gdl-square"])
    assert set(rows) == {"dice", "gdl-square"}
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    assert header.split() == ["variant", *REPORTED, "mean", "time"]
    for cells in rows.values():
        assert len(cells) == len(REPORTED) + 3 and cells[-1].endswith("s")
    assert "Rare class 'lesion'" in out
    assert (run / "compare.png").stat().st_size > 0
    with open(run / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["dice", "gdl-square"]
    assert (run / "dice" / "per_class_dice.csv").is_file() and (run / "gdl-square" / "per_class_dice.csv").is_file()


def test_verdict_names_the_best_variant_for_the_rare_class():
    def result(variant, lesion):
        names = ["bg", "organ", "lesion"]
        r = RunResult(variant, Path("."), names, names[1:], "lesion", {"lesion": 0.003})
        r.history.append({"organ": 0.9, "lesion": lesion, "mean": (0.9 + lesion) / 2})
        return r

    text = cli._verdict([result("dice", 0.0), result("gdl-square", 0.4), result("dice+ce", 0.2)])
    assert "Rare class 'lesion' (0.30% of voxels): gdl-square helps it most (Dice 0.400" in text
    assert "next best dice+ce 0.200)." in text  # gdl-square also has the best mean here: no caveat
    organ_lost = result("gdl-square", 0.4)
    organ_lost.history[-1].update(organ=0.1, mean=0.25)
    text = cli._verdict([result("dice", 0.0), organ_lost, result("gdl-square+ce", 0.3)])
    assert "gdl-square helps it most (Dice 0.400; next best gdl-square+ce 0.300)" in text
    assert text.endswith("at a cost: mean Dice 0.250 vs 0.600 for gdl-square+ce.")
    assert "no variant segmented it" in cli._verdict([result("dice", 0.0), result("gdl-simple", float("nan"))])
    assert "tie" in cli._verdict([result("a", 0.5), result("b", 0.5)])


@pytest.mark.slow
def test_bench_tiny(capsys):
    code, out, err = _run(capsys, "bench", "--shape", "1,3,8,8,8", "--rounds", "1", "--warmup", "0", "--no-memory")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("loss") and "t/MONAI" in line)
    end = header.index("t/MONAI") + len("t/MONAI")  # right-aligned columns: the ratio ends where its header does
    ours = [line for line in out.splitlines() if line.startswith(("DicePlusLoss ", "GeneralizedDicePlusLoss "))]
    assert len(ours) == 4, out  # two losses under each allocator setting (default, thp)
    for line in ours:
        assert float(line[:end].split()[-1]) > 0  # a time ratio against MONAI's counterpart, measured in this run


# ------------------------------------------------------------------------------------------------ --nproc (torchrun)


def _cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai_gdl_plus ...`` in a fresh process (the launcher sets OMP_NUM_THREADS and starts ranks)."""
    return subprocess.run([sys.executable, "-m", "monai_gdl_plus", *argv], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_argv_drops_the_launch_options():
    argv = ["--traceback", "demo", "--nproc", "2", "--epochs", "3", "--nnodes=2", "--node-rank", "1",
            "--master-addr", "10.0.0.1", "--master-port=29400", "--out", "old", "--loss", "dice"]  # fmt: skip
    assert cli._worker_argv(argv, Path("runs/x")) == [
        "--traceback", "demo", "--epochs", "3", "--loss", "dice", "--_worker", "--out", "runs/x"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--master-port", "29400"],
         "`--node-rank` must be below `--nnodes` (2), got 2"),
        (["--nproc", "1", "--nnodes", "2"], "`--master-port` is needed with `--nnodes` > 1"),
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_launch_options(capsys, tmp_path, argv, match):
    code, _, err = _run(capsys, "demo", *TINY, *argv, "--out", str(tmp_path / "run"))
    assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _check_ranks_wrote_once(run: Path, epochs: int) -> None:
    """Rank 0 alone wrote the run folder: one CSV row per epoch, one pair of TensorBoard event files (training and
    validation writers; every rank writing would give one pair per rank)."""
    with open(run / "per_class_dice.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, epochs + 1))
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events.")) == [
        "model.pt", "per_class_dice.csv", "per_class_dice.png"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_on_two_processes(tmp_path):
    run = tmp_path / "demo"
    proc = _cli("demo", *TINY, "--num-samples", "8", "--epochs", "2", "--nproc", "2", "--no-progress",
                "--out", str(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2 epochs on 2 CPU processes (torchrun)" in out
    assert out.count("Per-class validation Dice after 2 epochs") == 1 and out.count("val Dice") == 2  # rank 0 only
    assert "skipping logging" not in out  # MONAI's ConfigWorkflow notice, once per rank unless quieted
    _check_demo_output(out, run, 2, REPORTED)
    _check_ranks_wrote_once(run, 2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compare_on_two_processes(tmp_path):
    """Two trainings in a row on the same two ranks: the process group outlives the first."""
    run = tmp_path / "cmp"
    proc = _cli("compare", *TINY, "--num-samples", "8", "--variants", "dice,gdl-square", "--nproc", "2",
                "--no-progress", "--out", str(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Final per-class validation Dice") == 1
    assert set(_table_rows(proc.stdout, ["dice", "gdl-square"])) == {"dice", "gdl-square"}
    with open(run / "compare.csv", newline="") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["dice", "gdl-square"]
    for variant in ("dice", "gdl-square"):
        _check_ranks_wrote_once(run / variant, 1)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_failing_rank_fails_the_launch_in_one_line_per_rank(tmp_path):
    """Three volumes give one for validation, fewer than the two ranks that share it out: every rank says why, the
    launcher says how many failed, and its exit status is the ranks' (2, bad input)."""
    proc = _cli("demo", *TINY, "--num-samples", "3", "--nproc", "2", "--no-progress", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.count("the dataset length is less than the number of participating ranks") == 2
    assert "gdl-plus demo: error: 2 of the processes failed (first: exit status 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # the failed launch removed the empty run folder it made


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_on_one_machine(tmp_path):
    """``--nnodes 2`` on localhost, one process per node: both nodes finish, node 0 holds the run folder."""
    port = str(_free_port())
    runs = [tmp_path / f"node{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "monai_gdl_plus", "demo", *TINY, "--num-samples", "8", "--epochs", "2",
             "--no-progress", "--nproc", "1", "--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1",
             "--master-port", port, "--out", str(runs[i])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "2 epochs on 1 CPU process on each of 2 nodes (torchrun)" in outputs[0][0]
    _check_demo_output(outputs[0][0], runs[0], 2, REPORTED)
    _check_ranks_wrote_once(runs[0], 2)
    assert "node 1 done" in outputs[1][0] and "Per-class" not in outputs[1][0]
    assert not runs[1].exists()
