"""Data parallel training: ``torchrun --nproc-per-node N -m multitune train ...`` (``train-multi``, ``reward``
and ``dpo`` alike; or ``accelerate launch``, which sets the same variables) runs one training over N processes,
on one machine or several (torchrun's ``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``); gloo on CPU, NCCL on
GPUs.

How a run is split, and why it is the single-process run:

- The global batch stays ``batch_size x grad_accum`` rows. Over W processes each micro-batch is ``batch_size / W``
  rows and an optimizer step accumulates ``grad_accum x W`` of them (the batch source cuts its seeded
  permutation into consecutive slices, so a step sees the same rows as in one process); process r computes the
  micro-batches r, r + W, ... of each step, and before the step the summed gradients (each micro-batch's loss
  already divided by the accumulation count) are all-reduced, so every process applies the same update to the
  same weights. The run is exactly the one-process run with ``--batch-size B/W --grad-accum A*W``, which is
  what its config.yaml records (``--resume`` then continues it in one process or in W), and equal to the
  ``--batch-size B`` run up to how a micro-batch's mean weighs its rows (equal sizes: the same mean).
- We all-reduce the gradients ourselves instead of wrapping the bank in DistributedDataParallel: the bank's
  forwards are its own methods (classify, lm_loss, the routed run), not ``model(...)``, which DDP's hooks need,
  and one flat all-reduce per step is all DDP would do here (adapters are small: no bucketing to overlap).
- Every process runs the same program on the same data (splits, evaluation, early stopping are deterministic,
  so each reaches the same decisions); only rank 0 writes into ``--output``: the others write into a scratch
  folder removed at the end and print nothing, so checkpoints, adapters, metrics and the progress bar are
  rank 0's alone. Evaluation is computed by every rank on the whole validation split (identical results: no
  reduction is needed, at the cost of repeating it).
- ``--resume``: ranks > 0 start from a copy of rank 0's folder, so every process resumes the same checkpoint
  (across machines the output folder must be on a filesystem every node reads).
- ``--dp-epsilon`` is refused: DP-SGD's per-sample clipping and noise would be drawn per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from multitune.errors import ConfigError

C = TypeVar("C")


def world_size() -> int:
    """Processes of the launch (``WORLD_SIZE`` as torchrun and accelerate set it; 1 when run alone)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def active() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_batches(train: Any, world: int) -> Any:
    """The train config of one of ``world`` processes: micro-batches ``batch_size / world``, accumulation x world."""
    if train.batch_size % world:
        raise ConfigError(
            f"--batch-size {train.batch_size} does not split over {world} processes; give a batch size divisible "
            f"by {world} (each process takes batch_size / {world} rows of every batch)"
        )
    if getattr(train, "dp_epsilon", None) is not None:
        raise ConfigError(
            "--dp-epsilon trains in one process: DP-SGD's clipping and noise are per batch, not per process; "
            "run it without torchrun"
        )
    return dataclasses.replace(
        train, batch_size=train.batch_size // world, grad_accum=train.grad_accum * world
    )


@contextlib.contextmanager
def launched(config: C, resume: bool = False) -> Iterator[tuple[C, bool]]:
    """Run the block as one process of a launch when ``WORLD_SIZE`` > 1 (else as it is).

    Yields ``(config, main)``: the config with the per-process batch and, on ranks > 0, a scratch ``output``;
    ``main`` is True on rank 0 (the process that writes and prints)."""
    world = world_size()
    if world == 1:
        yield config, True
        return
    import torch.distributed as dist

    train = getattr(config, "train")  # noqa: B009  (RunConfig and MultiRunConfig both carry one)
    split = dataclasses.replace(config, train=split_batches(train, world))  # type: ignore[type-var]
    backend = "nccl" if torch.cuda.is_available() and train.device in ("auto", "cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    me = dist.get_rank()
    scratch = None
    out = sys.stdout
    try:
        if me > 0:
            scratch = Path(tempfile.mkdtemp(prefix=f"multitune-rank{me}-"))
            target = scratch / "run"
            given = Path(getattr(config, "output"))  # noqa: B009
            dist.barrier()  # every process has started before any copies rank 0's folder
            if resume and given.is_dir():
                shutil.copytree(given, target, ignore=shutil.ignore_patterns(".*.lock"))
            split = dataclasses.replace(split, output=str(target))  # type: ignore[type-var]
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (closed below)
        else:
            dist.barrier()
        yield split, me == 0
        dist.barrier()  # no process leaves (and tears the group down) while another still reduces
    finally:
        if sys.stdout is not out:
            sys.stdout.close()
            sys.stdout = out
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_gradients(params: list[torch.nn.Parameter], stats: dict[str, float]) -> dict[str, float]:
    """Sum every parameter's gradient (zeros where a process had no micro-batch of the step) over the processes
    in one flat all-reduce, and their logged statistics (gathered: a process may have logged none); returns
    the summed statistics."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if grads:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)  # a few floats per process, never tensors or files
    total: dict[str, float] = {}
    for part in gathered:
        for name, value in (part or {}).items():
            total[name] = total.get(name, 0.0) + float(value)
    return total
