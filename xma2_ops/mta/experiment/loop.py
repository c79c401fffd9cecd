"""The run loop: the backbone, then every (seed, task, run): prepare and fit (or, with --adapters-from,
load the adapter an earlier run saved), evaluate, cost, save; then
the task-switching check, the statistics, the targets and the outputs under --out."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from .. import EnergyModel, endurance, fit, layer_adapters, load_task, prepare, report, save_task, xbar_layers
from .backbone import backbone, backbone_adc_clips, build_model, xbar_config
from .data import source_task, task_data
from .estimate import print_full_run_estimate
from .evaluate import device_model, evaluate, evaluate_device, noise_aware_training
from .quick import adc_data, cap_large_model
from .report import (plot_accuracy, plot_energy, plot_masks, print_device_table, print_paired, print_table,
                     write_results)
from .runs import method_list, ref_label, training_schedule
from .runtime import ddp_wrap, is_dist, make_loader, setup_distributed, state_hash
from .stats import device_summary, paired_differences, summarize
from .targets import check_device_targets, check_targets
from .threads import spinning_hint


def run_experiment(args, full_args=None) -> List[dict]:
    """Run the experiment that ``args`` (cli.parse_args) describe; returns the per-run rows.
    ``full_args``: with --quick, the arguments of the full run, whose cost is estimated first."""
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
    spinning_hint(log)

    if args.arch != "small":
        if args.data_root and not args.backbone_weights:
            raise SystemExit(f"--arch {args.arch} --data-root needs --backbone-weights FILE (a torchvision "
                             f"checkpoint): the built-in MNIST backbone is 28x28 grey")
        if args.backbone_weights:
            build_model(args, 10)  # reads the checkpoint's stem: the image geometry of the tasks
    tasks = task_data(args)
    if args.validate:
        log(f"--validate {args.validate}: every accuracy below is on {args.validate} held-out training images per task, "
            f"not on the test images")
    src = None  # the source task (MNIST): trains the small backbone, or the resnets on the built-in tasks
    if args.arch == "small" or not args.data_root:
        src = source_task(args)
    model = backbone(args, src, out, progress)
    n_tasks = len(tasks)
    tasks = cap_large_model(args, model, tasks, log)  # --quick on a large backbone (quick.py)
    cfg = xbar_config(args)
    n_pe = sum(math.prod(m.tiles) for _, m in xbar_layers(model))
    log(f"backbone: {args.arch}, {len(xbar_layers(model))} crossbar layers, {n_pe} PEs of {cfg.rows}x{cfg.cols}, "
        f"config {cfg}")
    backbone_acc = {}
    if src is not None:
        backbone_acc["pmax"] = evaluate(model, src[1], args.eval_batch, progress, "backbone, Pmax clip")[0]
        log(f"backbone MNIST accuracy (quantised crossbar forward), ADC clip Pmax = {cfg.pmax}: "
            f"{backbone_acc['pmax']:.2f}%")
    clips = backbone_adc_clips(model, adc_data(args, model, src[0] if src is not None else next(iter(tasks.values()))[0]),
                               args, log)
    if src is not None and clips:
        backbone_acc[args.adc_clip] = evaluate(model, src[1], args.eval_batch, progress, "backbone, calibrated")[0]
        log(f"backbone MNIST accuracy with the {args.adc_clip} clips: {backbone_acc[args.adc_clip]:.2f}%")

    sched = training_schedule(args)
    runs = method_list(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    if full_args is not None and rank == 0:
        print_full_run_estimate(model, tasks, args, full_args, log, n_tasks)
    rows: List[dict] = []
    chip_rows: List[dict] = []  # --device: one row per (run, --deploy mode, chip)
    masks: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    checks: Dict[tuple, tuple] = {}
    hashes: Dict[str, str] = {}
    seed_walls = []
    device_wall = 0.0  # --device: seconds of the chips' evaluations within the wall time
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
        tag = run.label.replace("/", "_").replace("%", "pct")
        rel = Path("adapters") / (f"{task}__{tag}.safetensors" if args.seeds == 1 else
                                  f"seed{sd}" / Path(f"{task}__{tag}.safetensors"))
        torch.manual_seed(sd)  # head init and the selection's randomness
        if args.adapters_from:
            _load_adapter(model, [Path(d) / rel for d in args.adapters_from], spec)
        else:
            prepare(model, spec, ncls)
            with noise_aware_training(model, args):
                fit(model, make_loader(train, args.batch, sd), dataclasses.replace(sched, hw_epochs=sched.hw_epochs
                                                                                  if run.hw else 0),
                    wrap=ddp_wrap, progress=progress, calib_loader=make_loader(train, args.batch, sd, shuffle=False))
        train_s = time.time() - t_run
        acc, first = evaluate(model, test, args.eval_batch, progress, f"{task} {run.label}")
        dev = evaluate_device(model, test, args, progress, f"{task} {run.label}", train, acc) if args.device else None
        rep = report(model, example_input=test[0][:1])
        fname = out / rel
        fname.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            save_task(model, fname)
        hashes[f"{sd}/{task}/{run.label}"] = state_hash(model)
        if sd == seeds[0] and spec.method == "xma2" and spec.task_bn and run.hw and abs(spec.budget - 0.1) < 1e-9:
            masks.setdefault(spec.label, {})[task] = {n: ad.pe_sel.cpu().numpy() for n, ad in layer_adapters(model)}
        checks[(sd, task, run.label)] = (fname, first)
        t = rep.total
        rows.append({"seed": sd, "task": task, "method": run.label, "acc": round(acc, 2),
                     "pe_pct": round(100 * rep.pe_fraction, 2), "reprogrammed_pes": t.reprogrammed_pes,
                     "pes": t.pes, "cells_written": t.cells_written, "cells_changed": t.cells_changed,
                     "energy_uJ": t.energy_j * 1e6, "mask_bits": t.mask_bits, "adapter_bits": t.adapter_bits,
                     "infer_nJ": t.inference_energy_j * 1e9, "latency_us": t.latency_s * 1e6,
                     "adc_per_img": t.adc_conversions, "train_s": round(train_s, 1),
                     "eval": "validation" if args.validate else "test"})
        if dev is not None:
            device_wall += dev.wall_s
            rows[-1].update(device_n_test=dev.n_test, ideal_acc_subset=round(dev.ideal, 2), device_wall_s=round(dev.wall_s, 1))
            for mode in dev.accs:
                mean, std = dev.mean_std(mode)
                rows[-1].update({f"device_acc_{mode}": round(mean, 2), f"device_std_{mode}": round(std, 2),
                                 f"device_chip_s_{mode}": round(sum(dev.seconds[mode]), 1)})
                chip_rows += [{"seed": sd, "task": task, "method": run.label, "mode": mode, "chip": c,
                               "device_seed": args.seed + c, "n_test": dev.n_test, "ideal_acc": round(dev.ideal, 2),
                               "acc": round(a, 2),
                               # the PEs the chip-aware re-selection swapped on this chip ("" in the other modes)
                               "pes_swapped": dev.pes_swapped[c] if mode == "chip-aware" else ""}
                              for c, a in enumerate(dev.accs[mode])]
        line = (f"seed {sd} {task:>10} {run.label:<28} acc {acc:6.2f}%  PEs {t.reprogrammed_pes:>3}/{t.pes}"
                f"  cells {t.cells_written:>8}  write {t.energy_j * 1e6:8.3f} uJ  infer "
                f"{t.inference_energy_j * 1e9:8.1f} nJ/img  mask {t.mask_bits} bits  ({time.time() - t_run:.0f} s)"
                + (f"  {args.device} (ideal {dev.ideal:.2f}% on the same {dev.n_test} images): "
                   + ", ".join(f"{mode} {dev.mean_std(mode)[0]:6.2f}% +- {dev.mean_std(mode)[1]:.2f}" for mode in dev.accs)
                   if dev is not None else ""))
        if bar is not None:
            bar.write(line)
            bar.update(1)
        else:
            log(line)
    if bar is not None:
        bar.close()
    seed_walls = [b - a for a, b in zip(seed_walls, seed_walls[1:] + [time.time()])]

    switch_ok = _switch_check(model, tasks, checks, seeds, args, n_pe, log)
    summary = summarize(rows)
    ref = ref_label(args)
    paired = paired_differences(rows, ref)
    targets = check_targets(summary, paired, ref)
    chip_summary = device_summary(chip_rows)
    targets += check_device_targets(chip_summary, args.device, ref)
    wall = time.time() - t0
    if rank == 0:
        print_table(summary, len(seeds))
        print_paired(paired, ref, len(seeds))
        if chip_rows:
            print_device_table(chip_summary, args.device, args.device_chips)
        for t in targets:
            print(f"target {'n/a   ' if t['met'] is None else 'MET   ' if t['met'] else 'MISSED'} {t['target']}: "
                  f"{t['value']}")
        meta = {"args": vars(args), "config": dataclasses.asdict(cfg), "adc_clips": clips, "pes": n_pe,
                "backbone_acc": backbone_acc, "wall_s": round(wall, 1), "device_wall_s": round(device_wall, 1),
                "seed_wall_s": [round(w, 1) for w in seed_walls],
                "threads": torch.get_num_threads(), "energy_model": dataclasses.asdict(EnergyModel()),
                "device": dataclasses.asdict(device_model(args)) if args.device else None,
                "switch_bit_identical": switch_ok, "world_size": world,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
        write_results(out, rows, summary, paired, targets, meta, chip_rows, chip_summary)
        plot_accuracy(summary, out / "accuracy_vs_pes.png")
        plot_energy(summary, out / "accuracy_vs_energy.png", len(seeds))
        for i, (label, m) in enumerate(sorted(masks.items(), key=lambda kv: "learned" not in kv[0])):
            name = "pe_masks.png" if i == 0 else f"pe_masks_{label.split('/')[-1]}.png"
            plot_masks(m, out / name, f"{label}: PEs re-programmed, summed over {len(m)} tasks")
    if world > 1:
        import json
        (out / f"ddp_rank{rank}.json").write_text(json.dumps({"rows": rows, "hashes": hashes}, indent=1))
        dist.barrier()
        dist.destroy_process_group()
    log(f"wall time: {wall:.1f} s"
        + (f" (per seed: {', '.join(f'{w:.0f} s' for w in seed_walls)})" if len(seed_walls) > 1 else "")
        + (f", of which {device_wall:.1f} s the {args.device} chips' evaluation "
           f"({f'{world} ranks' if world > 1 else f'{min(args.device_workers, args.device_chips)} workers'})"
           if args.device else "")
        + f", {torch.get_num_threads()} threads  (outputs in {out}/)")
    if not switch_ok:
        raise SystemExit("task switching did not restore the saved outputs")
    return rows


def _load_adapter(model, candidates: List[Path], spec) -> None:
    """--adapters-from: the run's adapter as an earlier run saved it, from the first of ``candidates`` (one
    per folder given) that exists (same backbone, checked by load_task)."""
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise SystemExit(f"--adapters-from: {', '.join(map(str, candidates))} not found (expected the --out "
                         "folder of a run with the same tasks, methods, seeds and --budget-unit/--criterion/--shift-levels; "
                         "runs from before issue 18's eleventh round used --budget-unit pes --criterion snip)")
    try:
        loaded = load_task(model, path)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--adapters-from: {e}") from None
    if loaded != spec:
        raise SystemExit(f"--adapters-from: {path} holds method {loaded.label}, expected {spec.label}")


def _switch_check(model, tasks, checks, seeds, args, n_pe: int, log) -> bool:
    """One backbone, many adapters: reload every adapter into the same model; its first test batch
    must give bit-identical logits.  Also logs the endurance of the xma2@10% task sequence."""
    if is_dist():
        dist.barrier()
    switch_ok = True
    for (sd, task, label), (fname, first) in checks.items():
        load_task(model, fname)
        _, first_again = evaluate(model, tasks[task][1], args.eval_batch, False, "", max_batches=1)
        same = first is None and first_again is None or (
            first is not None and first_again is not None and torch.equal(first_again, first))  # a rank may get no shard
        switch_ok &= same
    if checks:
        log(f"task switching: {len(checks)} adapters reloaded into the same backbone, first test batch's logits "
            f"bit-identical to when they were saved: {switch_ok}")
        ref = ref_label(args)
        seq = [fname for (sd, task, label), (fname, _) in checks.items() if sd == seeds[0] and label == ref]
        if seq:
            writes = endurance(model, seq, cycles=1)
            log(f"endurance, {ref} over the task sequence {' -> '.join(tasks)}: max writes per PE "
                f"{max(int(w.max()) for w in writes.values())}, PEs written at least once "
                f"{sum(int((w > 0).sum()) for w in writes.values())}/{n_pe}")
    return switch_ok
