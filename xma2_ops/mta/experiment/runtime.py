"""Where the experiment runs: torch.distributed (DDP over gloo), data loaders, a state hash."""
from __future__ import annotations

import hashlib
import os
from typing import Tuple

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
