"""Data-parallel training under torchrun: the process group, rank helpers and the few collectives medtricks uses.

Every function here is the single-process answer (or does nothing) when there is no process group, so the
training loop and finetune read the same with one process or many.

torchrun (torch.distributed.run) starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT; `process_group()` joins them. One group serves both kinds of tensors ("cpu:gloo,cuda:nccl"):
NCCL for CUDA tensors (gradients, BN buffers), gloo for CPU tensors and for the pickled Python objects of
`on_main` and `gather_by_position`.

Who does what:
- rank 0 alone reads and writes the run directory and reports progress. `on_main(fn)` runs such a step there and
  hands its result, or its error, to every rank: a failure on rank 0 (an existing --out, a full disk) ends every
  rank with the same message instead of leaving the others waiting in the next collective.
- training: each rank trains on every world-th image of the epoch's global order (SeededSampler's num_replicas and
  rank); DistributedDataParallel averages the gradients, so a step sees the same global batch as one process does.
- evaluation: each rank predicts a disjoint shard of the images (`shard`, no padding) and `gather_by_position` puts
  all predictions back in dataset order, so the metrics are exactly those of one process.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from medtricks.errors import MedtricksError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """True on rank 0 and in a single process. Before or after the group exists, torchrun's RANK variable decides
    (the CLI asks both before finetune joins the group and after it has left it)."""
    return rank() == 0 if _active() else int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK): the CUDA device it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def process_group() -> Iterator[None]:
    """Join torchrun's process group for the duration of the block, then leave it.

    Does nothing in a single process (WORLD_SIZE unset or 1) and when the caller already set up a group (which is
    then used and left alone). With CUDA each process uses the device of its LOCAL_RANK.

    Raises:
        MedtricksError: more processes on this node than CUDA devices.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise MedtricksError(f"process {local_rank()} of this node has no CUDA device of its own: "
                                 f"{torch.cuda.device_count()} are visible. Start at most that many processes per "
                                 f"node (torchrun --nproc_per_node {torch.cuda.device_count()}).")
        torch.cuda.set_device(local_rank())
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_batch_size(batch_size: int) -> int:
    """Images per step on each process: `train.batch_size` is the global batch, split evenly over the processes.

    Raises:
        MedtricksError: the global batch does not divide by the number of processes.
    """
    world = world_size()
    if batch_size % world:
        lower, upper = batch_size // world * world, (batch_size // world + 1) * world
        raise MedtricksError(f"recipe key 'train.batch_size' = {batch_size} is the global batch and must divide by "
                             f"the number of processes ({world}); use {lower or upper} or {upper}, e.g. "
                             f"--set train.batch_size={upper}.")
    return batch_size // world


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and return its result on every rank; an error raised by `fn` is raised on every
    rank too (MedtricksError as itself, anything else as a RuntimeError naming it on the other ranks).
    The result must pickle (paths, dicts of tensors)."""
    if not _active():
        return fn()
    message = [None]
    if rank() == 0:
        try:
            message[0] = ("ok", fn())
        except MedtricksError as exc:
            message[0] = ("error", exc)
        except BaseException as exc:
            dist.broadcast_object_list([("crash", f"{type(exc).__name__}: {exc}")], src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind == "error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def shard(n: int) -> list[int]:
    """Dataset positions this rank evaluates: rank, rank + world, ... (disjoint, together every position once,
    no padding)."""
    return list(range(rank(), n, world_size()))


def gather_by_position(items: Sequence[T], positions: Sequence[int]) -> list[T]:
    """Every rank's `items` (one per dataset position of its shard), on every rank, in position order.

    Raises:
        RuntimeError: two ranks hold the same position (the shards were not disjoint).
    """
    pairs = list(zip(positions, items, strict=True))
    if _active():
        parts: list[list | None] = [None] * world_size()
        dist.all_gather_object(parts, pairs)
        pairs = [pair for part in parts for pair in part]
    pairs.sort(key=lambda pair: pair[0])
    if len({position for position, _ in pairs}) != len(pairs):
        raise RuntimeError("gather_by_position: the ranks' shards overlap; give each rank distributed.shard(n).")
    return [item for _, item in pairs]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (the tensor itself in a single process)."""
    if not _active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) into every rank's `module`, in place.

    DDP does so at the start of each training forward, so after a step every rank holds the statistics of its own
    local batch; call this before evaluating on shards so every rank predicts with the model rank 0 saves.
    """
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training forward/backward goes through: DistributedDataParallel around `model` (gradients
    averaged over ranks), or `model` itself in a single process. Keep using `model` for EMA, evaluation and
    checkpoints: its state dict has no `module.` prefix."""
    if not _active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers (timm's BatchNormAct2d included) -> synchronized ones, whose training statistics are over
    the global batch instead of each rank's share of it; `model` itself in a single process.

    Raises:
        MedtricksError: on CPU: torch's SyncBatchNorm only runs on GPUs (torch 2.14 raises for CPU inputs).
    """
    if not _active():
        return model
    if device.type != "cuda":
        raise MedtricksError("recipe key 'train.sync_bn' = true needs CUDA devices: torch's SyncBatchNorm does not "
                             "run on CPU. Set train.sync_bn=false (each process then normalizes over its own "
                             "batch_size / processes images).")
    from timm.layers import convert_sync_batchnorm as timm_convert  # also converts BatchNormAct2d (torch's drops act)

    return timm_convert(model)


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `python -m medtricks ARGS` as `nproc` processes on this machine under torchrun (its --standalone
    rendezvous on a free local port) and wait for them; what `torchrun --standalone --nproc_per_node N -m
    medtricks ARGS` does. Returns the exit code: 0, or the first failed process's (2 for bad input).

    Raises:
        MedtricksError: called inside a torchrun process already, or nproc < 1.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MedtricksError("--nproc starts torchrun itself; under torchrun, leave --nproc out (torchrun's "
                             "--nproc_per_node sets the number of processes).")
    if nproc < 1:
        raise MedtricksError(f"--nproc {nproc}: the number of processes must be >= 1.")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun sets OMP_NUM_THREADS=1 when unset; on CPU that leaves most cores idle: share them out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "medtricks", *args]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed: it printed nothing of its own, and torchrun's report is a stack of logs
            logger.error("process %d of %d (medtricks %s) was killed by %s (running out of memory is the usual "
                         "cause), so torchrun stopped the others. A fine-tuning run continues from its last saved "
                         "epoch with the same command and --resume.", rank, nproc, args[0] if args else "",
                         failure.signal_name())
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:  # torchrun's own handler caught Ctrl-C / SIGTERM and stopped the workers
        logger.error("stopped by %s", signal.Signals(exc.sigval).name)
        return 128 + int(exc.sigval)
    return 0
