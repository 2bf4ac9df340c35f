"""Launch each multi-process mode N times and count the clean exits (issue: distributed runs end cleanly).

    python benchmarks/repeat_launch.py --mode bundle -n 100
    python benchmarks/repeat_launch.py --mode demo -n 30 --keep /tmp/failed-launches
    python benchmarks/repeat_launch.py --mode all -n 10

Modes (CPU processes, gloo, as on a machine without a GPU):
- ``bundle``: ``torchrun --nproc_per_node 2 -m monai.bundle run`` on ``train.yaml`` + ``multi_gpu_train.yaml``
  (3 epochs, 16^3 patches, 7 synthetic volumes: validation split 2 + 1 over the ranks);
- ``demo`` / ``compare``: ``gdl-plus demo|compare --nproc 2`` (tiny sizes);
- ``nodes``: two ``gdl-plus demo --nproc 1 --nnodes 2`` launchers on 127.0.0.1, one per node.

Prints ``K of N exited 0`` per mode, and for every other run its exit status(es) and the last lines of its
output. A run still going after ``--timeout`` seconds is killed (its whole process group) and counted as a hang.
With ``--keep DIR`` each failed run's folder (output, and a core file per aborted process: the core size limit
is raised to unlimited and each run has its own working directory) is moved there, for
``gdb -batch -ex 'thread apply all bt' python CORE``. Not run by CI: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "monai_gdl_plus" / "app" / "configs"
MODES = ("bundle", "demo", "compare", "nodes")
TINY = ["--num-samples", "8", "--size", "16", "--batch-size", "1", "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(mode: str, run: Path) -> list[list[str]]:
    """The command line(s) of one launch of ``mode``; several commands run at the same time (one per node)."""
    py = sys.executable
    if mode == "bundle":
        files = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']"
        return [[py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "-m", "monai.bundle", "run", "--config_file", files, "--epochs", "3", "--patch_size", "[16, 16, 16]",
                 "--synthetic#num_samples", "7", "--val_fraction", "0.45",
                 "--output_dir", str(run / "out")]]  # fmt: skip
    if mode == "demo":
        return [[py, "-m", "monai_gdl_plus", "demo", *TINY, "--epochs", "2", "--nproc", "2", "--out", str(run / "out")]]
    if mode == "compare":
        return [[py, "-m", "monai_gdl_plus", "compare", *TINY, "--epochs", "1", "--variants", "dice,gdl-square",
                 "--nproc", "2", "--out", str(run / "out")]]  # fmt: skip
    port = str(_free_port())
    return [[py, "-m", "monai_gdl_plus", "demo", *TINY, "--epochs", "2", "--nproc", "1", "--nnodes", "2",
             "--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", port, "--out", str(run / f"out{i}")]
            for i in range(2)]  # fmt: skip


def _unlimited_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def launch_once(mode: str, run: Path, timeout: float) -> tuple[list[int | None], str]:
    """Run one launch of ``mode`` in the folder ``run``; return the exit statuses (None: killed after ``timeout``)
    and the output of every command."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    commands = _commands(mode, run)
    logs = [open(run / f"log{i}.txt", "w+") for i in range(len(commands))]  # noqa: SIM115
    procs = [
        subprocess.Popen(cmd, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=_unlimited_cores)  # fmt: skip
        for cmd, log in zip(commands, logs, strict=True)
    ]
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and its ranks (one session each)
            p.wait()
            codes.append(None)
    text = ""
    for log in logs:
        log.seek(0)
        text += log.read()
        log.close()
    return codes, text


def repeat(mode: str, n: int, timeout: float, keep: Path | None) -> int:
    ok = 0
    started = time.monotonic()
    for i in range(n):
        run = Path(tempfile.mkdtemp(prefix=f"launch-{mode}-"))
        codes, text = launch_once(mode, run, timeout)
        if all(c == 0 for c in codes):
            ok += 1
            shutil.rmtree(run, ignore_errors=True)
            continue
        what = ", ".join("hang (killed)" if c is None else f"exit {c}" for c in codes)
        tail = [line for line in text.splitlines() if line.strip()][-6:]
        print(f"{mode} run {i + 1}: {what}", *(f"    {line}" for line in tail), sep="\n", flush=True)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            cores = sorted(p.name for p in run.rglob("core*"))
            shutil.move(str(run), str(keep / run.name))
            print(f"    kept in {keep / run.name}" + (f" (cores: {', '.join(cores)})" if cores else ""), flush=True)
        else:
            shutil.rmtree(run, ignore_errors=True)
    print(f"{mode}: {ok} of {n} exited 0 ({time.monotonic() - started:.0f} s)", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("-n", type=int, default=10, help="launches per mode (default 10)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds before a launch counts as a hang")
    p.add_argument("--keep", type=Path, help="move each failed run's folder (logs, core files) here")
    args = p.parse_args(argv)
    modes = MODES if args.mode == "all" else (args.mode,)
    results = {mode: repeat(mode, args.n, args.timeout, args.keep) for mode in modes}
    return 0 if all(k == args.n for k in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
