"""One class per method (xma2_ops.mta.methods): each class gives the adapter exactly the parameters,
forward, trainable set, mask memory and file tensors that the former ``if method == ...`` ladders
gave (written out here per method)."""
from __future__ import annotations

import pytest
import torch

from mta_net import make_model
from xma2_ops import mta
from xma2_ops.mta.methods import METHOD_CLASSES, SCORE_INIT, Method

# per method: adapter parameters in registration order, with their initial value (w: the backbone weight)
PARAMS = {"finetune": ["task_weight"], "classifier": [], "piggyback": ["scores"], "xbm": ["col_param"],
          "xma": ["col_param"], "pe": ["task_weight", "pe_scores"], "xma2": ["task_weight", "pe_scores", "col_param"]}
FINAL_LR = {"finetune": ["lr_weight"], "classifier": [], "piggyback": ["lr_mask"], "xbm": ["lr_mask"],
            "xma": ["lr_scale"], "pe": ["lr_reprogrammed"], "xma2": ["lr_reprogrammed", "lr_scale"]}
FILE_KEYS = {"finetune": ["pe_mask", "task_weight"], "classifier": [], "piggyback": ["weight_mask"], "xbm": ["col_code"],
             "xma": ["col_code"], "pe": ["pe_mask", "task_weight"], "xma2": ["pe_mask", "task_weight", "col_code"]}


def test_registry_covers_every_method_once():
    assert tuple(METHOD_CLASSES) == mta.METHODS
    assert all(issubclass(c, Method) and c.name == m for m, c in METHOD_CLASSES.items())
    assert tuple(m for m in mta.METHODS if mta.MethodSpec(m).impl.selects_pes) == mta.TIER1
    assert [m for m in mta.METHODS if mta.MethodSpec(m).impl.initial_phase == "dense"] == ["finetune"]


@pytest.mark.parametrize("method", mta.METHODS)
def test_prepare_installs_the_methods_parameters(method):
    model = make_model()
    torch.manual_seed(0)
    mta.prepare(model, mta.MethodSpec(method), 5)
    for name, layer in mta.xbar_layers(model):
        ad = layer.adapter
        assert [n for n, _ in ad.named_parameters()] == PARAMS[method]
        tr, tc = layer.tiles
        n = layer.weight.shape[0]
        w = layer.weight.detach()
        for pname, p in ad.named_parameters():
            want = {"task_weight": w, "pe_scores": torch.full((tr, tc), SCORE_INIT),
                    "scores": torch.full_like(w, SCORE_INIT),
                    "col_param": torch.full((tr, n), SCORE_INIT) if method == "xbm" else torch.ones(tr, n)}[pname]
            assert torch.equal(p.detach(), want), (method, pname)
        assert ad.phase == ("dense" if method == "finetune" else "final")
        assert torch.equal(ad.pe_sel, torch.zeros(tr, tc))


@pytest.mark.parametrize("method", mta.METHODS)
def test_forward_final_params_mask_bits_and_file_keys(method):
    model = make_model()
    spec = mta.MethodSpec(method)
    mta.prepare(model, spec, 5)
    sched = mta.Schedule(lr_weight=1.0, lr_head=2.0, lr_mask=3.0, lr_scale=4.0, lr_reprogrammed=5.0)
    impl = spec.impl
    for _, layer in mta.xbar_layers(model):
        ad = layer.adapter
        ad.eval()
        w_t, pm, cs = ad(layer)
        assert (w_t is None) == (method in ("classifier", "xbm", "xma"))
        assert (cs is None) == (method not in ("xbm", "xma", "xma2"))
        if method == "finetune":
            assert torch.equal(w_t, ad.task_weight) and torch.equal(pm, torch.ones_like(ad.pe_sel))
        if method in ("pe", "xma2"):  # nothing selected yet: the backbone everywhere
            assert torch.equal(w_t, layer.weight) and torch.equal(pm, ad.pe_sel)
        if method == "piggyback":  # every score above the threshold: no weight masked, no PE changed
            assert torch.equal(w_t, layer.weight) and not pm.any()
        if cs is not None:
            assert torch.equal(cs, torch.ones_like(cs))
        got = [(id(p), lr) for p, lr in impl.final_params(ad, sched)]
        assert got == [(id(getattr(ad, n)), getattr(sched, lr)) for n, lr in zip(
            [n for n in PARAMS[method] if n != "pe_scores"], FINAL_LR[method])]
        assert list(impl.file_tensors(ad, spec)) == FILE_KEYS[method]
    pes, frozen, weights, wb = 6, 40, 1000, 8
    want = {"finetune": weights * wb, "classifier": 0, "piggyback": weights, "xbm": frozen,
            "xma": frozen * spec.levels.bits, "pe": pes, "xma2": pes + frozen * spec.levels.bits}[method]
    assert impl.mask_bits(pes, frozen, weights, wb, spec) == want
    assert impl.adapter_bits(want, 100, wb) == want + (100 * wb if method in mta.TIER1 else 0)


def test_labels():
    S = mta.MethodSpec
    assert [S(m).label for m in mta.METHODS] == ["finetune", "classifier", "piggyback", "xbm", "xma", "pe@10%/learned",
                                                 "xma2@10%/learned"]
    assert S("xma2", budget=0.05, selection="sensitivity").label == "xma2@5%/snip"
    assert S("pe", budget=0.2, selection="sensitivity", criterion="delta", per_layer=True).label == "pe@20%/delta/layer"
    assert S("xma2", budget_unit="cells").label == "xma2@10%cells/learned"
    assert S("xma", task_bn=False).label == "xma/sharedBN"
    assert S.from_dict(S("xma2", budget=0.3).as_dict()) == S("xma2", budget=0.3)


def test_old_names_still_work():
    assert mta.calibrate is mta.calibrate_inputs and mta.recalibrate_bn is mta.refresh_bn_stats
    assert mta.adapters is mta.layer_adapters
    import xma2_ops.mta.taskfile as taskfile
    assert taskfile.save_task is mta.save_task


def test_each_tier1_selection_trains_a_stage1_or_probes_never_both():
    """MethodSpec.stage1 / .probes: the two branches of fit's tier-1 selection (and of the run-time estimate)."""
    from xma2_ops.mta.methods import CRITERIA, DENSE_CRITERIA, METHODS, SELECTIONS, TIER1
    for method in METHODS:
        for selection in SELECTIONS:
            for criterion in CRITERIA:
                spec = mta.MethodSpec(method, budget=0.1, selection=selection,
                                      criterion=criterion)
                if method not in TIER1:
                    assert not spec.stage1 and not spec.probes, spec
                    continue
                want_stage1 = selection == "learned" or criterion in DENSE_CRITERIA
                assert (spec.stage1, spec.probes) == (want_stage1, not want_stage1), spec
