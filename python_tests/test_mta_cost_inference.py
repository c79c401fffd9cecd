"""mta.report(..., example_input=x): per-inference operation counts, energy and latency.

Two independent references: (1) without tier-2 gating every partial sum is one ADC conversion,
and calibrate_adc's histogram counts every partial sum the op produces for an input, through its
own unfolding and slicing code; (2) a PE-by-PE, column-by-column count written out here for the
gated case (scale-0 columns need no conversion, an all-zero PE is not activated)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from xma2_ops import XbarConfig, calibration, convert
from xma2_ops import mta

CFG = XbarConfig(rows=16, cols=8)


class Net(nn.Module):
    """conv K=18, N=12 (2x2 PEs of 16x8), its output passes a signed digital op into a linear
    layer (signed inputs: two polarities), then a digital head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 12, 3, 2, 1, bias=False)
        self.lin = nn.Linear(12 * 3 * 3, 20, bias=False)
        self.fc = nn.Linear(20, 5)

    def forward(self, x):
        y = self.conv(x) - 0.1  # signed input of lin
        return self.fc(self.lin(y.flatten(1)))


def make(seed: int = 0, cfg: XbarConfig = CFG) -> nn.Module:
    torch.manual_seed(seed)
    m = convert(Net(), cfg, skip=lambda n, _: n == "fc")
    x = torch.rand(4, 2, 6, 6)
    m.eval()
    m(x)  # calibrates the input ranges (and lin's sign)
    return m, x


def test_ungated_adc_conversions_equal_the_partial_sums_the_op_produces():
    model, x = make()
    mta.prepare(model, mta.MethodSpec("classifier"), 5)
    rep = mta.report(model, example_input=x[:1])
    assert rep.per_inference
    for lc, (name, layer) in zip(rep.layers, mta.xbar_layers(model)):
        inp = {}
        h = layer.register_forward_pre_hook(lambda mod, a: inp.setdefault("x", a[0]))
        with torch.no_grad():
            model(x[:1])
        h.remove()
        _, counts = calibration._histogram(layer, inp["x"])  # (distinct partial sums, their counts)
        # every (position, input polarity, chunk, row tile, column, slice, weight polarity)
        assert lc.adc_conversions == int(counts.sum()), name
        assert lc.shift_adds == lc.adc_conversions  # no tier-2 scales
    assert bool(mta.xbar_layers(model)[1][1].input_signed)  # lin really ran two input polarities


def _expected(layer, positions: int, pm: torch.Tensor, alpha: torch.Tensor, energy: mta.EnergyModel) -> dict:
    cfg = layer.config
    k, n = layer.weight[0].numel(), layer.weight.shape[0]
    signed = bool(layer.input_signed)
    bits = cfg.input_bits - 1 if signed else cfg.input_bits
    cycles = positions * (2 if signed else 1) * math.ceil(bits / cfg.dac_bits)
    s = math.ceil((cfg.weight_bits - 1) / cfg.cell_bits)
    out = dict(adc=0, dac=0, cells=0, scale_ops=0, latency=0.0)
    tr, tc = math.ceil(k / cfg.rows), math.ceil(n / cfg.cols)
    for r in range(tr):
        rows = min(cfg.rows, k - r * cfg.rows)
        for c in range(tc):
            cols = range(c * cfg.cols, min(n, (c + 1) * cfg.cols))
            conv = [j for j in cols if pm[r, c] == 1 or alpha[r, j] != 0]
            if not conv:
                continue  # the PE is never activated
            out["adc"] += cycles * len(conv) * s * 2
            out["dac"] += cycles * rows
            out["cells"] += cycles * rows * len(cols) * s * 2
            if pm[r, c] != 1:
                out["scale_ops"] += positions * sum(1 for j in conv if alpha[r, j] != 1)
            out["latency"] = cycles * energy.read_cycle_s
    bits_adc = cfg.adc_bits
    out["energy"] = (out["adc"] * energy.adc_energy_j * 2.0 ** (bits_adc - 8) + out["dac"] * energy.dac_energy_j
                     + out["cells"] * energy.cell_read_energy_j
                     + (out["adc"] + out["scale_ops"]) * energy.shift_add_energy_j)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gated_columns_and_pes_are_counted_pe_by_pe(seed):
    model, x = make(seed)
    mta.prepare(model, mta.MethodSpec("xma2", budget=0.25), 5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, ad in mta.layer_adapters(model):
            ad.pe_sel.copy_((torch.rand(ad.pe_sel.shape, generator=g) < 0.3).to(ad.pe_sel.dtype))
            # shift-level parameters: 0 (scale 0), 1, 0.5, -2
            choice = torch.randint(0, 4, ad.col_param.shape, generator=g)
            ad.col_param.copy_(torch.tensor([0.0, 1.0, 0.5, -2.0])[choice])
        # one frozen PE of conv with every column at scale 0: never activated
        conv_ad = mta.xbar_layers(model)[0][1].adapter
        conv_ad.pe_sel[1, 0] = 0
        conv_ad.col_param[1, :8] = 0
    energy = mta.EnergyModel(adc_energy_j=3e-12, dac_energy_j=5e-13, cell_read_energy_j=2e-15,
                             shift_add_energy_j=7e-14, read_cycle_s=50e-9)
    rep = mta.report(model, energy=energy, example_input=x[:1])
    positions = {"conv": 9, "lin": 1}  # 6x6 input, stride 2: 3x3 outputs
    for lc, (name, layer) in zip(rep.layers, mta.xbar_layers(model)):
        ad = layer.adapter
        e = _expected(layer, positions[name], ad.pe_sel, ad.col_scale().detach(), energy)
        assert (lc.adc_conversions, lc.dac_conversions, lc.cell_reads, lc.shift_adds) == (
            e["adc"], e["dac"], e["cells"], e["adc"] + e["scale_ops"]), name
        assert lc.inference_energy_j == pytest.approx(e["energy"], rel=1e-12)
        assert lc.latency_s == pytest.approx(e["latency"], rel=1e-12)
    t = rep.total
    assert t.adc_conversions == sum(lc.adc_conversions for lc in rep.layers)
    assert "adc_conversions" in rep.table() and rep.as_dict()["per_inference"] is True


def test_zero_columns_save_conversions_and_energy():
    model, x = make()
    mta.prepare(model, mta.MethodSpec("xma"), 5)
    full = mta.report(model, example_input=x[:1]).total
    with torch.no_grad():
        for _, ad in mta.layer_adapters(model):
            ad.col_param[:, ::2] = 0  # half of the columns off
    half = mta.report(model, example_input=x[:1]).total
    assert half.adc_conversions * 2 == full.adc_conversions
    assert half.inference_energy_j < full.inference_energy_j
    assert half.cell_reads == full.cell_reads  # driven rows still conduct in every column


def test_adc_resolution_scales_the_conversion_energy():
    e = mta.EnergyModel()
    assert e.adc_conversion_j(XbarConfig()) == pytest.approx(16e-3 / 8 / 1.28e9)
    assert e.adc_conversion_j(XbarConfig(adc_bits=6)) == pytest.approx(e.adc_energy_j / 4)
    # an ideal ADC counts as the lossless resolution: ceil(log2(Pmax + 1)) bits, Pmax = 384 -> 9
    ideal = dataclasses.replace(XbarConfig(), adc_bits=None)
    assert e.adc_conversion_j(ideal) == pytest.approx(e.adc_energy_j * 2)


def test_report_without_example_has_no_inference_columns_and_bad_inputs_are_refused():
    model, x = make()
    mta.prepare(model, mta.MethodSpec("classifier"), 5)
    rep = mta.report(model)
    assert not rep.per_inference and rep.total.adc_conversions == 0 and "adc_conversions" not in rep.table()
    with pytest.raises(ValueError, match="example_input"):
        mta.report(model, example_input=torch.zeros(2))
    with pytest.raises(ValueError, match="example_input"):
        mta.report(model, example_input=[x])
    with pytest.raises(ValueError, match="write_energy_j"):
        mta.EnergyModel(write_energy_j=-1.0)
    with pytest.raises(ValueError, match="read_cycle_s"):
        mta.EnergyModel(read_cycle_s=float("nan"))
    with mta.use_config(model, mta.weight_only), pytest.raises(ValueError, match="quantised"):
        mta.report(model, example_input=x[:1])


@pytest.mark.parametrize("fields, adc_factor, pass_factor", [
    (dict(input_accumulation="analog"), None, 1),  # one conversion per pass instead of per chunk
    (dict(sensing="differential"), 2, 1),  # one conversion per column pair
    (dict(signed_inputs="sign_magnitude"), None, None),  # one pass for signed inputs
])
def test_conversions_follow_the_periphery(fields, adc_factor, pass_factor):
    """SPEC 8 in the cost model, counted per layer from the layer's own input sign and chunks."""
    base, x = make()
    other, _ = make(cfg=dataclasses.replace(CFG, **fields))
    for model in (base, other):
        mta.prepare(model, mta.MethodSpec("classifier"), 5)
    rb = mta.report(base, example_input=x[:1])
    ro = mta.report(other, example_input=x[:1])
    for lb, lo, (name, layer) in zip(rb.layers, ro.layers, mta.xbar_layers(other)):
        signed = bool(layer.input_signed)
        chunks = CFG.input_chunks(signed)
        passes = 2 if signed else 1
        if "input_accumulation" in fields:
            assert lb.adc_conversions == lo.adc_conversions * chunks, name
            assert lb.dac_conversions == lo.dac_conversions, name  # every chunk is still driven
        elif "sensing" in fields:
            assert lb.adc_conversions == lo.adc_conversions * adc_factor, name
            assert lb.cell_reads == lo.cell_reads, name
        else:
            assert lb.adc_conversions == lo.adc_conversions * passes, name
            assert lb.dac_conversions == lo.dac_conversions * passes, name
        assert lo.inference_energy_j <= lb.inference_energy_j
    assert any(layer.input_signed for _, layer in mta.xbar_layers(other))  # the sign_magnitude case is exercised
