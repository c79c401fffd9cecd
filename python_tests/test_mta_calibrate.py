"""mta.calibrate_inputs under torch.distributed: input ranges reduced with MAX and signs with OR over
ranks, on the layer's device (NCCL refuses CPU tensors)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn as nn

from xma2_ops import XbarConv2d
from xma2_ops import mta

from mta_net import make_model

def rank_batches(rank: int):
    """Rank 0: non-negative inputs up to 3; rank 1: signed inputs up to 1 (so the ranges and the
    signs of the ranks differ)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.rand(16, 1, 12, 12, generator=g)
    x = x * 3 if rank == 0 else x * 2 - 1
    y = torch.zeros(16, dtype=torch.long)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def local_calibration(rank: int) -> dict:
    model = make_model()
    mta.calibrate_inputs(model, rank_batches(rank), batches=2)
    return {n: (float(m.input_range), bool(m.input_signed)) for n, m in mta.xbar_layers(model)}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = make_model()
        mta.calibrate_inputs(model, rank_batches(rank), batches=2)
        res = {n: (float(m.input_range), bool(m.input_signed), str(m.input_range.device))
               for n, m in mta.xbar_layers(model)}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_reduce_max_range_and_or_sign(tmp_path):
    local = [local_calibration(r) for r in range(2)]
    for n in local[0]:  # the ranks disagree, so the reduction is visible
        assert local[0][n][0] != local[1][n][0], n
    assert local[0]["c1"][1] is False and local[1]["c1"][1] is True
    tmp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for n, (rng, signed, dev) in ranks[0].items():
        assert rng == max(local[0][n][0], local[1][n][0]), n
        assert signed == (local[0][n][1] or local[1][n][1]), n
        assert dev == "cpu"
    assert ranks[0]["c1"][1] is True and ranks[0]["c2"][1] is False  # c2 follows a ReLU


def _fake_distributed(monkeypatch, check):
    """Pretend a process group is running; all_reduce calls ``check(tensor, op)`` and then
    combines with a second, simulated rank holding range 100 and no negative input."""
    calls = []

    def all_reduce(t, op=None, group=None, async_op=False):
        check(t, op)
        calls.append((t.device, op))
        if t.device.type != "meta":
            t.copy_(torch.maximum(t, torch.tensor([100.0, 0.0], device=t.device)))

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_reduction_runs_on_the_layer_device_meta(monkeypatch):
    """A layer on another device type than the CPU (the meta device stands in for CUDA here): the
    reduced tensor must live on the layer's device, never on the CPU."""
    # the crossbar op itself is not under test (and need not run on meta): a plain float conv
    # stands in for it; calibrate only observes the layers' inputs through forward pre-hooks
    monkeypatch.setattr(XbarConv2d, "forward", lambda self, x: nn.functional.conv2d(
        x, self.weight, None, self.stride, self.padding, self.dilation, self.groups))
    model = make_model().to("meta")
    devices = {id(m): m.weight.device for _, m in mta.xbar_layers(model)}
    assert all(d.type == "meta" for d in devices.values())

    def check(t, op):
        assert t.device.type == "meta", f"all_reduce got a {t.device} tensor for a layer on meta"
        assert op == dist.ReduceOp.MAX

    calls = _fake_distributed(monkeypatch, check)
    x = torch.empty(8, 1, 12, 12, device="meta")
    mta.calibrate_inputs(model, [(x, torch.zeros(8, dtype=torch.long, device="meta"))], batches=1)
    assert len(calls) == 2
    for _, m in mta.xbar_layers(model):
        assert m.input_range.device.type == "meta"


def test_reduced_values_are_used_cpu(monkeypatch):
    model = make_model()
    calls = _fake_distributed(monkeypatch, lambda t, op: None)
    mta.calibrate_inputs(model, rank_batches(1), batches=2)
    assert [d.type for d, _ in calls] == ["cpu", "cpu"]
    for n, m in mta.xbar_layers(model):
        assert float(m.input_range) == 100.0, n
    assert bool(model.c1.input_signed) and not bool(model.c2.input_signed)


def test_calibrate_without_batches_keeps_zero_ranges():
    model = make_model()
    mta.calibrate_inputs(model, [], batches=2)
    assert all(float(m.input_range) == 0.0 for _, m in mta.xbar_layers(model))


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
