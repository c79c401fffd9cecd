"""Task adapters on disk: safetensors tensors + JSON metadata, no pickle.

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
a SHA-256 of every tensor's bytes, so a file for another backbone, architecture or config, and a
corrupted file, are refused with a clear message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .masks import pe_extent, to_kn
from .methods import (SCORE_THRESHOLD, LayerAdapter, MethodSpec, TIER1, adapters, bn_layers, prepare, task_info, xbar_layers)

FORMAT = "xma2-mta-adapter"
VERSION = 1
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


def _tensors_hash(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(str(tensors[k].dtype).encode() + str(tuple(tensors[k].shape)).encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _pe_blocks(w_kn: torch.Tensor, mask: torch.Tensor, rows: int, cols: int):
    """(r, c, slice) of every selected PE in raster order."""
    k, n = w_kn.shape
    for r, c in mask.nonzero().tolist():
        yield r, c, (slice(r * rows, min((r + 1) * rows, k)), slice(c * cols, min((c + 1) * cols, n)))


def save_task(model: nn.Module, path: PathLike) -> None:
    """Write the current task of ``model`` to ``path`` (safetensors)."""
    info = task_info(model)
    spec = info.spec
    tensors: Dict[str, torch.Tensor] = {}
    for (name, layer), (_, ad) in zip(xbar_layers(model), adapters(model)):
        tensors[f"{name}.input_range"] = layer.input_range.detach().reshape(1).float().cpu()
        tensors[f"{name}.input_signed"] = layer.input_signed.detach().reshape(1).to(torch.uint8).cpu()
        if spec.method in ("finetune",) + TIER1:
            mask = torch.ones_like(ad.pe_sel) if spec.method == "finetune" else ad.pe_sel
            w_kn = to_kn(ad.task_weight.detach())
            blocks = [w_kn[sl].reshape(-1) for _, _, sl in _pe_blocks(w_kn, mask, ad.rows, ad.cols)]
            tensors[f"{name}.pe_mask"] = mask.to(torch.uint8).cpu()
            tensors[f"{name}.task_weight"] = (torch.cat(blocks) if blocks else w_kn.new_zeros(0)).cpu().contiguous()
        if spec.method == "piggyback":
            keep = (ad.scores.detach() > SCORE_THRESHOLD).reshape(-1).cpu().numpy()
            tensors[f"{name}.weight_mask"] = torch.from_numpy(np.packbits(keep.astype(np.uint8)))
        if spec.method == "xbm":
            tensors[f"{name}.col_code"] = ad.col_scale().detach().to(torch.uint8).cpu()
        if spec.method in ("xma", "xma2"):
            tensors[f"{name}.col_code"] = spec.levels.encode(ad.col_scale().detach()).cpu()
    head = model.get_submodule(info.head)
    tensors["head.weight"] = head.weight.detach().cpu().contiguous()
    tensors["head.bias"] = head.bias.detach().cpu().contiguous()
    if spec.task_bn:
        for n, m in bn_layers(model):
            for k, v in m.state_dict().items():
                tensors[f"bn.{n}.{k}"] = v.detach().cpu().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "spec": spec.as_dict(), "head": info.head,
            "num_classes": info.num_classes, "layers": _layer_meta(model), "backbone_sha256": backbone_hash(model),
            "tensors_sha256": _tensors_hash(tensors)}
    data = st_save(tensors, metadata={"xma2_mta": json.dumps(meta)})
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # never leave a half-written adapter under the real name


def read_task(path: PathLike) -> tuple:
    """(metadata dict, tensors) of an adapter file, checked for integrity (not yet against a model)."""
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
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not an xma2 task adapter (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{where}: adapter format version {meta.get('version')}, this code reads {VERSION}")
    if _tensors_hash(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"{where}: checksum mismatch, the adapter file is corrupted")
    return meta, tensors


def _check_compatible(model: nn.Module, meta: dict, where: str) -> None:
    mine = _layer_meta(model)
    theirs = meta["layers"]
    if [l["name"] for l in mine] != [l["name"] for l in theirs]:
        raise ValueError(f"{where}: made for another architecture: crossbar layers "
                         f"{[l['name'] for l in theirs][:6]}..., this model has {[l['name'] for l in mine][:6]}...")
    for a, b in zip(mine, theirs):
        if a != b:
            key = next(k for k in a if a[k] != b.get(k))
            raise ValueError(f"{where}: made for another architecture or crossbar config: layer {a['name']} "
                             f"{key} is {b.get(key)} in the file, {a[key]} in this model")
    if meta["backbone_sha256"] != backbone_hash(model):
        raise ValueError(f"{where}: made for a different backbone (crossbar weights differ); "
                         "load the backbone weights the adapter was trained on")


def load_task(model: nn.Module, path: PathLike) -> MethodSpec:
    """Switch ``model`` (in place) to the task stored at ``path``; returns its MethodSpec."""
    where = os.fspath(path)
    meta, t = read_task(path)
    _check_compatible(model, meta, where)
    spec = MethodSpec.from_dict(meta["spec"])
    prepare(model, spec, meta["num_classes"], meta["head"])
    try:
        with torch.no_grad():
            for (name, layer), (_, ad) in zip(xbar_layers(model), adapters(model)):
                _load_layer(name, layer, ad, spec, t)
            head = model.get_submodule(meta["head"])
            head.weight.copy_(t["head.weight"])
            head.bias.copy_(t["head.bias"])
            if spec.task_bn:
                for n, m in bn_layers(model):
                    m.load_state_dict({k: t[f"bn.{n}.{k}"] for k in m.state_dict()})
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{where}: adapter content does not match the model: {e}") from None
    model.eval()
    return spec


def _load_layer(name: str, layer: nn.Module, ad: LayerAdapter, spec: MethodSpec, t: Dict[str, torch.Tensor]) -> None:
    dev = layer.weight.device
    layer.input_range.copy_(t[f"{name}.input_range"].reshape(()))
    layer.input_signed.copy_(t[f"{name}.input_signed"].reshape(()).bool())
    if spec.method in ("finetune",) + TIER1:
        mask = t[f"{name}.pe_mask"].to(dev)
        ad.pe_sel.copy_(mask)
        flat = t[f"{name}.task_weight"].to(dev)
        w_kn = to_kn(layer.weight.detach()).clone()
        used = pe_extent(*w_kn.shape, ad.rows, ad.cols).prod(-1)
        if int((used * mask).sum()) != flat.numel():
            raise ValueError(f"{name}.task_weight: {flat.numel()} values for {int((used * mask).sum())} cells")
        i = 0
        for _, _, sl in _pe_blocks(w_kn, mask, ad.rows, ad.cols):
            blk = w_kn[sl]
            w_kn[sl] = flat[i:i + blk.numel()].reshape(blk.shape)
            i += blk.numel()
        ad.task_weight.copy_(w_kn.T.reshape(layer.weight.shape))
        ad.phase = "dense" if spec.method == "finetune" else "final"
    if spec.method == "piggyback":
        n = layer.weight.numel()
        bits = np.unpackbits(t[f"{name}.weight_mask"].numpy())[:n]
        if bits.size != n:
            raise ValueError(f"{name}.weight_mask: {bits.size} bits for {n} weights")
        ad.scores.copy_(torch.from_numpy(bits.astype(np.float32)).reshape(layer.weight.shape))
    if spec.method == "xbm":
        ad.col_param.copy_(t[f"{name}.col_code"].float())
    if spec.method in ("xma", "xma2"):
        ad.col_param.copy_(spec.levels.decode(t[f"{name}.col_code"]))
