"""The task file format: a task's adapters on disk, safetensors tensors + JSON metadata, no pickle.

An adapter holds only what the task adds to the backbone:
  <layer>.input_range / .input_signed   the task's input calibration of each crossbar layer
  <layer>.pe_mask      uint8 [Tr, Tc]    tier-1 bits (finetune, pe, xma2)
  <layer>.task_weight  float [n]         task weights of the re-programmed PEs only, PE by PE in
                                         raster order, each PE's used [rows, cols] block row-major
  <layer>.weight_mask  uint8 [ceil(w/8)] Piggyback's 1 bit per weight, bit-packed (numpy order)
  <layer>.col_code     [Tr, N]           tier-2 codes: uint8 {0, 1} (xbm) or int8 shift codes (xma, xma2)
  head.weight / head.bias                the digital classifier
  bn.<name>.<state>                      BatchNorm parameters and statistics (task_bn only)
Metadata (safetensors ``__metadata__["xma2_mta"]``, JSON): format version, method spec, head name,
num_classes, per-layer name/kind/shape/config, the SHA-256 of the backbone's crossbar weights and
``content_sha256``, a SHA-256 over the rest of the metadata and every tensor's name, dtype, shape
and bytes, so a file for another backbone, architecture or config, and a corrupted file, are
refused with a clear message.  Format version 1 (whose checksum covered the tensors only) is
refused: its metadata cannot be trusted.

``load_task`` checks everything (every expected tensor present and no other, dtype, shape,
value range; metadata types and values) before it touches the model, then applies the task;
a refused file raises ValueError/TypeError naming the field and leaves the model as it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..config import PERIPHERY_FIELDS, XbarConfig
from ..device import DeviceModel
from ..modules import XbarLinear
from .adapter import LayerAdapter
from .layers import bn_layers, set_module, xbar_layers
from .methods import Expected, MethodSpec, finite
from .task import layer_adapters, prepare, task_info

FORMAT = "xma2-mta-adapter"
VERSION = 2  # 2: the checksum covers the metadata too (version 1 files are refused)
PathLike = Union[str, os.PathLike]


def _layer_meta(model: nn.Module) -> list:
    return [{"name": n, "kind": type(m).__name__, "weight_shape": list(m.weight.shape),
             "config": dataclasses.asdict(m.config)} for n, m in xbar_layers(model)]


def backbone_hash(model: nn.Module) -> str:
    """SHA-256 of the crossbar layers' names, backbone weights and biases."""
    h = hashlib.sha256()
    for n, m in xbar_layers(model):
        h.update(n.encode())
        for t in (m.weight, m.bias):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` in row-major order (any dtype, bfloat16 and 0-d tensors included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def content_hash(meta: dict, tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (canonical JSON, without its ``content_sha256`` entry) and every
    tensor's name, dtype, shape and bytes; each part is length-prefixed, so no two different
    contents hash the same bytes."""
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(f"{FORMAT} v{VERSION}".encode())
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    put(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for k in sorted(tensors):
        t = tensors[k]
        put(k.encode())
        put(str(t.dtype).encode())
        put(str(tuple(t.shape)).encode())
        put(_tensor_bytes(t))
    return h.hexdigest()


def save_task(model: nn.Module, path: PathLike) -> None:
    """Write the current task of ``model`` to ``path`` (safetensors); with a deployed digital
    correction (``mta.deploy``), each corrected layer's ``out_gain``/``out_offset`` too."""
    info = task_info(model)
    spec = info.spec
    tensors: Dict[str, torch.Tensor] = {}
    impl = spec.impl
    for (name, layer), (_, ad) in zip(xbar_layers(model), layer_adapters(model)):
        tensors[f"{name}.input_range"] = layer.input_range.detach().reshape(1).float().cpu()
        tensors[f"{name}.input_signed"] = layer.input_signed.detach().reshape(1).to(torch.uint8).cpu()
        for key, v in impl.file_tensors(ad, spec).items():  # what the method adds (methods.py)
            tensors[f"{name}.{key}"] = v
        if layer.out_gain is not None:  # mta.deploy's digital column correction (optional in the format)
            tensors[f"{name}.out_gain"] = layer.out_gain.detach().float().cpu().contiguous()
            tensors[f"{name}.out_offset"] = layer.out_offset.detach().float().cpu().contiguous()
    head = model.get_submodule(info.head)
    tensors["head.weight"] = head.weight.detach().cpu().contiguous()
    tensors["head.bias"] = head.bias.detach().cpu().contiguous()
    if spec.task_bn:
        for n, m in bn_layers(model):
            for k, v in m.state_dict().items():
                tensors[f"bn.{n}.{k}"] = v.detach().cpu().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "spec": spec.as_dict(), "head": info.head,
            "num_classes": info.num_classes, "layers": _layer_meta(model), "backbone_sha256": backbone_hash(model)}
    meta["content_sha256"] = content_hash(meta, tensors)
    data = st_save(tensors, metadata={"xma2_mta": json.dumps(meta)})
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # never leave a half-written adapter under the real name


def read_task(path: PathLike) -> tuple:
    """(metadata dict, tensors) of an adapter file, checked for integrity (format, version and the
    checksum over metadata and tensors), not yet against a model."""
    with open(path, "rb") as f:
        raw = f.read()
    where = os.fspath(path)
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        meta = json.loads(header["__metadata__"]["xma2_mta"])
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a readable xma2 task adapter (corrupted or truncated file?): {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: not an xma2 task adapter (metadata is a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not an xma2 task adapter (format {meta.get('format')!r})")
    version = meta.get("version")
    if version == 1:
        raise ValueError(f"{where}: adapter format version 1 is not read any more: its checksum does not cover the "
                         f"metadata, so a damaged method spec or head could load silently; this code reads version "
                         f"{VERSION}: save the task again (save_task) with this version")
    if version != VERSION:
        raise ValueError(f"{where}: adapter format version {version!r}, this code reads {VERSION}")
    stored = meta.get("content_sha256")
    if not isinstance(stored, str):
        raise ValueError(f"{where}: metadata content_sha256: expected the checksum string, got {stored!r} "
                         "(corrupted file?)")
    if content_hash(meta, tensors) != stored:
        raise ValueError(f"{where}: checksum mismatch, the adapter file is corrupted")
    return meta, tensors


# ------------------------------------------------------------------ validation (nothing is changed)
_META_KEYS = ("format", "version", "spec", "head", "num_classes", "layers", "backbone_sha256", "content_sha256")
_SPEC_TYPES = {"method": (str,), "budget": (int, float), "budget_unit": (str,), "selection": (str,), "criterion": (str,),
               "per_layer": (bool,), "task_bn": (bool,), "levels": (list,)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_keys(what: str, d: dict, keys) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what}: missing {missing}")
    extra = sorted(str(k) for k in d if k not in keys)
    if extra:
        raise ValueError(f"{what}: unexpected {extra}")


def _spec_from_meta(d) -> MethodSpec:
    if not isinstance(d, dict):
        raise TypeError(f"metadata spec: expected a JSON object, got {type(d).__name__}")
    fields = [f.name for f in dataclasses.fields(MethodSpec)]
    if "budget_unit" not in d:  # written before cell budgets existed: a PE budget
        d = {**d, "budget_unit": "pes"}
    _check_keys("metadata spec", d, fields)
    for k in fields:
        v = d[k]
        ok = isinstance(v, _SPEC_TYPES[k]) and not (isinstance(v, bool) and bool not in _SPEC_TYPES[k])
        if not ok:
            raise TypeError(f"metadata spec.{k}: expected {' or '.join(t.__name__ for t in _SPEC_TYPES[k])}, "
                            f"got {type(v).__name__} {v!r}")
    lv = d["levels"]
    if len(lv) != 2 or not all(_is_int(k) for k in lv):
        raise TypeError(f"metadata spec.levels: expected [k_min, k_max] (two ints), got {lv!r}")
    if not (-126 <= lv[0] and lv[1] <= 127 and lv[1] - lv[0] + 1 <= 127):
        raise ValueError(f"metadata spec.levels: exponents {lv} out of range (int8 codes, float32 scales)")
    try:
        return MethodSpec.from_dict(d)
    except ValueError as e:
        raise ValueError(f"metadata spec: {e}") from None


def _with_defaults(cfg, defaults: dict):
    """A file's config dict with the fields added after it was written (periphery conventions, write
    verify) at their defaults, which are the behaviour that file was made with; other keys untouched."""
    if not isinstance(cfg, dict):
        return cfg
    out = {**{k: v for k, v in defaults.items() if k not in cfg}, **cfg}
    if isinstance(out.get("device"), dict):
        dev_defaults = dataclasses.asdict(DeviceModel())
        out["device"] = {**{k: v for k, v in dev_defaults.items() if k not in out["device"]}, **out["device"]}
    return out


_ADDED_CONFIG_FIELDS = {k: v for k, v in dataclasses.asdict(XbarConfig()).items()
                        if k in PERIPHERY_FIELDS}  # fields a version-2 file may lack


def _check_compatible(model: nn.Module, meta: dict, where: str) -> None:
    mine = _layer_meta(model)
    theirs = meta["layers"]
    if isinstance(theirs, list):
        theirs = [{**l, "config": _with_defaults(l["config"], _ADDED_CONFIG_FIELDS)}
                  if isinstance(l, dict) and "config" in l else l for l in theirs]
    if not isinstance(theirs, list) or not all(isinstance(l, dict) for l in theirs):
        raise TypeError(f"{where}: metadata layers: expected a list of JSON objects, got {theirs!r:.80}")
    if [l.get("name") for l in mine] != [l.get("name") for l in theirs]:
        raise ValueError(f"{where}: made for another architecture: crossbar layers "
                         f"{[l.get('name') for l in theirs][:6]}..., this model has {[l['name'] for l in mine][:6]}...")
    for a, b in zip(mine, theirs):
        if set(a) != set(b):
            raise ValueError(f"{where}: metadata layers: layer {a['name']} has keys {sorted(b)}, expected {sorted(a)}")
        for key in a:
            if a[key] != b[key]:
                raise ValueError(f"{where}: made for another architecture or crossbar config: layer {a['name']} "
                                 f"{key} is {b[key]} in the file, {a[key]} in this model")
    if not isinstance(meta["backbone_sha256"], str):
        raise TypeError(f"{where}: metadata backbone_sha256: expected a string, got {meta['backbone_sha256']!r}")
    if meta["backbone_sha256"] != backbone_hash(model):
        raise ValueError(f"{where}: made for a different backbone (crossbar weights differ); "
                         "load the backbone weights the adapter was trained on")


def _expected_tensors(model: nn.Module, spec: MethodSpec, head: nn.Linear, num_classes: int,
                      t: Dict[str, torch.Tensor]) -> Dict[str, Expected]:
    exp: Dict[str, Expected] = {}
    binary = (lambda v: bool(((v == 0) | (v == 1)).all()), "0 or 1")
    for name, layer in xbar_layers(model):
        n = layer.weight.shape[0]
        exp[f"{name}.input_range"] = Expected(torch.float32, (1,), lambda v: finite(v) and bool((v >= 0).all()),
                                               "a finite value >= 0")
        exp[f"{name}.input_signed"] = Expected(torch.uint8, (1,), *binary)
        for key, e in spec.impl.expected_tensors(layer, spec, lambda key, name=name: t.get(f"{name}.{key}")).items():
            exp[f"{name}.{key}"] = e
        if f"{name}.out_gain" in t or f"{name}.out_offset" in t:  # optional, both or neither (mta.deploy)
            for key in ("out_gain", "out_offset"):
                exp[f"{name}.{key}"] = Expected(torch.float32, (n,), finite, "finite values")
    exp["head.weight"] = Expected(head.weight.dtype, (num_classes, head.in_features), finite, "finite values")
    exp["head.bias"] = Expected(head.weight.dtype, (num_classes,), finite, "finite values")
    if spec.task_bn:
        for bn_name, m in bn_layers(model):
            for key, v in m.state_dict().items():
                if v.is_floating_point():
                    if key == "running_var":
                        chk = (lambda x: finite(x) and bool((x >= 0).all()), "finite values >= 0")
                    else:
                        chk = (finite, "finite values")
                else:
                    chk = (lambda x: bool((x >= 0).all()), "values >= 0")
                exp[f"bn.{bn_name}.{key}"] = Expected(v.dtype, tuple(v.shape), *chk)
    return exp


def _validate(model: nn.Module, meta: dict, t: Dict[str, torch.Tensor], where: str) -> MethodSpec:
    """Check every metadata field and tensor against ``model``; raise ValueError/TypeError naming
    the field.  Nothing of ``model`` is changed."""
    _check_keys(f"{where}: metadata", meta, _META_KEYS)
    _check_compatible(model, meta, where)
    try:
        spec = _spec_from_meta(meta["spec"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    head_name, num_classes = meta["head"], meta["num_classes"]
    if not isinstance(head_name, str) or not head_name:
        raise TypeError(f"{where}: metadata head: expected a module name, got {head_name!r}")
    if not _is_int(num_classes):
        raise TypeError(f"{where}: metadata num_classes: expected an int, got {type(num_classes).__name__} "
                        f"{num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"{where}: metadata num_classes: expected >= 1, got {num_classes}")
    try:
        head = model.get_submodule(head_name)
    except AttributeError:
        raise ValueError(f"{where}: metadata head: this model has no module {head_name!r}") from None
    if not isinstance(head, nn.Linear) or isinstance(head, XbarLinear):
        raise TypeError(f"{where}: metadata head: {head_name!r} must be a digital nn.Linear, got {type(head).__name__}")
    exp = _expected_tensors(model, spec, head, num_classes, t)
    for key in exp:
        if key not in t:
            raise ValueError(f"{where}: tensor {key}: missing from the file (method {spec.label})")
    for key in sorted(t):
        if key not in exp:
            raise ValueError(f"{where}: tensor {key}: unexpected in a file of method {spec.label}")
    for key, e in exp.items():
        v = t[key]
        if v.dtype != e.dtype:
            raise TypeError(f"{where}: tensor {key}: expected dtype {e.dtype}, got {v.dtype}")
        if tuple(v.shape) != e.shape:
            raise ValueError(f"{where}: tensor {key}: expected shape {e.shape}, got {tuple(v.shape)}")
        if e.check is not None and v.numel() and not e.check(v):
            raise ValueError(f"{where}: tensor {key}: expected {e.what}")
    return spec


# ------------------------------------------------------------------ loading (all or nothing)
_ABSENT = object()


def _model_state(model: nn.Module, head_name: str) -> dict:
    """Everything prepare/_load_layer may change, to put back if applying fails half-way."""
    layers = [m for _, m in xbar_layers(model)]
    return {"task": getattr(model, "mta_task", _ABSENT), "backbone": getattr(model, "_mta_backbone", _ABSENT),
            "head": (head_name, model.get_submodule(head_name)),
            "adapters": [(m, m.adapter) for m in layers],
            "ranges": [(m, m.input_range.detach().clone(), m.input_signed.detach().clone()) for m in layers],
            "corrections": [(m, m.out_gain, m.out_offset) for m in layers],
            "bn": [(m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for _, m in bn_layers(model)],
            "training": [(m, m.training) for m in model.modules()]}


def _restore(model: nn.Module, st: dict) -> None:
    with torch.no_grad():
        for m, ad in st["adapters"]:
            m.adapter = ad
        for m, rng, sgn in st["ranges"]:
            m.input_range.copy_(rng)
            m.input_signed.copy_(sgn)
        for m, gain, offset in st["corrections"]:
            m.out_gain, m.out_offset = gain, offset
        for m, sd in st["bn"]:
            m.load_state_dict(sd)
    set_module(model, *st["head"])
    for attr, key in (("mta_task", "task"), ("_mta_backbone", "backbone")):
        if st[key] is _ABSENT:
            if hasattr(model, attr):
                delattr(model, attr)
        else:
            setattr(model, attr, st[key])
    for m, training in st["training"]:
        m.training = training


def load_task(model: nn.Module, path: PathLike) -> MethodSpec:
    """Switch ``model`` (in place) to the task stored at ``path``; returns its MethodSpec.

    Every metadata field and tensor is checked (presence, dtype, shape, values) before the model
    is touched; a refused file raises ValueError/TypeError naming the field and leaves ``model``
    exactly as it was."""
    where = os.fspath(path)
    meta, t = read_task(path)
    spec = _validate(model, meta, t, where)
    saved = _model_state(model, meta["head"])
    try:
        prepare(model, spec, meta["num_classes"], meta["head"])
        with torch.no_grad():
            for (name, layer), (_, ad) in zip(xbar_layers(model), layer_adapters(model)):
                _load_layer(name, layer, ad, spec, t)
            head = model.get_submodule(meta["head"])
            head.weight.copy_(t["head.weight"])
            head.bias.copy_(t["head.bias"])
            if spec.task_bn:
                for n, m in bn_layers(model):
                    m.load_state_dict({k: t[f"bn.{n}.{k}"] for k in m.state_dict()})
        model.eval()
    except BaseException:
        _restore(model, saved)
        raise
    return spec


def _load_layer(name: str, layer: nn.Module, ad: LayerAdapter, spec: MethodSpec, t: Dict[str, torch.Tensor]) -> None:
    """Copy one layer's validated tensors (see _expected_tensors) into the fresh adapter."""
    layer.input_range.copy_(t[f"{name}.input_range"].reshape(()))
    layer.input_signed.copy_(t[f"{name}.input_signed"].reshape(()).bool())
    # the file's correction, or none (a file without one, e.g. saved before mta.deploy existed)
    layer.set_output_correction(t.get(f"{name}.out_gain"), t.get(f"{name}.out_offset"))
    prefix = f"{name}."
    spec.impl.load_tensors(layer, ad, spec, {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
