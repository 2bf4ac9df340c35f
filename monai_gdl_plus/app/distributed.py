"""The end of a ``torch.distributed`` run: the process group's backend destroyed while the interpreter is alive.

``destroy_process_group`` only unregisters a group: its backend (for gloo, the worker threads that run the
collectives) lives on while anything references it, and ``DistributedDataParallel`` does, through its
``process_group`` attribute, its C++ reducer and its logger. A bundle keeps its DDP network referenced (by the
config parser, the engines, the checkpoint handler) until the interpreter exits, so gloo's worker threads were still
running during ``Py_Finalize``. A worker thread releases each collective's work right after completing it; when that
release comes after the main thread has begun finalising, and the work holds a tensor whose Python object the C++
side owns, the release must take the GIL. A thread that asks for the GIL during finalisation is made to exit
(``pthread_exit``); its forced unwind meets a ``noexcept`` destructor (``ProcessGroupGloo::AsyncWork``) and
``std::terminate`` aborts the process: "terminate called without an active exception", SIGABRT, exit -6, after a
run that trained correctly (gdb: the aborting thread is ``c10d::ProcessGroupGloo::runLoop`` in
``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` -> ``take_gil`` -> ``PyThread_exit_thread``, while the
main thread is in ``Py_FinalizeEx``). Upstream: pytorch/pytorch#190489 (the abort when a process exits with a live
gloo group) and the abandoned pytorch/pytorch#179291 (destroying groups in an ``atexit`` handler, which would not
help while DDP holds the group).

So a run ends with :func:`end_process_group`: it drops the DDP wrappers' references, collects, and destroys the default
group, so the backend's destructor runs now; gloo's waits for queued work and joins its threads.
"""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["end_process_group", "release_process_group"]

# what a DistributedDataParallel wrapper keeps of its process group (the reducer and the logger hold it in C++)
_DDP_REFERENCES = ("reducer", "logger", "process_group")


def release_process_group(module: Any) -> None:
    """Make a ``DistributedDataParallel`` wrapper let go of its process group (its ``process_group``, reducer and
    logger); the wrapper cannot run another step afterwards, its ``module`` is untouched. Anything else (a plain
    network, None) is left alone."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        for name in _DDP_REFERENCES:
            if name in module.__dict__:
                delattr(module, name)


def end_process_group(*modules: Any) -> None:
    """End this process's part in a distributed run: release the DDP wrappers given (:func:`release_process_group`),
    collect, and destroy the default process group if there is one, so that no backend thread outlives this call.

    Call it last, on every rank; in a bundle's ``finalize``:
    ``$monai_gdl_plus.app.distributed.end_process_group(@network)``.
    Another reference to the group kept elsewhere (a ``SyncBatchNorm``'s ``process_group``, a comm hook's state)
    must be dropped by its owner as well.
    """
    import torch.distributed as dist

    for module in modules:
        release_process_group(module)
    # the reducer and the logger can sit in reference cycles: collect them while the registry still holds the group,
    # so that the group's last reference goes in destroy_process_group, whose release of it does not hold the GIL
    # (a worker thread may need the GIL to finish its last work while the backend's destructor joins it)
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
