"""Where the experiment runs: torch.distributed (DDP over gloo), forked one-thread workers, data loaders,
a state hash."""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterable, Iterator, Tuple, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

def setup_distributed() -> Tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()

J = TypeVar("J")
R = TypeVar("R")

_FORKED: dict = {}  # run_forked's job function, inherited by its forked workers (never pickled)


def _forked_call(job):
    return _FORKED["fn"](job)


def run_forked(fn: Callable[[J], R], jobs: Iterable[J], workers: int) -> Iterator[R]:
    """``fn(job)`` for every job, yielded in job order, with one torch thread per process: in ``workers``
    forked processes, or in this process when ``workers <= 1``.  ``fn`` and what it reads are
    inherited at the fork, so models and data are not pickled; only jobs and results are.  The jobs
    are many small int64 evaluations: whole jobs in parallel scale better than threads inside one.
    The caller's thread count is restored at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _FORKED["fn"] = fn
    try:
        if workers > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(workers) as pool:
                yield from pool.imap(_forked_call, jobs, chunksize=1)
        else:
            yield from map(fn, jobs)
    finally:
        _FORKED.clear()
        torch.set_num_threads(threads)


def make_loader(data, batch: int, seed: int, shuffle: bool = True) -> DataLoader:
    ds = TensorDataset(*data)
    if is_dist():
        return DataLoader(ds, batch_size=batch, sampler=DistributedSampler(ds, shuffle=shuffle, seed=seed))
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g)

def ddp_wrap(model: nn.Module) -> nn.Module:
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)

def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
