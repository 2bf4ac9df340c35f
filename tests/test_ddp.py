"""PerClassDice under ignite.distributed: two gloo processes, each with its shard, equal one process seeing all.

The worker lives at module level so the spawned interpreters can unpickle it; it imports nothing beyond the
metric, torch and ignite.
"""

from __future__ import annotations

import json
import math
import socket

import ignite.distributed as idist
import pytest
import torch
from ignite.exceptions import NotComputableError

from monai_gdl_plus.metrics import PerClassDice

NUM_CLASSES = 4
AGGREGATIONS = ("global", "per_image")
WORLD_SIZE = 2


def make_batches():
    """Five batches of different sizes (an uneven split: 3 for rank 0, 2 for rank 1); class 3 is never present."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for size in (2, 1, 3, 2, 1):
        labels = torch.randint(0, NUM_CLASSES - 1, (size, 1, 6, 5, 4), generator=g)
        logits = torch.randn(size, NUM_CLASSES, 6, 5, 4, generator=g)
        logits[:, NUM_CLASSES - 1] = -50.0
        logits.scatter_add_(1, labels, torch.full(labels.shape, 1.5))  # mostly right
        batches.append((logits, labels))
    return batches


def compute_all(batches, aggregation):
    metric = PerClassDice(NUM_CLASSES, include_background=True, aggregation=aggregation)
    for b in batches:
        metric.update(b)
    return metric.compute()


def _worker(local_rank, out_dir):
    rank, world = idist.get_rank(), idist.get_world_size()
    batches = make_batches()
    result = {"world_size": world, "backend": idist.backend()}
    for aggregation in AGGREGATIONS:
        result[aggregation] = compute_all(batches[rank::world], aggregation)
    # only rank 0 sees data: every rank still gets the full result
    only_first = PerClassDice(NUM_CLASSES, include_background=True)
    if rank == 0:
        for b in batches:
            only_first.update(b)
    result["rank0_only"] = only_first.compute()
    # nobody sees data: every rank raises, none hangs
    try:
        PerClassDice(NUM_CLASSES).compute()
        result["empty"] = "computed"
    except NotComputableError:
        result["empty"] = "not computable"
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=0, abs=1e-12), k


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_processes_equal_one_process(tmp_path, monkeypatch):
    # CPU workers: with CUDA visible, ignite's gloo backend calls cuda.set_device(local_rank), which fails on a
    # machine with fewer GPUs than processes
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with idist.Parallel(backend="gloo", nproc_per_node=WORLD_SIZE, master_port=_free_port()) as parallel:
        parallel.run(_worker, str(tmp_path))

    batches = make_batches()
    expected = {aggregation: compute_all(batches, aggregation) for aggregation in AGGREGATIONS}
    assert math.isnan(expected["global"]["dice/3"])  # the absent class stays NaN after the reduction too
    for rank in range(WORLD_SIZE):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["world_size"] == WORLD_SIZE and got["backend"] == "gloo"
        for aggregation in AGGREGATIONS:
            _same(got[aggregation], expected[aggregation])
        _same(got["rank0_only"], expected["global"])
        assert got["empty"] == "not computable"
    # a shard alone gives a different answer, so the equality above needs the all_reduce
    shard = compute_all(batches[0::WORLD_SIZE], "global")
    assert any(abs(shard[k] - expected["global"][k]) > 1e-6 for k in shard if not math.isnan(shard[k]))
