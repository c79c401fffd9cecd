"""Speed of xbar_conv2d against the float convolution of the same shape.

    python benchmarks/bench_ops.py                 # CPU, all shapes
    python benchmarks/bench_ops.py --quick         # two small shapes, fewer repeats (a smoke test)
    python benchmarks/bench_ops.py --device cuda   # the cuda / triton backends vs cuDNN fp32 and bf16
    python benchmarks/bench_ops.py --threads 2
    python benchmarks/bench_ops.py --threads 2 --modes default device --no-reference   # device model vs ideal cells
    python benchmarks/bench_ops.py --periphery     # each SPEC 8 convention's forward vs the default
    python benchmarks/bench_ops.py --periphery --cells   # the same on the typical device (eval-mode layers)
    python benchmarks/bench_ops.py --kernels --threads 1   # xbar_mvm vs xbar_cell_mvm on the example's layers

Shapes: the 3x3 (stride 1, padding 1) convolutions of ResNet-18 on CIFAR (batch 32) and one
ImageNet-style layer (batch 8, 64 channels, 56x56).  Modes: ideal (no quantisation), the default
XbarConfig(), a 4-bit ADC, a lossless ADC (adc_bits=None: every partial sum exact), and the default
config on non-ideal cells (device: DeviceModel.preset("typical"), SPEC 7).  Through xbar_conv2d the
device mode programs the cells (draws their variation, faults, drift and read noise) on every call;
"eval ms" is an eval-mode XbarConv2d, which programs once and then only reads (read noise per call).
After the table, the kernels alone: xbar_mvm (ideal cells) against xbar_cell_mvm (the typical
device's conductances) on the same codes, and their ratio.
Times are the median of --repeats calls after a warm-up call, in milliseconds, the calls of one
shape taken in turns so that load changes on a shared machine hit all of them alike; "x conv" is the
ratio to nn.Conv2d (fp32) of the same shape, forward or forward+backward.  fwd+bwd takes
gradients for x and the weight; "+mask" also for pe_mask and col_scale (the exact gradients of
the XMA2 masks, one more pass of the crossbar kernel).  The reference backend is far too slow
for the full batch: it is timed once on a single image and scaled by the batch size (it is
linear in the batch), as the output says.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional

import torch
from timing import cpu_name, row, time_in_turns

import xma2_ops
from xma2_ops import quant
from xma2_ops import DeviceModel, XbarConfig
from xma2_ops.config import GemmParams
from xma2_ops.device import program_cells

SHAPES = [  # (batch, channels, height = width)
    (32, 64, 32),
    (32, 128, 16),
    (32, 256, 8),
    (8, 64, 56),
]
QUICK_SHAPES = [(8, 64, 16), (8, 128, 8)]
# the example's 3x3 layers of 24, 48, 96 and 192 channels at one test batch of 100 images (--kernels)
EXAMPLE_SHAPES = [(100, 24, 14), (100, 48, 7), (100, 96, 4), (100, 192, 2)]
MODES = {
    "ideal": XbarConfig(weight_bits=None, input_bits=None, adc_bits=None),
    "default": XbarConfig(),
    "adc4": XbarConfig(adc_bits=4),
    "lossless": XbarConfig(adc_bits=None),
    "device": XbarConfig(device=DeviceModel.preset("typical")),
}


def _time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device: str) -> Dict[str, float]:
    """Median ms per call of each function, timed in turns (timing.time_in_turns)."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    return {k: v * 1e3 for k, v in time_in_turns(fns, repeats, sync).items()}


def _inputs(batch, ch, hw, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ch, hw, hw, generator=gen).relu().to(device, dtype)  # post-ReLU activations
    w = (torch.randn(ch, ch, 3, 3, generator=gen) * (2.0 / (9 * ch)) ** 0.5).to(device, dtype)
    return x, w


def _xbar_fns(x, w, cfg: XbarConfig, backend: str):
    tr, tc = cfg.tiles(w[0].numel(), w.shape[0])
    mask = torch.zeros(tr, tc, device=x.device)
    scale = torch.ones(tr, w.shape[0], device=x.device)
    gy = torch.randn(x.shape, device=x.device)

    def fwd():
        with torch.no_grad():
            return xma2_ops.xbar_conv2d(x, w, None, 1, 1, config=cfg, backend=backend)

    def fwd_bwd(with_masks: bool):
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        m, a = (mask.detach().requires_grad_(), scale.detach().requires_grad_()) if with_masks else (mask, scale)
        y = xma2_ops.xbar_conv2d(xs, ws, None, 1, 1, config=cfg, pe_mask=m, col_scale=a, backend=backend)
        y.backward(gy)

    return fwd, lambda: fwd_bwd(False), lambda: fwd_bwd(True)


def _eval_module_fwd(x, w, cfg: XbarConfig):
    """Forward of an eval-mode XbarConv2d: calibrated and programmed by a first call, then reused."""
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = xma2_ops.XbarConv2d.from_conv(conv, cfg).eval()

    def fwd():
        with torch.no_grad():
            return layer(x)

    fwd()
    return fwd


# SPEC 8: one field switched at a time, and CrossSim's set; "converts less" marks the conventions
# with fewer ADC conversions than the default (they should not be slower).
PERIPHERY = {
    "differential": (dict(sensing="differential"), True),
    "analog": (dict(input_accumulation="analog"), True),
    "sign_magnitude": (dict(signed_inputs="sign_magnitude"), True),
    "half_even": (dict(adc_rounding="half_even"), False),
    "even_split": (dict(row_split="even"), False),
    "tile_rows": (dict(adc_range="tile_rows"), False),
    "crosssim": (XbarConfig.conventions("crosssim").__dict__, True),
}


def bench_periphery(shapes, repeats: int, device: str, cells: bool) -> None:
    """Forward of each periphery convention against the default config, timed in turns in one run
    (signed inputs, so that sign_magnitude has something to save).  On the typical device's cells
    (``cells``) the forward of an eval-mode XbarConv2d, programmed once (xbar_conv2d would program
    every call's cells, which costs more than the kernel)."""
    base = XbarConfig(device=DeviceModel.preset("typical")) if cells else XbarConfig()

    def forward(cfg):
        return _eval_module_fwd(x, w, cfg) if cells else _xbar_fns(x, w, cfg, None)[0]

    fields = [f for f in ("sensing", "input_accumulation", "signed_inputs", "adc_rounding", "row_split", "adc_range")]
    print(f"\nPeriphery conventions (SPEC 8), forward ms, signed inputs, {'typical device' if cells else 'ideal cells'}; "
          f"ratio = convention / default in the same run")
    widths = [22, 16] + [16] * len(PERIPHERY)
    print(row(["shape (B, C, HxW)", "default ms"] + list(PERIPHERY), widths))
    for batch, ch, hw in shapes:
        x, w = _inputs(batch, ch, hw, device)
        x = x - 0.2  # signed
        fns = {"default": forward(base)}
        for name, (kw, _) in PERIPHERY.items():
            fns[name] = forward(dataclasses.replace(base, **{f: kw[f] for f in fields if f in kw}))
        t = _time_interleaved(fns, repeats, device)
        cells_ = [f"{batch}, {ch}, {hw}x{hw}", f"{t['default']:.1f}"]
        cells_ += [f"{t[n]:.1f} ({t[n] / t['default']:.2f}x)" for n in PERIPHERY]
        print(row(cells_, widths))
    print("conventions that convert less than the default: " + ", ".join(n for n, (_, less) in PERIPHERY.items() if less))


def _conv_fns(x, w, dtype=torch.float32):
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False).to(x.device, dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
    xd = x.to(dtype)
    gy = torch.randn(x.shape, device=x.device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return conv(xd)

    def fwd_bwd():
        xs = xd.detach().requires_grad_()
        conv(xs).backward(gy)

    return fwd, fwd_bwd


def bench_cpu(shapes, repeats: int, modes: List[str], with_reference: bool) -> None:
    head = ["shape", "mode", "fwd ms", "x conv", "fwd+bwd ms", "x conv", "+mask ms", "x conv", "eval ms", "ref fwd ms*",
            "speed-up"]
    widths = [20, 9, 9, 7, 11, 7, 9, 7, 8, 12, 9]
    print(row(head, widths))
    for batch, ch, hw in shapes:
        x, w = _inputs(batch, ch, hw, "cpu")
        fns = dict(zip(("conv/f", "conv/fb"), _conv_fns(x, w)))
        for mode in modes:
            fwd, fb, fbm = _xbar_fns(x, w, MODES[mode], "cpu")
            fns.update({f"{mode}/f": fwd, f"{mode}/fb": fb})
            if MODES[mode].quantized:
                fns[f"{mode}/fbm"] = fbm
                fns[f"{mode}/eval"] = _eval_module_fwd(x, w, MODES[mode])
        t = _time_interleaved(fns, repeats, "cpu")
        name = f"{batch}x{ch}x{hw}x{hw}"
        print(row([name, "nn.Conv2d", f"{t['conv/f']:.1f}", "1.00", f"{t['conv/fb']:.1f}", "1.00", "", "", "", "",
                    ""], widths))
        for mode in modes:
            cfg = MODES[mode]
            tf, tfb, tfbm, tev = t[f"{mode}/f"], t[f"{mode}/fb"], t.get(f"{mode}/fbm"), t.get(f"{mode}/eval")
            ref_cell = speed_cell = "-"
            if with_reference and cfg.quantized:  # ideal mode runs the float conv on every backend
                ref_fwd, _, _ = _xbar_fns(x[:1], w, cfg, "reference")
                t0 = time.perf_counter()
                ref_fwd()
                t_ref = (time.perf_counter() - t0) * 1e3 * batch  # one call on one image, scaled by the batch
                ref_cell, speed_cell = f"{t_ref:.0f}", f"{t_ref / tf:.0f}x"
            print(row([name, mode, f"{tf:.1f}", f"{tf / t['conv/f']:.2f}", f"{tfb:.1f}",
                        f"{tfb / t['conv/fb']:.2f}", f"{tfbm:.1f}" if tfbm else "-",
                        f"{tfbm / t['conv/fb']:.2f}" if tfbm else "-", f"{tev:.1f}" if tev else "-", ref_cell,
                        speed_cell], widths))
        if "device" in modes and "default" in modes:
            print(f"{name}: device / default = {t['device/f'] / t['default/f']:.2f} (xbar_conv2d fwd), "
                  f"{t['device/fb'] / t['default/fb']:.2f} (fwd+bwd), {t['device/eval'] / t['default/eval']:.2f} "
                  f"(eval-mode XbarConv2d fwd)")
    print("* reference backend: one call on one image (batch 1), multiplied by the batch size; "
          "speed-up = that / cpu fwd ms.  Ideal mode computes a float conv on every backend (no reference time).")
    print("Calls of one shape are timed in turns (one of each per round), medians of the rounds.")


def bench_kernels(shapes, repeats: int) -> None:
    """xbar_mvm (default XbarConfig, ideal cells) vs xbar_cell_mvm (same codes, the cells of
    DeviceModel.preset("typical")) on the im2col codes of each shape: the kernels alone."""
    cfg = XbarConfig()
    dev = DeviceModel.preset("typical")
    p = GemmParams.from_config(cfg, False)
    print(f"\nkernels alone: xbar_mvm (ideal cells) vs xbar_cell_mvm (DeviceModel.preset('typical'), "
          f"frac_bits {dev.frac_bits}), default XbarConfig(), uint8 codes")
    head = ["shape", "M x K x N", "xbar_mvm ms", "cell_mvm ms", "ratio", "max G (levels)"]
    widths = [20, 18, 12, 12, 7, 15]
    print(row(head, widths))
    for batch, ch, hw in shapes:
        x, w = _inputs(batch, ch, hw, "cpu")
        s_x = quant.derived_scale(x, cfg.input_qmax(False))
        xq = quant.quantize_input(x, s_x, cfg.input_bits, False).to(torch.uint8)
        x_codes = torch.ops.xma2_ops.xbar_unfold_codes(xq, [3, 3], [1, 1], [1, 1], [1, 1])
        wk = w.reshape(ch, -1)
        w_codes = quant.quantize_weight(wk, quant.derived_scale(wk, cfg.weight_qmax), cfg.weight_bits).T
        w_codes = w_codes.to(torch.int32).contiguous()
        gq = program_cells(w_codes, cfg.weight_bits, cfg.cell_bits, dev, 0, 0).read(0)
        tr = -(-w_codes.shape[0] // cfg.rows)
        coef = torch.rand(tr, ch, generator=torch.Generator().manual_seed(1))
        fns = {
            "ideal": lambda: torch.ops.xma2_ops.xbar_mvm(x_codes, w_codes, None, coef, None, *p.as_args()),
            "cells": lambda: torch.ops.xma2_ops.xbar_cell_mvm(x_codes, gq, None, coef, None, *p.as_args(),
                                                               dev.frac_bits),
        }
        t = _time_interleaved(fns, repeats, "cpu")
        m, k = x_codes.shape
        print(row([f"{batch}x{ch}x{hw}x{hw}", f"{m} x {k} x {ch}", f"{t['ideal']:.1f}", f"{t['cells']:.1f}",
                    f"{t['cells'] / t['ideal']:.2f}", f"{float(gq.max()) / 2 ** dev.frac_bits:.2f}"], widths))


def bench_cuda(shapes, repeats: int, modes: List[str]) -> None:
    backends = [b for b in ("cuda", "triton") if b in xma2_ops.available_backends()]
    if not backends:
        print("no CUDA backend available (xma2_ops.available_backends() =", xma2_ops.available_backends(), ")")
    head = ["shape", "backend/mode", "fwd ms", "x fp32", "x bf16", "fwd+bwd ms", "x fp32"]
    widths = [20, 22, 9, 7, 7, 11, 7]
    print(row(head, widths))
    for batch, ch, hw in shapes:
        x, w = _inputs(batch, ch, hw, "cuda")
        f32, fb32 = _conv_fns(x, w)
        f16, _ = _conv_fns(x, w, torch.bfloat16)
        fns = {"f32": f32, "fb32": fb32, "f16": f16}
        for backend in backends:
            for mode in modes:
                fwd, fb, _ = _xbar_fns(x, w, MODES[mode], backend)
                fns.update({f"{backend}/{mode}/f": fwd, f"{backend}/{mode}/fb": fb})
        t = _time_interleaved(fns, repeats, "cuda")
        t32, tb32, t16 = t["f32"], t["fb32"], t["f16"]
        name = f"{batch}x{ch}x{hw}x{hw}"
        print(row([name, "cuDNN fp32", f"{t32:.2f}", "1.00", f"{t32 / t16:.2f}", f"{tb32:.2f}", "1.00"], widths))
        print(row([name, "cuDNN bf16", f"{t16:.2f}", f"{t16 / t32:.2f}", "1.00", "", ""], widths))
        for backend in backends:
            for mode in modes:
                tf, tfb = t[f"{backend}/{mode}/f"], t[f"{backend}/{mode}/fb"]
                print(row([name, f"{backend}/{mode}", f"{tf:.2f}", f"{tf / t32:.2f}", f"{tf / t16:.2f}",
                            f"{tfb:.2f}", f"{tfb / tb32:.2f}"], widths))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small shapes, 2 repeats, no 4-bit-ADC mode")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per entry (default 5, --quick 2)")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the reference backend")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=None, help="modes of the table (default: all)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernels-alone table (device model)")
    ap.add_argument("--periphery", action="store_true",
                    help="only the SPEC 8 table: each periphery convention's forward vs the default")
    ap.add_argument("--cells", action="store_true", help="with --periphery: on the typical device's cells")
    ap.add_argument("--kernels", action="store_true",
                    help="only the kernels-alone table, on the example's layer shapes (its device evaluation's kernel)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (2 if args.quick else 5)
    modes = args.modes or (["ideal", "default", "lossless", "device"] if args.quick else list(MODES))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()}, "
          f"XMA2_CPU_ISA={os.environ.get('XMA2_CPU_ISA', 'auto')}, load average {os.getloadavg()[0]:.1f}")
    if args.periphery:
        bench_periphery(shapes, repeats, args.device, args.cells)
        return
    if args.kernels:
        bench_kernels(EXAMPLE_SHAPES, repeats)
        return
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
        print("GPU:", torch.cuda.get_device_name())
        bench_cuda(shapes, repeats, modes)
    else:
        bench_cpu(shapes, repeats, modes, not args.no_reference)
        if not args.no_kernels:
            bench_kernels(shapes, repeats)


if __name__ == "__main__":
    main()
