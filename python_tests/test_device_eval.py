"""The example's device evaluation split into jobs (xma2_ops.mta.experiment.evaluate): chip_jobs'
schedule, chip_batches' read numbers (a chip's test batches evaluated in parts read exactly what a
whole pass reads), and the read noise a layer's backbone and task cells share."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import xma2_ops
from xma2_ops import DeviceModel, mta
from xma2_ops.mta.experiment.evaluate import chip_batches, chip_jobs

from test_deploy import backbone, inputs, on_chip


def test_chip_jobs_cover_every_chip_mode_and_batch_once_longest_first():
    modes = ["naive", "calibrated", "chip-aware"]
    for chips, workers, batches in [(5, 2, 10), (5, 1, 10), (4, 2, 10), (3, 4, 2), (7, 3, 5), (1, 2, 1)]:
        jobs = chip_jobs(modes, chips, batches, workers)
        for c in range(chips):  # every (chip, mode) covers batches [0, batches) exactly once
            for m in modes:
                got = sorted((s, e) for cc, mm, s, e in jobs if (cc, mm) == (c, m))
                assert got[0][0] == 0 and got[-1][1] == batches, (chips, workers, c, m, got)
                assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(got, got[1:] + [(batches, None)])), got
        order = ["chip-aware", "calibrated", "naive"]  # the long jobs first, the parts last
        assert [order.index(m) for _, m, _, _ in jobs] == sorted(order.index(m) for _, m, _, _ in jobs)
        split = {c for c, m, s, e in jobs if m == "naive" and (s, e) != (0, batches)}
        want = set(range(chips - chips % workers, chips)) if workers > 1 and batches > 1 else set()
        assert split == want, (chips, workers, split)
        for c in split:  # one part per worker (fewer when there are fewer batches)
            assert sum(1 for cc, m, _, _ in jobs if (cc, m) == (c, "naive")) == min(workers, batches)
    assert chip_jobs(["naive"], 2, 3, 1) == [(0, "naive", 0, 3), (1, "naive", 0, 3)]


def _outputs(model: nn.Module, x: torch.Tensor, batch: int, parts) -> list:
    """The model's logits per test batch, the batches evaluated in ``parts`` ((start, stop) ranges),
    each part on the chip programmed anew (as a forked worker does)."""
    outs = []
    hook = model.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    y = torch.zeros(len(x), dtype=torch.int64)
    try:
        for start, stop in parts:
            xma2_ops.program(model, 3)
            correct, images = chip_batches(model, (x, y), batch, start, stop)
            assert images == min(len(x), stop * batch) - start * batch
    finally:
        hook.remove()
    return outs


def test_chip_batches_in_parts_read_what_a_whole_pass_reads():
    x = inputs(80)
    model = on_chip(backbone(x), DeviceModel.preset("typical"))
    whole = _outputs(model, x, 16, [(0, 5)])
    assert all(m.chip.reads == 5 for _, m in mta.xbar_layers(model))
    for parts in ([(0, 2), (2, 5)], [(3, 5), (0, 1), (1, 3)], [(4, 5), (0, 4)]):
        got = _outputs(model, x, 16, parts)
        order = [b for s, e in parts for b in range(s, e)]
        for b, out in zip(order, got):
            assert torch.equal(out, whole[b]), (parts, b)
    # read noise matters here: the same batch with another read number gives other logits
    xma2_ops.program(model, 3)
    for m in (m for _, m in mta.xbar_layers(model)):
        m.chip.reads += 1
    with torch.no_grad():
        assert not torch.equal(model(x[:16]), whole[0])


def test_chip_batches_refuses_a_layer_read_twice_per_forward():
    x = inputs(64)
    model = on_chip(backbone(x), DeviceModel.preset("typical"))

    class Twice(nn.Module):  # c1 runs twice per forward: its reads are not one per batch
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            self.inner.c1(t)
            return self.inner(t)

    wrapped = Twice(model)
    xma2_ops.program(wrapped, 3)
    y = torch.zeros(len(x), dtype=torch.int64)
    assert chip_batches(wrapped, (x, y), 16, 0, 2)[1] == 32  # (from batch 0: no read number is assumed)
    with pytest.raises(RuntimeError, match=r"c1: read its cells 4 times in 2 forwards"):
        chip_batches(wrapped, (x, y), 16, 2, 4)


def test_task_cells_share_the_backbone_cells_read_noise():
    """A layer's task cells draw from the backbone cells' read stream (same device seed and layer):
    the forward draws that noise once for both; each state's read is what it reads alone."""
    x = inputs(32)
    model = backbone(x)
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.5), 10)
    model = on_chip(model, DeviceModel.preset("typical"))
    layer = model.c2
    with torch.no_grad():
        model(x)
    b, t = layer.programmed.cells, layer.programmed_task.cells
    assert b.shares_reads(t) and t.shares_reads(b)
    noise = b.read_noise(7)
    assert torch.equal(t.read(7, noise), t.read(7)) and torch.equal(b.read(7, noise), b.read(7))
    assert not torch.equal(b.read_noise(8), noise)
    other = dataclasses.replace(t, device=dataclasses.replace(t.device, seed=t.device.seed + 1))
    assert not b.shares_reads(other)
    assert dataclasses.replace(b, device=dataclasses.replace(b.device, sigma_read=0.0)).read_noise(7) is None


def _device_args():
    from xma2_ops.mta.experiment import cli
    return cli.parse_args(["--quick", "--device", "typical", "--device-chips", "2", "--device-workers", "1",
                           "--eval-batch", "16", "--batch", "16", "--deploy", "naive", "calibrated"])


def _device_result():
    """evaluate_device of the small backbone (--quick: the first 50 of 80 images, 4 test batches; random labels) on 2 chips."""
    from xma2_ops.mta.experiment.evaluate import evaluate_device
    x = inputs(80)
    y = torch.randint(0, 10, (80,), generator=torch.Generator().manual_seed(1))
    return evaluate_device(backbone(x), (x, y), _device_args(), False, "", (x, y))


def _rank_worker(rank: int, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = _device_result()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"accs": res.accs, "ideal": res.ideal, "n_test": res.n_test}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_share_every_chip_and_give_the_single_process_result(tmp_path):
    """Under torchrun each rank evaluates consecutive test batches of every (chip, mode) with the read
    numbers of a whole pass, and the counts are summed: the one-process result, not one per rank count."""
    import json

    import torch.multiprocessing as tmp
    from test_mta_calibrate import _free_port
    one = _device_result()
    assert len(set(one.accs["naive"] + one.accs["calibrated"])) > 1  # (chips and modes differ: a real check)
    tmp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert one.n_test == 50 and ranks[0] == ranks[1] == {"accs": one.accs, "ideal": one.ideal, "n_test": 50}


def test_naive_evaluation_skips_the_calibration_bn_pass(monkeypatch):
    """The ideal-cell BN statistics over the training images (mta.deploy's bn_base) serve the calibrated
    and chip-aware modes only: a naive-only evaluation does not compute them (it was ~3 s of serial work
    per adapter of the example, before the workers fork), and gives the same accuracies as with them."""
    from xma2_ops.mta.experiment import evaluate
    calls = []
    real = evaluate.ideal_bn_stats
    monkeypatch.setattr(evaluate, "ideal_bn_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = inputs(80)
    y = torch.randint(0, 10, (80,), generator=torch.Generator().manual_seed(1))
    args = _device_args()
    args.deploy = ["naive"]
    naive = evaluate.evaluate_device(backbone(x), (x, y), args, False, "", (x, y))
    assert calls == []
    args.deploy = ["naive", "calibrated"]
    both = evaluate.evaluate_device(backbone(x), (x, y), args, False, "", (x, y))
    assert calls == [1] and both.accs["naive"] == naive.accs["naive"]
