"""The experiment's backbone: built (small ResNet or torchvision-keyed resnet18/50), converted to
crossbars, trained on the source task and cached under --out; its ADC clips."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ... import XbarConfig, calibrate_adc, convert
from ... import models as xmodels
from .. import calibrate_inputs, use_config, weight_only, xbar_layers
from .runtime import ddp_wrap, is_dist, make_loader

ARCHS = ("small", "resnet18", "resnet50")

def xbar_config(args) -> XbarConfig:
    return XbarConfig(rows=args.rows, cols=args.cols, sensing=args.sensing)

def build_model(args, num_classes: int) -> nn.Module:
    """The backbone on crossbars: every conv mapped (xma2_ops.convert), the classifier head ``fc``
    digital (one per task).  resnet18/resnet50 come from xma2_ops.models (torchvision's keys); a
    --backbone-weights checkpoint is loaded as is (a torchvision ImageNet checkpoint keeps its
    1000-class head until a task replaces it)."""
    if args.arch not in ARCHS:
        raise SystemExit(f"--arch: expected one of {ARCHS}, got {args.arch!r}")
    if args.arch == "small":
        model = xmodels.SmallResNet(args.width, num_classes)
    else:
        weights = load_weights(args.backbone_weights) if args.backbone_weights else None
        if weights is not None:
            stem = weights.get("conv1.weight")
            if stem is None:
                raise SystemExit(f"--backbone-weights {args.backbone_weights}: no 'conv1.weight' "
                                 f"(expected a torchvision {args.arch} state dict)")
            args.cifar = stem.shape[-1] == 3  # a 3x3 stem: the CIFAR variant
            num_classes = weights["fc.weight"].shape[0] if "fc.weight" in weights else num_classes
        builder = xmodels.resnet18 if args.arch == "resnet18" else xmodels.resnet50
        model = builder(num_classes=num_classes, cifar=args.cifar)
        if weights is not None:
            try:
                model.load_state_dict(weights)
            except RuntimeError as e:
                raise SystemExit(f"--backbone-weights {args.backbone_weights}: not a torchvision {args.arch} "
                                 f"state dict ({str(e).splitlines()[0]} ...)") from None
    return convert(model, xbar_config(args), skip=lambda name, m: name == "fc")

def load_weights(path: str) -> Dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise SystemExit(f"--backbone-weights: no such file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)

def backbone_key(args, src) -> str:
    """The cached backbone's key: everything its weights and input ranges depend on."""
    parts = [args.arch, args.width, args.rows, args.cols, args.seed, args.n_source, args.backbone_epochs,
             len(src[0][1]) if src else 0]
    parts += [args.sensing] if args.sensing != "per_polarity" else []  # (the input ranges see the ADC's sensing)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]

def backbone(args, src, out: Path, progress: bool) -> nn.Module:
    """The backbone: --backbone-weights as given, else trained on ``src`` (MNIST) with weight-only
    fake quantisation and cached under --out (the key covers everything the weights depend on)."""
    from safetensors.torch import load_file, save_file
    model = build_model(args, 10)
    if args.backbone_weights and args.arch != "small":
        return model  # loaded by build_model (a torchvision checkpoint)
    cache = Path(args.backbone_weights) if args.backbone_weights else out / f"backbone_{backbone_key(args, src)}.safetensors"
    if cache.exists():
        model.load_state_dict(load_file(str(cache)))
        return model
    torch.manual_seed(args.seed)
    loader = make_loader(src[0], args.batch, args.seed)
    net = ddp_wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=max(1, args.backbone_epochs * len(loader)))
    with use_config(model, weight_only):
        for ep in range(args.backbone_epochs):
            loader.sampler.set_epoch(ep) if hasattr(loader.sampler, "set_epoch") else None
            model.train()
            it = loader
            if progress:
                from tqdm.auto import tqdm
                it = tqdm(loader, desc=f"backbone ep{ep + 1}/{args.backbone_epochs}", leave=False)
            for x, y in it:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
                sched.step()
    if is_dist():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)
    calibrate_inputs(model, make_loader(src[0], args.batch, args.seed), batches=8)
    if not is_dist() or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return model

def backbone_adc_clips(model: nn.Module, data, args, log) -> Dict[str, int]:
    """--adc-clip: each layer's ADC range from the backbone's partial sums on ``data`` (the source
    training set, or the first task's); every task then runs with these clips (an ADC's reference
    is a property of the chip, not re-tuned per task)."""
    if args.adc_clip == "pmax":
        return {}
    if is_dist():  # every rank sees the same batches: identical clips without a collective
        loader = DataLoader(TensorDataset(*data), batch_size=args.batch, shuffle=False)
    else:
        loader = make_loader(data, args.batch, args.seed, shuffle=False)
    clips = calibrate_adc(model, loader, batches=args.adc_batches, method=args.adc_clip,
                                   percentile=args.adc_percentile)
    pmax = next(m.config.pmax for _, m in xbar_layers(model))
    log(f"ADC clips ({args.adc_clip}, Pmax {pmax}): " + " ".join(f"{n}={c}" for n, c in clips.items()))
    return clips
