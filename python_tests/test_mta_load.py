"""mta.load_task: every field of an adapter file is validated before the model is touched, a
refused file leaves the model exactly as it was, and the checksum covers the metadata.

The corrupted files are rewritten from a valid one with a recomputed, valid checksum, so the
content checks (not the checksum) must catch them."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save as st_save

from xma2_ops import XbarLinear
from xma2_ops import mta
from xma2_ops.mta.taskfile import content_hash

from mta_net import CFG, make_model

def make_task(model: nn.Module, spec: mta.MethodSpec, seed: int) -> None:
    """A task with non-trivial content in every field, without training (fast, reproducible)."""
    g = torch.Generator().manual_seed(seed)
    mta.prepare(model, spec, 10)
    with torch.no_grad():
        for i, (_, layer) in enumerate(mta.xbar_layers(model)):
            layer.input_range.fill_(1.0 + i + seed / 10)
            layer.input_signed.fill_(i % 2 == 0)
        for _, ad in mta.layer_adapters(model):
            if hasattr(ad, "task_weight"):
                ad.task_weight.add_(0.05 * torch.randn(ad.task_weight.shape, generator=g))
            if spec.method in mta.TIER1:
                ad.pe_sel.copy_((torch.rand(ad.pe_sel.shape, generator=g) < 0.5).float())
                ad.pe_sel.view(-1)[0] = 1.0
            if spec.method == "piggyback":
                ad.scores.copy_(torch.where(torch.rand(ad.scores.shape, generator=g) < 0.2, 0.0, 0.01))
            if spec.method == "xbm":
                ad.col_param.copy_(torch.where(torch.rand(ad.col_param.shape, generator=g) < 0.3, 0.0, 0.01))
            if spec.method in ("xma", "xma2"):
                ad.col_param.copy_(torch.randn(ad.col_param.shape, generator=g))
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=g))
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=g))
        for _, bn in mta.bn_layers(model):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(seed + 3)
    model.eval()


def rewrite(path, meta: dict, tensors: dict) -> None:
    """Write ``meta``/``tensors`` as an adapter file with a valid checksum for that content."""
    meta = dict(meta)
    meta["content_sha256"] = content_hash(meta, tensors)
    path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"xma2_mta": json.dumps(meta)}))


def snapshot(model: nn.Module):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = copy.deepcopy(model.mta_task)
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x)
    return sd, info, x, y


def assert_unchanged(model: nn.Module, snap) -> None:
    sd, info, x, y = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k in sd:
        assert now[k].dtype == sd[k].dtype and torch.equal(now[k], sd[k]), k
    assert model.mta_task == info
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), y)


def _set(t: dict, key: str, value) -> dict:
    t = dict(t)
    if value is None:
        del t[key]
    else:
        t[key] = value
    return t


# Each case: (base method, description, how to corrupt (meta, tensors) -> (meta, tensors), expected exception,
# a regex the message must match: the field's name).
CASES = [
    ("xma2", "head.bias broadcast from [1]", lambda m, t: (m, _set(t, "head.bias", torch.ones(1))),
     ValueError, r"head\.bias.*shape"),
    ("xma2", "head.weight integer", lambda m, t: (m, _set(t, "head.weight", t["head.weight"].round().to(torch.int32))),
     TypeError, r"head\.weight.*dtype"),
    ("xma2", "head.weight NaN", lambda m, t: (m, _set(t, "head.weight", t["head.weight"].clone().fill_(math.nan))),
     ValueError, r"head\.weight.*finite"),
    ("xma2", "head.weight missing", lambda m, t: (m, _set(t, "head.weight", None)), ValueError, r"head\.weight.*missing"),
    ("xma2", "negative input_range", lambda m, t: (m, _set(t, "c1.input_range", torch.tensor([-1.0]))),
     ValueError, r"c1\.input_range"),
    ("xma2", "NaN input_range", lambda m, t: (m, _set(t, "c2.input_range", torch.tensor([math.nan]))),
     ValueError, r"c2\.input_range"),
    ("xma2", "inf input_range", lambda m, t: (m, _set(t, "c2.input_range", torch.tensor([math.inf]))),
     ValueError, r"c2\.input_range"),
    ("xma2", "float64 input_range", lambda m, t: (m, _set(t, "c2.input_range", torch.tensor([1.0], dtype=torch.float64))),
     TypeError, r"c2\.input_range.*dtype"),
    ("xma2", "input_signed=7", lambda m, t: (m, _set(t, "c1.input_signed", torch.tensor([7], dtype=torch.uint8))),
     ValueError, r"c1\.input_signed"),
    ("xma2", "input_range shape", lambda m, t: (m, _set(t, "c1.input_range", torch.ones(2))),
     ValueError, r"c1\.input_range.*shape"),
    ("xma2", "col_code broadcast [1, N]", lambda m, t: (m, _set(t, "c2.col_code", t["c2.col_code"][:1].clone())),
     ValueError, r"c2\.col_code.*shape"),
    ("xma2", "col_code flat [N]", lambda m, t: (m, _set(t, "c1.col_code", t["c1.col_code"].reshape(-1).clone())),
     ValueError, r"c1\.col_code.*shape"),
    ("xma2", "col_code out of range", lambda m, t: (m, _set(t, "c1.col_code", torch.full_like(t["c1.col_code"], 9))),
     ValueError, r"c1\.col_code"),
    ("xma2", "col_code uint8", lambda m, t: (m, _set(t, "c1.col_code", t["c1.col_code"].abs().to(torch.uint8))),
     TypeError, r"c1\.col_code.*dtype"),
    ("xma2", "pe_mask value 2", lambda m, t: (m, _set(t, "c1.pe_mask", torch.full_like(t["c1.pe_mask"], 2))),
     ValueError, r"c1\.pe_mask"),
    ("xma2", "pe_mask missing", lambda m, t: (m, _set(t, "c2.pe_mask", None)), ValueError, r"c2\.pe_mask.*missing"),
    ("xma2", "task_weight too short", lambda m, t: (m, _set(t, "c2.task_weight", t["c2.task_weight"][:-1].clone())),
     ValueError, r"c2\.task_weight"),
    ("xma2", "task_weight integer", lambda m, t: (m, _set(t, "c1.task_weight", t["c1.task_weight"].to(torch.int64))),
     TypeError, r"c1\.task_weight.*dtype"),
    ("xma2", "task_weight inf", lambda m, t: (m, _set(t, "c1.task_weight", t["c1.task_weight"].clone().fill_(math.inf))),
     ValueError, r"c1\.task_weight.*finite"),
    ("xma2", "unexpected tensor", lambda m, t: (m, _set(t, "c1.weight_mask", torch.zeros(9, dtype=torch.uint8))),
     ValueError, r"c1\.weight_mask.*unexpected"),
    ("xma2", "BN running_var negative",
     lambda m, t: (m, _set(t, "bn.b2.running_var", -t["bn.b2.running_var"])), ValueError, r"bn\.b2\.running_var"),
    ("xma2", "BN running_mean shape", lambda m, t: (m, _set(t, "bn.b1.running_mean", torch.zeros(1))),
     ValueError, r"bn\.b1\.running_mean.*shape"),
    ("xma2", "BN num_batches_tracked float",
     lambda m, t: (m, _set(t, "bn.b1.num_batches_tracked", torch.tensor(3.0))), TypeError, r"bn\.b1\.num_batches_tracked"),
    ("xma2", "BN tensor missing", lambda m, t: (m, _set(t, "bn.b1.weight", None)), ValueError, r"bn\.b1\.weight.*missing"),
    ("xma2", "shared BN in meta, BN tensors in file",
     lambda m, t: ({**m, "spec": {**m["spec"], "task_bn": False}}, t), ValueError, r"bn\..*unexpected"),
    ("xma2", "num_classes not an int", lambda m, t: ({**m, "num_classes": "10"}, t), TypeError, r"num_classes"),
    ("xma2", "num_classes bool", lambda m, t: ({**m, "num_classes": True}, t), TypeError, r"num_classes"),
    ("xma2", "num_classes vs head", lambda m, t: ({**m, "num_classes": 9}, t), ValueError, r"head\.weight.*shape"),
    ("xma2", "head missing in model", lambda m, t: ({**m, "head": "fc2"}, t), ValueError, r"head"),
    ("xma2", "head is a crossbar layer", lambda m, t: ({**m, "head": "c1"}, t), TypeError, r"head"),
    ("xma2", "head not a str", lambda m, t: ({**m, "head": 3}, t), TypeError, r"head"),
    ("xma2", "layer meta extra key",
     lambda m, t: ({**m, "layers": [dict(m["layers"][0], extra=1)] + m["layers"][1:]}, t), ValueError, r"layers|extra"),
    ("xma2", "layers not a list", lambda m, t: ({**m, "layers": "c1"}, t), TypeError, r"layers"),
    ("xma2", "spec unknown key", lambda m, t: ({**m, "spec": {**m["spec"], "lr": 1}}, t), ValueError, r"spec"),
    ("xma2", "spec task_bn not bool", lambda m, t: ({**m, "spec": {**m["spec"], "task_bn": "yes"}}, t),
     TypeError, r"task_bn"),
    ("xma2", "spec budget NaN", lambda m, t: ({**m, "spec": {**m["spec"], "budget": math.nan}}, t),
     ValueError, r"budget"),
    ("xma2", "spec levels not ints", lambda m, t: ({**m, "spec": {**m["spec"], "levels": ["a", 1]}}, t),
     TypeError, r"levels"),
    ("xma2", "spec levels reversed", lambda m, t: ({**m, "spec": {**m["spec"], "levels": [2, 1]}}, t),
     ValueError, r"k_min|levels"),
    ("xma2", "backbone hash not a str", lambda m, t: ({**m, "backbone_sha256": None}, t), TypeError, r"backbone_sha256"),
    ("xma2", "metadata missing key", lambda m, t: ({k: v for k, v in m.items() if k != "num_classes"}, t),
     ValueError, r"num_classes"),
    ("xbm", "xbm col_code value 2", lambda m, t: (m, _set(t, "c2.col_code", torch.full_like(t["c2.col_code"], 2))),
     ValueError, r"c2\.col_code"),
    ("xbm", "xbm col_code int8", lambda m, t: (m, _set(t, "c2.col_code", t["c2.col_code"].to(torch.int8))),
     TypeError, r"c2\.col_code.*dtype"),
    ("piggyback", "weight_mask short", lambda m, t: (m, _set(t, "c2.weight_mask", t["c2.weight_mask"][:-1].clone())),
     ValueError, r"c2\.weight_mask"),
    ("finetune", "finetune pe_mask not all ones",
     lambda m, t: (m, _set(t, "c2.pe_mask", torch.zeros_like(t["c2.pe_mask"]))), ValueError, r"c2\.pe_mask"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One valid file per base method, each from a different model state than the loaded one."""
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, method in enumerate(("xma2", "xbm", "piggyback", "finetune")):
        model = make_model()
        make_task(model, mta.MethodSpec(method, budget=0.5), seed=10 + i)
        out[method] = d / f"{method}.safetensors"
        mta.save_task(model, out[method])
    return out


@pytest.fixture()
def loaded(tmp_path):
    """A model running an xma (shared-nothing) task loaded from a file."""
    src = make_model()
    make_task(src, mta.MethodSpec("xma"), seed=1)
    mta.save_task(src, tmp_path / "current.safetensors")
    model = make_model()
    mta.load_task(model, tmp_path / "current.safetensors")
    return model


def test_valid_files_load(files, loaded):
    for method, path in files.items():
        model = make_model()
        assert mta.load_task(model, path).method == method


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_refused_file_leaves_the_model_unchanged(case, files, loaded, tmp_path):
    method, _, corrupt, exc, match = case
    meta, tensors = mta.read_task(files[method])
    meta2, tensors2 = corrupt(copy.deepcopy(meta), dict(tensors))
    bad = tmp_path / "bad.safetensors"
    rewrite(bad, meta2, tensors2)
    before = snapshot(loaded)
    with pytest.raises(exc, match=match):
        mta.load_task(loaded, bad)
    assert_unchanged(loaded, before)
    # the untouched file still loads into the same model afterwards
    assert mta.load_task(loaded, files[method]).method == method


def test_refused_file_on_a_fresh_model_leaves_it_unprepared(files, tmp_path):
    """The first mta call on a model records the backbone; a refused load must not either."""
    meta, tensors = mta.read_task(files["xma2"])
    rewrite(tmp_path / "bad.safetensors", meta, _set(tensors, "head.bias", torch.ones(1)))
    model = make_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="head.bias"):
        mta.load_task(model, tmp_path / "bad.safetensors")
    assert getattr(model, "mta_task", None) is None and getattr(model, "_mta_backbone", None) is None
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()) and list(model.state_dict()) == list(sd)


def test_checksum_covers_the_metadata(files, tmp_path):
    """Editing the metadata without recomputing the checksum is refused (e.g. shift levels, which
    would decode the same codes to other scales)."""
    meta, tensors = mta.read_task(files["xma2"])
    meta = copy.deepcopy(meta)
    meta["spec"]["levels"] = [-3, 0]
    bad = tmp_path / "levels.safetensors"
    bad.write_bytes(st_save(dict(tensors), metadata={"xma2_mta": json.dumps(meta)}))
    model = make_model()
    with pytest.raises(ValueError, match="checksum"):
        mta.load_task(model, bad)
    meta["spec"]["levels"] = [-2, 1]  # back to the original: loads
    bad.write_bytes(st_save(dict(tensors), metadata={"xma2_mta": json.dumps(meta)}))
    mta.load_task(model, bad)


def test_old_format_version_is_refused_clearly(files, tmp_path):
    meta, tensors = mta.read_task(files["xma2"])
    old = {k: v for k, v in meta.items() if k != "content_sha256"}
    old["version"] = 1
    old["tensors_sha256"] = "0" * 64
    p = tmp_path / "v1.safetensors"
    p.write_bytes(st_save(dict(tensors), metadata={"xma2_mta": json.dumps(old)}))
    with pytest.raises(ValueError, match=r"version 1.*metadata"):
        mta.load_task(make_model(), p)


@pytest.mark.parametrize("meta_text", ['[1, 2]', '"x"', '{"format": "xma2-mta-adapter", "version": 2}',
                                       '{"format": "xma2-mta-adapter", "version": 2, "content_sha256": 5}'])
def test_malformed_metadata_is_a_value_error(meta_text, files, tmp_path):
    _, tensors = mta.read_task(files["xma2"])
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_save(dict(tensors), metadata={"xma2_mta": meta_text}))
    with pytest.raises((ValueError, TypeError)):
        mta.load_task(make_model(), p)


def test_piggyback_mask_padding_bits_are_refused(tmp_path):
    """15 weights: 2 bytes of mask, the last bit is padding and must be 0."""
    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({"lin": XbarLinear(5, 3, config=CFG), "fc": nn.Linear(3, 2)})
    src = model()
    mta.prepare(src, mta.MethodSpec("piggyback"), 2)
    with torch.no_grad():
        src.lin.adapter.scores[1, 2] = 0.0
    mta.save_task(src, tmp_path / "a.safetensors")
    meta, t = mta.read_task(tmp_path / "a.safetensors")
    assert t["lin.weight_mask"].shape == (2,)
    dst = model()
    mta.load_task(dst, tmp_path / "a.safetensors")
    before = snapshot_of(dst)
    rewrite(tmp_path / "b.safetensors", meta, _set(t, "lin.weight_mask", t["lin.weight_mask"] | torch.tensor([0, 1],
                                                                                                           dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"lin\.weight_mask.*padding"):
        mta.load_task(dst, tmp_path / "b.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def snapshot_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_failure_while_applying_rolls_back(files, loaded, monkeypatch):
    """Second line of defence: an error after prepare (here injected in the second layer's copy)
    restores the adapters, head, ranges, BN and task info."""
    adapters_mod = importlib.import_module("xma2_ops.mta.taskfile")  # the task file format module
    real = adapters_mod._load_layer
    calls = []

    def failing(name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(name, *args)

    monkeypatch.setattr(adapters_mod, "_load_layer", failing)
    before = snapshot(loaded)
    with pytest.raises(RuntimeError, match="injected"):
        mta.load_task(loaded, files["xma2"])
    assert calls == ["c1", "c2"]
    assert_unchanged(loaded, before)


def test_files_from_before_the_periphery_fields_load(files, tmp_path):
    """A version-2 file written before SPEC 8 / 7.4 has no periphery (or write-verify) fields in its
    configs: they mean the defaults, so it loads into a default model and is refused by a model whose
    conventions differ."""
    meta, tensors = mta.read_task(files["xma2"])
    old = copy.deepcopy(meta)
    for layer in old["layers"]:
        for key in ("sensing", "input_accumulation", "signed_inputs", "adc_rounding", "row_split", "adc_range"):
            del layer["config"][key]
    p = tmp_path / "old.safetensors"
    rewrite(p, old, dict(tensors))
    assert mta.load_task(make_model(), p).method == "xma2"
    other = make_model()
    for _, layer in mta.xbar_layers(other):
        layer.config = dataclasses.replace(layer.config, sensing="differential")
    with pytest.raises(ValueError, match="sensing"):
        mta.load_task(other, p)
