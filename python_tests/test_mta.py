"""xma2_ops.mta: straight-through masks, budgets, shift levels, adapters on disk, cost report."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from xma2_ops import XbarConfig, XbarLinear, convert
from xma2_ops import mta
from xma2_ops.mta.masks import pe_extent
from xma2_ops.quant import expand_tiles

from mta_net import CFG, Net, make_model

@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(96, 1, 12, 12, generator=g)
    y = (x[:, 0, :6].mean((1, 2)) * 40).long() % 10  # learnable labels
    return x, y


def loader(data, bs=32):
    x, y = data
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


SCHED = mta.Schedule(stage1_epochs=2, stage2_epochs=2, lr_mask=5e-3, lr_scale=0.2)
ALL_SPECS = [mta.MethodSpec(m) for m in mta.METHODS] + [
    mta.MethodSpec("pe", budget=0.5, selection="sensitivity"),
    mta.MethodSpec("xma2", budget=0.5, selection="sensitivity", criterion="delta"),
    mta.MethodSpec("xma2", budget=0.5, task_bn=False)]


def trained(spec: mta.MethodSpec, data, seed=0) -> nn.Module:
    model = make_model()
    torch.manual_seed(seed)
    mta.prepare(model, spec, 10)
    mta.fit(model, loader(data), SCHED, progress=False)
    model.eval()
    return model


# ------------------------------------------------------------------ straight-through gradients
def test_binarize_forward_and_identity_gradient():
    s = torch.tensor([0.001, 0.005, 0.006, -1.0, 2.0], requires_grad=True)
    m = mta.binarize(s, 0.005)
    assert m.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    g = torch.arange(5.0)
    m.backward(g)
    assert torch.equal(s.grad, g)


@pytest.mark.parametrize("method,param", [("piggyback", "scores"), ("xbm", "col_param"), ("xma", "col_param"),
                                          ("xma2", "col_param"), ("pe", "pe_scores")])
def test_mask_gradients_reach_the_scores_through_the_quantised_forward(method, param, data):
    model = make_model()
    mta.prepare(model, mta.MethodSpec(method, budget=0.5), 10)
    ads = dict(mta.layer_adapters(model))
    for name, ad in ads.items():
        if method == "pe":  # search phase; task weights away from the backbone, else dL/dm = 0
            ad.phase = "search"
            with torch.no_grad():
                ad.task_weight.mul_(1.5)
        if method == "xma2" and ad.pe_sel.numel() > 1:
            ad.pe_sel[0, 0] = 1.0  # a re-programmed PE: its column scales get no gradient
    model.train()
    x, y = data
    loss = nn.functional.cross_entropy(model(x[:16]), y[:16])  # default (quantised) config
    loss.backward()
    for name, ad in ads.items():
        g = getattr(ad, param).grad
        assert g is not None and torch.isfinite(g).all(), name
        frozen = (ad.pe_sel == 0).repeat_interleave(32, 1)[:, :g.shape[1]] if method == "xma2" else None
        if frozen is not None:
            assert torch.all(g[~frozen] == 0) and g[frozen].abs().sum() > 0, name
        else:
            assert g.abs().sum() > 0, name


def test_pe_score_gradient_is_the_exact_mask_gradient():
    """STE: d loss / d pe_scores equals d loss / d pe_mask of the quantised op."""
    torch.manual_seed(0)
    lin = XbarLinear(40, 40, config=CFG)
    mta.prepare(nn.ModuleDict({"l": lin, "fc": nn.Linear(40, 2)}), mta.MethodSpec("pe"), 2, head="fc")
    ad = lin.adapter
    ad.phase = "search"
    with torch.no_grad():
        ad.task_weight.add_(0.05 * torch.randn_like(ad.task_weight))
    x = torch.rand(8, 40)
    lin(x).pow(2).sum().backward()
    m = (ad.pe_scores.detach() > mta.methods.SCORE_THRESHOLD).float().requires_grad_()
    lin.adapter = None
    from xma2_ops import xbar_linear
    y = xbar_linear(x, lin.weight, lin.bias, config=CFG, task_weight=ad.task_weight.detach(), pe_mask=m,
                    input_scale=float(lin.input_range) / 255)
    y.pow(2).sum().backward()
    assert torch.allclose(ad.pe_scores.grad, m.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ budgets and levels
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.1, 0.2, 0.33, 0.5, 1.0])
def test_topk_budget_is_exact(rho):
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(3, 2, generator=g), torch.rand(5, 1, generator=g), torch.rand(9, 2, generator=g)]
    total = sum(s.numel() for s in scores)
    masks = mta.topk_masks(scores, rho)
    assert sum(int(m.sum()) for m in masks) == math.floor(rho * total + 1e-9)
    flat_s = torch.cat([s.reshape(-1) for s in scores])
    flat_m = torch.cat([m.reshape(-1) for m in masks]).bool()
    if 0 < flat_m.sum() < total:
        assert flat_s[flat_m].min() >= flat_s[~flat_m].max()  # the best ones
    per = mta.topk_masks(scores, rho, per_layer=True)
    for s, m in zip(scores, per):
        assert int(m.sum()) == math.floor(rho * s.numel() + 1e-9)


@pytest.mark.parametrize("spec", [mta.MethodSpec("pe", budget=0.5), mta.MethodSpec("xma2", budget=0.25),
                                  mta.MethodSpec("xma2", budget=0.5, per_layer=True),
                                  mta.MethodSpec("pe", budget=0.75, selection="sensitivity")])
def test_fit_respects_the_budget_exactly(spec, data):
    model = trained(spec, data)
    sels = [ad.pe_sel for _, ad in mta.layer_adapters(model)]
    if spec.per_layer:
        assert [int(s.sum()) for s in sels] == [mta.budget_count(spec.budget, s.numel()) for s in sels]
    else:
        assert sum(int(s.sum()) for s in sels) == mta.budget_count(spec.budget, sum(s.numel() for s in sels))
    assert mta.report(model).total.reprogrammed_pes == sum(int(s.sum()) for s in sels)


def test_shift_levels_are_powers_of_two_or_zero():
    lv = mta.ShiftLevels()
    assert lv.levels == [-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0] and lv.bits == 4
    a = torch.randn(10000) * 3
    q = lv.quantize(a)
    nz = q[q != 0].abs()
    assert torch.equal(torch.exp2(torch.log2(nz).round()), nz)
    assert set(q.unique().tolist()) <= set(lv.levels)
    assert torch.equal(lv.decode(lv.encode(q)), q)
    assert float(lv.quantize(torch.tensor(0.12))) == 0.0 and float(lv.quantize(torch.tensor(0.13))) == 0.25
    a.requires_grad_()
    lv.ste(a).sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))


def test_trained_column_scales_are_levels(data):
    model = trained(mta.MethodSpec("xma"), data)
    lv = mta.ShiftLevels()
    for _, ad in mta.layer_adapters(model):
        assert set(ad.col_scale().unique().tolist()) <= set(lv.levels)


# ------------------------------------------------------------------ adapters on disk
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.label + s.selection + s.criterion)
def test_save_load_round_trip_is_bit_exact(spec, data, tmp_path):
    model = trained(spec, data)
    x = data[0][:32]
    with torch.no_grad():
        y = model(x)
    path = tmp_path / "task.safetensors"
    mta.save_task(model, path)
    fresh = make_model()  # same backbone weights, never adapted
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter" not in k and "fc." not in k
                           and not k.split(".")[0].startswith("b")}, strict=False)
    loaded = mta.load_task(fresh, path)
    assert loaded == spec
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    r1, r2 = mta.report(model).as_dict(), mta.report(fresh).as_dict()
    assert r1 == r2
    mta.save_task(fresh, tmp_path / "again.safetensors")
    assert mta.read_task(path)[0]["content_sha256"] == mta.read_task(tmp_path / "again.safetensors")[0]["content_sha256"]


def test_adapter_holds_only_the_reprogrammed_pes(data, tmp_path):
    model = trained(mta.MethodSpec("pe", budget=0.5), data)
    mta.save_task(model, tmp_path / "a.safetensors")
    meta, t = mta.read_task(tmp_path / "a.safetensors")
    for name, layer in mta.xbar_layers(model):
        used = pe_extent(layer.weight[0].numel(), layer.weight.shape[0], 32, 32).prod(-1)
        assert t[f"{name}.task_weight"].numel() == int((used * t[f"{name}.pe_mask"]).sum())
    assert not any(k.startswith("bn.") for k in t) or meta["spec"]["task_bn"]


def test_task_switching_restores_each_task_exactly(data, tmp_path):
    x = data[0]
    outs, paths = [], []
    model = make_model()
    for i, spec in enumerate([mta.MethodSpec("xma2", budget=0.5), mta.MethodSpec("piggyback"),
                              mta.MethodSpec("xma", task_bn=False)]):
        torch.manual_seed(i)
        mta.prepare(model, spec, 10)
        mta.fit(model, loader(data), SCHED, progress=False)
        model.eval()
        with torch.no_grad():
            outs.append(model(x))
        paths.append(tmp_path / f"t{i}.safetensors")
        mta.save_task(model, paths[-1])
    y = data[1]
    for i in [0, 2, 1, 0, 2]:
        mta.load_task(model, paths[i])
        with torch.no_grad():
            o = model(x)
        assert torch.equal(o, outs[i])
        assert (o.argmax(1) == y).float().mean() == (outs[i].argmax(1) == y).float().mean()


def test_load_refuses_other_architecture_config_backbone_and_corruption(data, tmp_path):
    model = trained(mta.MethodSpec("xma2", budget=0.5), data)
    path = tmp_path / "a.safetensors"
    mta.save_task(model, path)

    other_cfg = convert(Net(), XbarConfig(rows=64, cols=64), skip=lambda n, m: n == "fc")
    with pytest.raises(ValueError, match="crossbar config: layer c1 config"):
        mta.load_task(other_cfg, path)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.c2 = nn.Conv2d(8, 32, 3, 2, 1, bias=False)
    with pytest.raises(ValueError, match="another architecture.*weight_shape"):
        mta.load_task(convert(Wider(), CFG, skip=lambda n, m: n == "fc"), path)
    with pytest.raises(ValueError, match="different backbone"):
        mta.load_task(make_model(seed=5), path)

    raw = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    raw2 = bytearray(raw)
    raw2[-3] ^= 0x10  # inside the tensor data
    flipped.write_bytes(bytes(raw2))
    with pytest.raises(ValueError, match="corrupted"):
        mta.load_task(make_model(), flipped)
    for bad in (bytes(raw[:len(raw) // 2]), b"\x00" * 7, b"garbage" * 20, bytes(raw[:8]) + b"X" + bytes(raw[9:])):
        p = tmp_path / "bad.safetensors"
        p.write_bytes(bad)
        with pytest.raises(ValueError, match="corrupted|not a readable|checksum"):
            mta.load_task(make_model(), p)
    # a refused file leaves the model usable and a good file still loads
    mta.load_task(make_model(), path)


def test_refresh_bn_stats_is_the_plain_average_of_batch_statistics(data):
    model = make_model()
    mta.prepare(model, mta.MethodSpec("xma"), 10)
    batches = loader(data)[:2]
    feats = []
    model.c1.register_forward_hook(lambda m, i, o: feats.append(o.detach()))
    model.eval()
    mta.refresh_bn_stats(model, batches, batches=2)
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(model.b1.running_mean, mean, atol=1e-6)
    assert model.b1.momentum == 0.1 and not model.training


@pytest.mark.parametrize("hw_epochs", [0, 1, 2])
def test_adc_aware_stage_trains_through_the_quantised_forward(data, hw_epochs):
    """Schedule.hw_epochs: after the weight-only stage 2, that many epochs run in training mode
    through the layers' own (quantised, ADC) config with the same trainable set; the BN
    statistics are re-estimated with that forward; 0 keeps everything weight-only."""
    model = make_model()
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.5, selection="sensitivity"), 10)
    seen = []
    model.c2.register_forward_pre_hook(lambda m, a: seen.append((m.training, m.config.quantized,
                                                                 m.config.adc_bits is not None)))
    batches = loader(data)
    sched = mta.Schedule(stage2_epochs=1, hw_epochs=hw_epochs, bn_batches=2, sensitivity_batches=1)
    before = [p.detach().clone() for _, ad in mta.layer_adapters(model) for p in (ad.task_weight, ad.col_param)]
    mta.fit(model, batches, sched, progress=False)
    train_quant = [s for s in seen if s[0] and s[1]]
    assert len(train_quant) == hw_epochs * len(batches)
    assert all(s[2] for s in train_quant)  # with the ADC
    assert sum(1 for s in seen if s[0] and not s[1]) == len(batches)  # stage 2, weight-only
    # BN re-estimation: 2 batches in the forward that is evaluated (BN in training mode, layer in eval)
    n_cal = min(sched.calib_batches, len(batches))  # the final input calibration: weight-only passes
    evals = [s for s in seen if not s[0]]
    assert [s[1] for s in evals[-n_cal:]] == [False] * n_cal
    assert [s[1] for s in evals[-(2 + n_cal):-n_cal]] == [hw_epochs > 0] * 2
    after = [p.detach() for _, ad in mta.layer_adapters(model) for p in (ad.task_weight, ad.col_param)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert model.c2.config == CFG  # the layers' own config is back


def test_schedule_errors(data):
    with pytest.raises(ValueError, match="hw_epochs"):
        mta.Schedule(hw_epochs=-1)
    with pytest.raises(ValueError, match="hw_lr_factor"):
        mta.Schedule(hw_lr_factor=0.0)
    for criterion in ("snip", "snip_per_cell"):  # a probe of 0 batches scores every PE 0: refused
        model = make_model()
        mta.prepare(model, mta.MethodSpec("xma2", selection="sensitivity", criterion=criterion), 10)
        with pytest.raises(ValueError, match="sensitivity_batches: criterion .* needs >= 1 batch, got 0"):
            mta.fit(model, loader(data), mta.Schedule(sensitivity_batches=0), progress=False)


def test_spec_and_prepare_errors():
    with pytest.raises(ValueError, match="method"):
        mta.MethodSpec("lora")
    with pytest.raises(ValueError, match="budget"):
        mta.MethodSpec("pe", budget=1.5)
    with pytest.raises(ValueError, match="selection"):
        mta.MethodSpec("pe", selection="random")
    with pytest.raises(TypeError, match="head"):
        mta.prepare(make_model(), mta.MethodSpec("pe"), 10, head="c1")
    with pytest.raises(ValueError, match="no XbarConv2d"):
        mta.prepare(Net(), mta.MethodSpec("pe"), 10)
    with pytest.raises(RuntimeError, match="no task prepared"):
        mta.report(make_model())


# ------------------------------------------------------------------ cost report, hand counted
def _linear_task(method: str, budget: float = 0.5):
    """Linear 40 -> 40 on 32x32 PEs: a 2x2 PE grid with used blocks 32x32, 32x8, 8x32, 8x8."""
    torch.manual_seed(0)
    lin = XbarLinear(40, 40, bias=False, config=CFG)
    with torch.no_grad():  # integer weights with max 127: scale 1, codes = values
        lin.weight.copy_(torch.randint(-100, 100, (40, 40)).float())
        lin.weight[0, 0] = 127.0
        lin.weight[5, 3] = 5.0  # W[k=3, n=5] lives in PE (0, 0)
    model = nn.ModuleDict({"lin": lin, "fc": nn.Linear(40, 3)})
    mta.prepare(model, mta.MethodSpec(method, budget=budget), 3, head="fc")
    return model, lin, lin.adapter


def cells_diff(a: int, b: int, slices: int = 4) -> int:
    """Cells (2-bit slices of the + and - polarity) whose level differs between codes a and b."""
    lv = lambda v: [((max(v, 0) >> (2 * j)) & 3) for j in range(slices)] + \
        [((max(-v, 0) >> (2 * j)) & 3) for j in range(slices)]  # noqa: E731
    return sum(x != y for x, y in zip(lv(a), lv(b)))


def test_report_matches_hand_count_pe():
    model, lin, ad = _linear_task("pe")
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        ad.task_weight[5, 3] = 6.0  # 5 = slices (01, 01, 00), 6 = (10, 01, 00): one positive cell changes
        ad.task_weight[30, 1] = 50.0  # n=30, k=1: also PE (0, 0)
    r = mta.report(model)
    lc = r.layers[0]
    s = CFG.weight_slices
    assert s == 4 and lc.pes == 4 and lc.reprogrammed_pes == 2
    assert lc.cells_written == (32 * 32 + 8 * 8) * s * 2
    assert lc.cells_changed == cells_diff(5, 6) + cells_diff(int(lin.weight[30, 1]), 50) == 1 + cells_diff(
        int(lin.weight[30, 1]), 50)
    assert lc.energy_j == pytest.approx(lc.cells_written * 10e-12)
    assert lc.mask_bits == 4
    assert lc.adapter_bits == 4 + (32 * 32 + 8 * 8) * 8
    assert lc.piggyback_bits == 1600 and lc.finetune_bits == 1600 * 8
    assert r.pe_fraction == 0.5


def test_report_matches_hand_count_other_methods():
    model, lin, ad = _linear_task("xma2")
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    lc = mta.report(model).layers[0]
    assert lc.cells_changed == 0  # re-programmed with the same weights
    assert lc.mask_bits == 4 + 4 * (8 + 32)  # PE bits + 4-bit codes of the frozen PEs' used columns
    model, _, _ = _linear_task("xbm")
    lc = mta.report(model).layers[0]
    assert (lc.reprogrammed_pes, lc.cells_written, lc.mask_bits) == (0, 0, 2 * 40)
    model, _, _ = _linear_task("finetune")
    lc = mta.report(model).layers[0]
    assert (lc.reprogrammed_pes, lc.cells_written, lc.mask_bits) == (4, 1600 * 4 * 2, 1600 * 8)
    model, lin, ad = _linear_task("piggyback")
    with torch.no_grad():
        ad.scores[35, 2] = 0.0  # n=35 -> column tile 1, k=2 -> row tile 0: PE (0, 1) only
    model.eval()
    lc = mta.report(model).layers[0]
    assert (lc.reprogrammed_pes, lc.cells_written, lc.mask_bits) == (1, 32 * 8 * 4 * 2, 1600)
    w = int(lin.weight[35, 2])
    assert lc.cells_changed == cells_diff(w, 0)


def test_report_previous_task_and_endurance(tmp_path):
    model, lin, ad = _linear_task("pe")
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    mta.save_task(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        ad.pe_sel.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    mta.save_task(model, tmp_path / "b.safetensors")
    r = mta.report(model, tmp_path / "a.safetensors")  # A -> B: restore PE (0,0), write PE (1,1)
    assert r.total.cells_written == (32 * 32 + 8 * 8) * 8 and r.total.reprogrammed_pes == 1
    assert mta.report(model, mta.deployed_state(model)).total.cells_changed == 0
    w = mta.endurance(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "a.safetensors"])
    assert w["lin"].tolist() == [[3, 0], [0, 2]]
    assert w["lin"].sum() == 5


def test_energy_model_is_overridable():
    model, _, ad = _linear_task("finetune")
    r = mta.report(model, energy=mta.EnergyModel(write_energy_j=1.0))
    assert r.total.energy_j == r.total.cells_written


def test_expand_pe_layout():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = expand_tiles(m, 40, 40, 32, 32)
    assert e[:32, :32].all() and not e[:32, 32:].any() and e[32:, 32:].all()


# ------------------------------------------------------------------ bad MethodSpec / Schedule / prepare values
import dataclasses as _dc  # noqa: E402

SPEC_BAD = [
    ("method", None, TypeError), ("method", 1, TypeError), ("method", "lora", ValueError),
    ("budget", "0.1", TypeError), ("budget", True, TypeError), ("budget", None, TypeError),
    ("budget", math.nan, ValueError), ("budget", -0.1, ValueError), ("budget", 1.5, ValueError),
    ("budget", math.inf, ValueError),
    ("budget_unit", "rows", ValueError), ("budget_unit", None, TypeError),
    ("selection", 3, TypeError), ("selection", "random", ValueError),
    ("criterion", None, TypeError), ("criterion", "grad", ValueError),
    ("per_layer", "yes", TypeError), ("per_layer", 1, TypeError), ("per_layer", None, TypeError),
    ("task_bn", 2, TypeError), ("task_bn", "no", TypeError), ("task_bn", 0, TypeError),
    ("levels", (0, 1), TypeError), ("levels", [0, 1], TypeError), ("levels", None, TypeError),
    ("levels", mta.ShiftLevels(-127, 0), ValueError), ("levels", mta.ShiftLevels(0, 128), ValueError),
    ("levels", mta.ShiftLevels(-64, 64), ValueError),  # 129 exponents: int8 codes hold 127
]
_INT_FIELDS = ("stage1_epochs", "stage2_epochs", "hw_epochs", "sensitivity_batches", "probe_head_epochs", "calib_batches",
               "bn_batches")
_LR_FIELDS = ("hw_lr_factor", "lr_weight", "lr_reprogrammed", "lr_head", "lr_mask", "lr_scale")
SCHEDULE_BAD = ([(f, v, e) for f in _INT_FIELDS for v, e in ((1.5, TypeError), ("2", TypeError), (True, TypeError),
                                                             (None, TypeError), (-1, ValueError))]
                + [(f, v, e) for f in _LR_FIELDS for v, e in (("0.1", TypeError), (True, TypeError), (None, TypeError),
                                                              (-1.0, ValueError), (math.nan, ValueError),
                                                              (math.inf, ValueError))]
                + [("hw_lr_factor", 0.0, ValueError), ("optimizer", 1, TypeError), ("optimizer", "rmsprop", ValueError)])


def test_bad_value_cases_cover_every_field():
    assert {f.name for f in _dc.fields(mta.MethodSpec)} == {c[0] for c in SPEC_BAD}
    assert {f.name for f in _dc.fields(mta.Schedule)} == {c[0] for c in SCHEDULE_BAD}


@pytest.mark.parametrize("field,value,exc", SPEC_BAD, ids=lambda v: repr(v)[:20])
def test_method_spec_refuses_bad_values(field, value, exc):
    """A MethodSpec that load_task would refuse is refused when made (before: per_layer="yes",
    task_bn=2, levels=(0, 1) trained and saved an unloadable task)."""
    kwargs = {"method": "xma2", field: value}
    with pytest.raises(exc, match=rf"MethodSpec\.{field}\b.*expected.*got"):
        mta.MethodSpec(**kwargs)


@pytest.mark.parametrize("field,value,exc", SCHEDULE_BAD, ids=lambda v: repr(v)[:20])
def test_schedule_refuses_bad_values(field, value, exc):
    with pytest.raises(exc, match=rf"Schedule\.{field}\b.*expected.*got"):
        mta.Schedule(**{field: value})


PREPARE_BAD = [
    (dict(num_classes=0), ValueError, "num_classes"), (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(num_classes=1.5), TypeError, "num_classes"), (dict(num_classes=True), TypeError, "num_classes"),
    (dict(num_classes="10"), TypeError, "num_classes"),
    (dict(spec="xma2"), TypeError, "spec"), (dict(head=3), TypeError, "head"),
    (dict(head="nope"), ValueError, "head"), (dict(model="model"), TypeError, "model"),
]


@pytest.mark.parametrize("kwargs,exc,name", PREPARE_BAD, ids=lambda v: repr(v)[:30])
def test_prepare_refuses_bad_values_and_changes_nothing(kwargs, exc, name):
    """prepare(num_classes=0) saved a task that load_task refuses; every bad argument is refused
    (naming it) before the model is touched."""
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = dict(model=model, spec=mta.MethodSpec("xma2"), num_classes=10, head="fc")
    args.update(kwargs)
    with pytest.raises(exc, match=rf"\b{name}\b"):
        mta.prepare(args["model"], args["spec"], args["num_classes"], args["head"])
    assert not hasattr(model, "mta_task") and type(model.fc) is nn.Linear and model.fc.out_features == 10
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", [
    mta.MethodSpec("xma2", budget=0, per_layer=True, task_bn=False, levels=mta.ShiftLevels(-126, 0)),
    mta.MethodSpec("pe", budget=1, selection="sensitivity", criterion="delta"),
    mta.MethodSpec("xma", levels=mta.ShiftLevels(1, 127)),
    mta.MethodSpec("xma2", budget=0.25, levels=mta.ShiftLevels(-63, 63))], ids=lambda s: s.label)
def test_edge_specs_save_and_load(spec, tmp_path):
    """What the constructors accept at their edges is saved and loaded back."""
    model = make_model()
    mta.prepare(model, spec, 3)
    mta.save_task(model, tmp_path / "t.safetensors")
    other = make_model()
    assert mta.load_task(other, tmp_path / "t.safetensors") == spec
    assert mta.task_info(other).num_classes == 3


# ------------------------------------------------------------------ budgets in cells (MethodSpec.budget_unit)
def test_topk_masks_by_cost_is_a_greedy_budget():
    scores = [torch.tensor([[5.0, 1.0], [4.0, 4.0]]), torch.tensor([[3.0, 2.0]])]
    costs = [torch.tensor([[60, 10], [30, 30]]), torch.tensor([[20, 5]])]
    # total 155, rho 0.5 -> 77 cells: 5.0 (60) fits, 4.0 (30) no, 4.0 (30) no, 3.0 (20) no, 2.0 (5) yes, 1.0 (10) yes
    got = mta.topk_masks_by_cost(scores, costs, 0.5)
    assert [g.tolist() for g in got] == [[[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0]]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = [torch.rand(3, 4, generator=gen), torch.rand(2, 2, generator=gen)]
        c = [torch.randint(1, 50, (3, 4), generator=gen), torch.randint(1, 50, (2, 2), generator=gen)]
        rho = float(torch.rand((), generator=gen))
        m = mta.topk_masks_by_cost(s, c, rho)
        used = sum(int((mi * ci).sum()) for mi, ci in zip(m, c))
        assert used <= mta.budget_count(rho, sum(int(ci.sum()) for ci in c))
        # equal costs: the PE budget itself
        eq = mta.topk_masks_by_cost(s, [torch.full_like(ci, 7) for ci in c], rho)
        assert all(torch.equal(a, b) for a, b in zip(eq, mta.topk_masks(s, rho)))
        per = mta.topk_masks_by_cost(s, c, rho, per_layer=True)
        for mi, ci in zip(per, c):
            assert int((mi * ci).sum()) <= mta.budget_count(rho, int(ci.sum()))


def test_cell_budget_counts_the_cells_the_pes_use(data, tmp_path):
    from xma2_ops.mta.masks import pe_extent
    """MethodSpec(budget_unit="cells"): the re-programmed PEs hold at most rho of the layers' used cells
    (the cost report's count), the label says so, and the task file round-trips."""
    model = make_model()
    spec = mta.MethodSpec("xma2", budget=0.4, budget_unit="cells", selection="sensitivity")
    assert spec.label == "xma2@40%cells/snip"
    mta.prepare(model, spec, 10)
    mta.fit(model, loader(data), mta.Schedule(stage2_epochs=1, hw_epochs=0, sensitivity_batches=1, bn_batches=1),
            progress=False)
    rep = mta.report(model)
    total = sum(int((pe_extent(m.weight[0].numel(), m.weight.shape[0], 32, 32).prod(-1)).sum())
                * 2 * m.config.weight_slices for _, m in mta.xbar_layers(model))
    written = sum(lc.cells_written for lc in rep.layers)
    assert 0 < written <= mta.budget_count(0.4, total)
    mta.save_task(model, tmp_path / "t.safetensors")
    other = make_model()
    assert mta.load_task(other, tmp_path / "t.safetensors").budget_unit == "cells"


def test_snip_per_cell_ranks_pes_by_snip_per_written_cell(data):
    """criterion="snip_per_cell": a PE's snip score (sum of |dL/dW * W| at the backbone weights over the
    sensitivity batches) divided by the cells re-programming it writes, compared across layers as they
    are (no layer-mean normalisation), then the cell budget's greedy.  Expected mask computed here from
    the gradients, the PE blocks sliced by hand and the cells counted from the shapes."""
    from xma2_ops.mta.training import probe_dense
    spec = mta.MethodSpec("xma2", budget=0.5, budget_unit="cells", selection="sensitivity",
                          criterion="snip_per_cell")
    assert spec.label == "xma2@50%cells/snip_per_cell"
    batches = loader(data)[:2]
    model = make_model()
    torch.manual_seed(0)
    mta.prepare(model, spec, 10)
    probe = copy.deepcopy(model)
    mta.fit(model, loader(data), mta.Schedule(stage2_epochs=0, hw_epochs=0, sensitivity_batches=2, bn_batches=0),
            train_config=mta.weight_only, progress=False)

    probe_dense(probe)
    expected = _snip_per_cell_mask(probe, batches, 0.5)[0]
    c1, c2 = [m.adapter.pe_sel for _, m in mta.xbar_layers(model)]
    assert c1.flatten().tolist() + c2.flatten().tolist() == expected
    assert expected[0] == 1.0  # c1's small PE has the most snip per cell here; layer-mean "snip" gives it 1.0

    by_mean = make_model()
    torch.manual_seed(0)
    mta.prepare(by_mean, dataclasses.replace(spec, criterion="snip"), 10)
    mta.fit(by_mean, loader(data), mta.Schedule(stage2_epochs=0, hw_epochs=0, sensitivity_batches=2, bn_batches=0),
            train_config=mta.weight_only, progress=False)
    c1m, c2m = [m.adapter.pe_sel for _, m in mta.xbar_layers(by_mean)]
    assert c1m.flatten().tolist() + c2m.flatten().tolist() != expected  # the criterion changes the selection


CELLS = [9 * 8 * 2 * CFG.weight_slices] + [r * 16 * 2 * CFG.weight_slices for r in (32, 32, 8)]


def _pe_blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Per-PE sums of make_model's two layers' [N, K] tensors, sliced by hand: c1's one PE, then c2's
    three row tiles (K = 72 rows in tiles of 32, 32, 8; N = 16 columns, one column tile)."""
    g1, g2 = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
    return torch.stack([g1.sum()] + [g2[:, 32 * t:32 * (t + 1)].sum() for t in range(3)])


def _per_cell_greedy(sums: torch.Tensor, budget: float) -> tuple:
    """(mask, scores): the cell budget's greedy over ``sums`` per cell (cells counted from the shapes)."""
    left = int(budget * sum(CELLS))
    mask = [0.0] * 4
    for i in sorted(range(4), key=lambda i: -float(sums[i]) / CELLS[i]):
        if CELLS[i] <= left:
            mask[i], left = 1.0, left - CELLS[i]
    return mask, sums / torch.tensor(CELLS, dtype=sums.dtype)


def _snip_per_cell_mask(probe: nn.Module, batches, budget: float) -> tuple:
    """(mask, scores) of snip_per_cell on make_model from autograd gradients at the dense backbone weights."""
    ads = [m.adapter for _, m in mta.xbar_layers(probe)]
    snip = torch.zeros(4)
    probe.eval()
    with mta.use_config(probe, mta.weight_only):
        for x, y in batches:
            grads = torch.autograd.grad(nn.functional.cross_entropy(probe(x), y), [ad.task_weight for ad in ads])
            snip += _pe_blocks(*[(g * ad.task_weight).abs().detach() for g, ad in zip(grads, ads)])
    return _per_cell_greedy(snip, budget)


def test_delta_per_cell_ranks_pes_by_stage1_weight_change_per_cell(data, monkeypatch):
    """criterion="delta_per_cell": after the dense stage-1 epoch, a PE's sum of |W_t - W_b| divided by
    the cells it holds, then the cell budget's greedy; "delta" divides by the layer's mean instead.  The
    stage-1 weights are read where the selection is made; the scores and mask recomputed here."""
    from xma2_ops.mta import training
    spec = mta.MethodSpec("xma2", budget=0.5, budget_unit="cells", selection="sensitivity",
                          criterion="delta_per_cell")
    assert spec.label == "xma2@50%cells/delta_per_cell"
    seen = []
    select = training.select_pes

    def spy(m, scores):
        seen.append((scores, [(ad.task_weight - w.weight).abs().detach().clone()
                              for (_, ad), (_, w) in zip(training.layer_adapters(m), mta.xbar_layers(m))]))
        select(m, scores)

    monkeypatch.setattr(training, "select_pes", spy)
    sched = mta.Schedule(stage1_epochs=1, stage2_epochs=0, hw_epochs=0, bn_batches=0)
    masks = {}
    for criterion in ("delta_per_cell", "delta"):
        model = make_model()
        torch.manual_seed(0)
        mta.prepare(model, dataclasses.replace(spec, criterion=criterion), 10)
        mta.fit(model, loader(data), sched, train_config=mta.weight_only, progress=False)
        masks[criterion] = sum((m.adapter.pe_sel.flatten().tolist() for _, m in mta.xbar_layers(model)), [])
    (scores, change), (mean_scores, change_mean) = seen
    sums = _pe_blocks(*change)
    mask, expected = _per_cell_greedy(sums, 0.5)
    torch.testing.assert_close(torch.cat([s.flatten() for s in scores]), expected, rtol=1e-5, atol=0)
    assert masks["delta_per_cell"] == mask
    by_mean = _pe_blocks(*change_mean)  # "delta": c2's tiles over their layer's mean, c1's single PE is 1
    torch.testing.assert_close(torch.cat([s.flatten() for s in mean_scores]),
                               torch.cat([torch.ones(1), by_mean[1:] / by_mean[1:].mean()]), rtol=1e-5, atol=0)


def test_probe_head_epochs_fit_head_and_bn_on_the_backbone_before_the_snip_probe(data, monkeypatch):
    """Schedule.probe_head_epochs: Adam on the head and task BN only (lr_head, train mode, the backbone's
    weights in every PE), then the snip probe through that head.  Replayed here by hand with torch.optim.Adam;
    with 0 epochs the head stays the fresh one."""
    from xma2_ops.mta import training
    from xma2_ops.mta.training import probe_dense
    spec = mta.MethodSpec("xma2", budget=0.5, budget_unit="cells", selection="sensitivity",
                          criterion="snip_per_cell")
    sched = mta.Schedule(stage2_epochs=0, hw_epochs=0, sensitivity_batches=2, bn_batches=0, probe_head_epochs=1)
    model = make_model()
    torch.manual_seed(0)
    mta.prepare(model, spec, 10)
    fresh_head = copy.deepcopy(model.fc)
    probe = copy.deepcopy(model)
    seen = []
    select = training.select_pes
    monkeypatch.setattr(training, "select_pes", lambda m, scores: (seen.append(scores), select(m, scores)))
    mta.fit(model, loader(data), sched, train_config=mta.weight_only, progress=False)

    probe_dense(probe)
    trained_params = list(probe.fc.parameters()) + [p for _, m in mta.bn_layers(probe) for p in m.parameters()]
    for p in trained_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained_params, lr=sched.lr_head)
    probe.train()
    with mta.use_config(probe, mta.weight_only):
        for x, y in loader(data):
            opt.zero_grad()
            nn.functional.cross_entropy(probe(x), y).backward()
            opt.step()
    torch.testing.assert_close(model.fc.weight, probe.fc.weight)  # stage 2 has 0 epochs: the probe's head
    assert not torch.equal(model.fc.weight, fresh_head.weight)
    for (_, a), (_, b) in zip(mta.bn_layers(model), mta.bn_layers(probe)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
    for (_, m), (_, p) in zip(mta.xbar_layers(model), mta.xbar_layers(probe)):
        torch.testing.assert_close(m.weight, p.weight)  # the backbone is not trained by the warm-up
    for p in probe.fc.parameters():
        p.requires_grad_(False)
    mask, scores = _snip_per_cell_mask(probe, loader(data)[:2], 0.5)
    # per-cell scores are ~1e-6: relative only (the default atol would pass any of them)
    torch.testing.assert_close(torch.cat([s.flatten() for s in seen[0]]), scores, rtol=1e-5, atol=0)
    c1, c2 = [m.adapter.pe_sel for _, m in mta.xbar_layers(model)]
    assert c1.flatten().tolist() + c2.flatten().tolist() == mask

    cold = make_model()
    torch.manual_seed(0)
    mta.prepare(cold, spec, 10)
    mta.fit(cold, loader(data), dataclasses.replace(sched, probe_head_epochs=0), train_config=mta.weight_only,
            progress=False)
    torch.testing.assert_close(cold.fc.weight, fresh_head.weight)
