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


# --------------------------------------------------------------------------------------------------------------------
# sync_batch: the losses' batch terms summed over processes
# --------------------------------------------------------------------------------------------------------------------

SYNC_CASES = {
    "dice softmax": ("DicePlusLoss", dict(to_onehot_y=True, softmax=True)),
    "dice+ce ignore 255, squared": ("DiceCEPlusLoss", dict(to_onehot_y=True, softmax=True, ignore_index=255,
                                                           squared_pred=True, weight=[0.5, 1.0, 2.0, 1.5])),
    "gdl simple + ce, in-range ignore": ("GeneralizedDicePlusLoss", dict(
        to_onehot_y=True, softmax=True, w_type="simple", lambda_ce=0.5, ignore_index=2)),
    "dice sigmoid bce": ("DicePlusLoss", dict(to_onehot_y=True, sigmoid=True, lambda_ce=1.0, ignore_index=255)),
    "dice focal ignore 255": ("DiceFocalPlusLoss", dict(to_onehot_y=True, softmax=True, ignore_index=255)),
    "gdl focal sum": ("GeneralizedDiceFocalPlusLoss", dict(to_onehot_y=True, softmax=True, reduction="sum")),
    "tversky onehot": ("TverskyPlusLoss", dict(softmax=True, alpha=0.3, beta=0.7)),
    "wasserstein GDL ignore 255": ("GeneralizedWassersteinDicePlusLoss", dict(
        dist_matrix=[[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.6, 0.5], [1.0, 0.6, 0.0, 0.7], [1.0, 0.5, 0.7, 0.0]],
        weighting_mode="GDL", ignore_index=255)),
}  # fmt: skip
SYNC_BATCH = 4  # global batch; each of the two processes holds half
# also run compiled (inductor, CPU): the one-hot-free custom ops and the collective in one graph
SYNC_COMPILED = ("dice+ce ignore 255, squared",)


def sync_inputs():
    """Global logits and targets; ignored voxels (255) hidden in different numbers on each process's half."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SYNC_BATCH, NUM_CLASSES, 6, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (SYNC_BATCH, 1, 6, 5, 4), generator=g)
    labels[0, :, :3] = 255  # rank 0: many ignored voxels
    labels[3, :, 0, 0] = 255  # rank 1: a few
    return x, labels


def _sync_target(labels, kwargs):
    labels = labels if kwargs.get("ignore_index") == 255 else labels.masked_fill(labels == 255, 1)
    if kwargs.get("to_onehot_y") or "dist_matrix" in kwargs:  # the Wasserstein loss takes label maps only
        return labels
    return torch.nn.functional.one_hot(labels[:, 0].clamp_max(NUM_CLASSES - 1), NUM_CLASSES).movedim(-1, 1).double()


def _sync_loss(name, sync):
    import monai_gdl_plus

    cls, kwargs = SYNC_CASES[name]
    return getattr(monai_gdl_plus, cls)(batch=True, sync_batch=sync, **kwargs)


def _sync_model():
    torch.manual_seed(5)
    return torch.nn.Conv3d(NUM_CLASSES, NUM_CLASSES, 3, padding=1).double()


def _sync_worker(local_rank, out_dir):
    rank, world = idist.get_rank(), idist.get_world_size()
    x, labels = sync_inputs()
    share = slice(rank * SYNC_BATCH // world, (rank + 1) * SYNC_BATCH // world)
    results = {}
    for name, (_, kwargs) in SYNC_CASES.items():
        y = _sync_target(labels, kwargs)[share]
        xi = x[share].clone().requires_grad_(True)
        value = _sync_loss(name, True)(xi, y)
        value.backward()
        # a network under DDP (gradients averaged over processes), as users train
        model = torch.nn.parallel.DistributedDataParallel(_sync_model())
        model_value = _sync_loss(name, True)(model(x[share]), y)
        model_value.backward()
        grads = [p.grad for p in model.parameters()]
        results[name] = {"value": value.detach(), "x_grad": xi.grad, "model_value": model_value.detach(),
                         "param_grads": grads}  # fmt: skip
        if name in SYNC_COMPILED:
            xc = x[share].clone().requires_grad_(True)
            compiled = torch.compile(_sync_loss(name, True), backend="inductor")(xc, y)
            compiled.backward()
            results[name].update(compiled_value=compiled.detach(), compiled_x_grad=xc.grad)
    torch.save(results, f"{out_dir}/sync_rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sync_batch_equals_one_process_on_the_global_batch(tmp_path, monkeypatch):
    """Two gloo processes, each with half of the batch and ``sync_batch=True``: the value equals one process on the
    whole batch; each process's input gradient is the world size times its slice of one process's gradient (the
    collective's backward adds every process's identical gradient), so that after DDP's averaging a network's
    parameter gradients equal one process's. The same under ``torch.compile`` for :data:`SYNC_COMPILED`."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with idist.Parallel(backend="gloo", nproc_per_node=WORLD_SIZE, master_port=_free_port()) as parallel:
        parallel.run(_sync_worker, str(tmp_path))
    x, labels = sync_inputs()
    got = [torch.load(tmp_path / f"sync_rank{r}.pt") for r in range(WORLD_SIZE)]
    worst = {}
    for name, (_, kwargs) in SYNC_CASES.items():
        y = _sync_target(labels, kwargs)
        xi = x.clone().requires_grad_(True)
        expected = _sync_loss(name, False)(xi, y)
        expected.backward()
        model = _sync_model()
        model_expected = _sync_loss(name, False)(model(x), y)
        model_expected.backward()
        for r, res in enumerate(got):
            share = slice(r * SYNC_BATCH // WORLD_SIZE, (r + 1) * SYNC_BATCH // WORLD_SIZE)
            torch.testing.assert_close(res[name]["value"], expected.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(res[name]["x_grad"], WORLD_SIZE * xi.grad[share], rtol=1e-8, atol=1e-12)
            if name in SYNC_COMPILED:
                torch.testing.assert_close(res[name]["compiled_value"], expected.detach(), rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(res[name]["compiled_x_grad"], WORLD_SIZE * xi.grad[share], rtol=1e-8,
                                           atol=1e-12)  # fmt: skip
            torch.testing.assert_close(res[name]["model_value"], model_expected.detach(), rtol=1e-10, atol=1e-12)
            for mine, ref in zip(res[name]["param_grads"], (p.grad for p in model.parameters()), strict=False):
                torch.testing.assert_close(mine, ref, rtol=1e-8, atol=1e-12)
            worst[name] = max(worst.get(name, 0.0), float((res[name]["value"] - expected).abs()),
                              float((res[name]["x_grad"] / WORLD_SIZE - xi.grad[share]).abs().max()))  # fmt: skip
    print("\nsync_batch vs one process (max |value or grad diff|):", worst)
    # each half alone is a different loss: the equality above needs the collective
    alone = _sync_loss("dice softmax", False)(x[:2], _sync_target(labels, {"to_onehot_y": True})[:2])
    assert abs(float(alone) - float(got[0]["dice softmax"]["value"])) > 1e-3


def test_sync_batch_without_a_process_group_is_the_batch_loss():
    from monai_gdl_plus import DicePlusLoss

    x, labels = sync_inputs()
    synced = DicePlusLoss(to_onehot_y=True, softmax=True, batch=True, sync_batch=True, ignore_index=255)(x, labels)
    plain = DicePlusLoss(to_onehot_y=True, softmax=True, batch=True, ignore_index=255)(x, labels)
    assert torch.equal(synced, plain)
    with pytest.raises(ValueError, match=r"`sync_batch=True` .* needs `batch=True`, got batch=False"):
        DicePlusLoss(sync_batch=True)
