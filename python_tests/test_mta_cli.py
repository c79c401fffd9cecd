"""The experiment's command line (python -m xma2_ops.mta, the xma2-mta script, the example scripts):
the full default arguments are the old example's, the OpenMP wait policy, the entry points."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xma2_ops.mta import ShiftLevels
from xma2_ops.mta.experiment import cli, quick, threads
from xma2_ops.mta.experiment.runs import method_list, ref_label

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# vars(parse_args([])) of examples/train_mta.py before the move (commit 8ec8ae6): the full default run
OLD_DEFAULTS = {
    'out': 'xma2_out', 'quick': False, 'data_root': None, 'tasks': None, 'arch': 'small', 'backbone_weights': None,
    'width': 24, 'xbar': 128, 'rows': 128, 'cols': 128, 'adc_clip': 'percentile', 'adc_percentile': 99.99,
    'adc_batches': 4, 'methods': ['finetune', 'classifier', 'piggyback', 'xbm', 'xma', 'pe', 'xma2'],
    'budgets': [0.05, 0.1, 0.2], 'selection': 'sensitivity', 'also': [], 'shared_bn': [], 'weight_only_also': [],
    'n_source': 4000, 'n_train': 1500, 'n_test': 1000, 'backbone_epochs': 6, 'stage1_epochs': 1, 'stage2_epochs': 6,
    'hw_epochs': 1, 'lr_weight': 0.003, 'lr_head': 0.01, 'lr_mask': 0.0001, 'lr_scale': 0.01, 'optimizer': 'adam',
    'batch': 64, 'eval_batch': 100, 'seed': 0, 'seeds': 1, 'threads': 0, 'no_progress': False, 'device': None,
    'device_chips': 3, 'device_n_test': 300, 'deploy': False, 'noise_aware': False, 'cifar': False}
# ... changed on purpose since (the deployment issue): >= 5 chips, every test image, the --deploy modes
DEVICE_DEFAULTS = {'device_chips': 5, 'device_n_test': 0, 'deploy': ['naive'], 'chip_aware_epochs': 1,
                   'device_workers': min(2, os.cpu_count() or 1), 'sensing': 'per_polarity',
                   'verify_tolerance': None, 'verify_max_pulses': None, 'remap_stuck': False, 'adapters_from': None,
                   'sensitivity_batches': 4, 'probe_head_epochs': 0, 'shift_levels': [-2, 1],
                   # since issue 18's eleventh round: the tier-1 budget in cells, the per-cell snip score
                   'budget_unit': 'cells', 'criterion': 'snip_per_cell',
                   'validate': 0,  # since the thirteenth round: evaluation on the test images unless --validate N
                   # ... and a learning rate of its own for the re-programmed PEs' weights (docs/MTA.md)
                   'lr_reprogrammed': 0.01}
OLD_RUNS = ['finetune', 'classifier', 'piggyback', 'xbm', 'xma', 'pe@5%/snip', 'pe@10%/snip', 'pe@20%/snip',
            'xma2@5%/snip', 'xma2@10%/snip', 'xma2@20%/snip']
CELL_RUNS = [r if "@" not in r else r.replace("%/snip", "%cells/snip_per_cell") for r in OLD_RUNS]
# ... and of --quick (the old example's; quick now also restricts the built-in tasks to 2)
OLD_QUICK = {**OLD_DEFAULTS, 'quick': True, 'width': 8, 'budgets': [0.1], 'also': ['xma2@10%/delta'],
             'weight_only_also': ['xma2@10%'], 'n_source': 1024, 'n_train': 256, 'n_test': 100, 'backbone_epochs': 3,
             'stage2_epochs': 1, 'device_n_test': 50}


def test_full_default_arguments_are_the_old_examples():
    args = cli.parse_args([])
    assert vars(args) == {**OLD_DEFAULTS, **DEVICE_DEFAULTS}
    assert [r.label for r in method_list(args)] == CELL_RUNS and all(r.hw for r in method_list(args))
    old = cli.parse_args(["--budget-unit", "pes", "--criterion", "snip"])  # the earlier default, two flags away
    assert [r.label for r in method_list(old)] == OLD_RUNS
    q = cli.parse_args(["--quick"])
    # the other deliberate changes of --quick: 2 tasks; the PE budget's snip still runs (--also), and
    # the ablation is of the default (cell) budget
    quick_now = {**OLD_QUICK, **DEVICE_DEFAULTS, "device_n_test": 50, "also": ["xma2@10%/delta", "xma2@10%/snip"],
                 "weight_only_also": ["xma2@10%cells"]}
    assert vars(q) == {**quick_now, "tasks": quick.TASKS}
    assert vars(cli.parse_args(["--quick", "--tasks", "animals"])) == {**quick_now, "tasks": ["animals"]}
    assert cli.parse_args(["--quick", "--data-root", "d"]).tasks is None  # folder tasks: all of them


def test_budget_unit_and_criterion_reach_the_sweep_and_the_targets():
    args = cli.parse_args(["--methods", "pe", "xma2", "--budgets", "0.1", "--budget-unit", "cells", "--criterion",
                           "snip_per_cell", "--also", "xma2@10%/snip", "--shared-bn", "xma2@5%"])
    assert [r.label for r in method_list(args)] == [
        "pe@10%cells/snip_per_cell", "xma2@10%cells/snip_per_cell", "xma2@10%/snip", "xma2@5%/snip_per_cell/sharedBN"]
    assert ref_label(args) == "xma2@10%cells/snip_per_cell"
    assert ref_label(cli.parse_args([])) == "xma2@10%cells/snip_per_cell"
    assert ref_label(cli.parse_args(["--selection", "learned"])) == "xma2@10%cells/learned"
    assert ref_label(cli.parse_args(["--budget-unit", "pes", "--criterion", "snip"])) == "xma2@10%/snip"


def test_shift_levels_reach_every_run_and_the_targets():
    """--shift-levels sets MethodSpec.levels of every run (the sweep, --also, --shared-bn, the ablation);
    the labels of the methods that use them (xma, xma2) and the targets' method name them."""
    args = cli.parse_args(["--methods", "finetune", "xma", "xma2", "--budgets", "0.1", "--budget-unit", "cells",
                           "--criterion", "snip_per_cell", "--shift-levels", "-4", "2", "--also", "xma2@10%/snip",
                           "--shared-bn", "xma", "--weight-only-also", "xma2@10%"])
    runs = method_list(args)
    assert {r.spec.levels for r in runs} == {ShiftLevels(-4, 2)}
    assert [r.label for r in runs] == [
        "finetune", "xma/shift-4..2", "xma2@10%cells/snip_per_cell/shift-4..2", "xma2@10%/snip/shift-4..2",
        "xma/shift-4..2/sharedBN", "xma2@10%/snip_per_cell/shift-4..2/weight-only"]
    assert ref_label(args) == "xma2@10%cells/snip_per_cell/shift-4..2"
    # the default levels are the default labels (and the runs from before the flag)
    assert {r.spec.levels for r in method_list(cli.parse_args([]))} == {ShiftLevels()}
    assert cli.parse_args(["--shift-levels", "-2", "1"]).shift_levels == [ShiftLevels.k_min, ShiftLevels.k_max]


@pytest.mark.parametrize("argv, modes", [
    ([], ["naive"]), (["--deploy"], ["calibrated"]), (["--deploy", "naive", "calibrated", "chip-aware"],
                                                     ["naive", "calibrated", "chip-aware"]),
    (["--deploy", "chip-aware", "chip-aware", "naive"], ["chip-aware", "naive"])])
def test_deploy_modes(argv, modes):
    assert cli.parse_args(["--device", "typical"] + argv).deploy == modes


@pytest.mark.parametrize("argv, message", [
    (["--deploy", "naive"], "--deploy needs --device"), (["--device", "typical", "--deploy", "calibrate"], "invalid choice"),
    (["--device", "typical", "--device-n-test", "-1"], "--device-n-test"),
    (["--device", "typical", "--device-workers", "0"], "--device-workers"),
    (["--verify-tolerance", "0.5"], "--verify-tolerance/--verify-max-pulses/--remap-stuck need --device"),
    (["--remap-stuck"], "--remap-stuck need --device"),
    (["--device", "typical", "--verify-max-pulses", "3"], "--verify-max-pulses needs --verify-tolerance"),
    (["--device", "typical", "--verify-tolerance", "-1"], "verify_tolerance: expected a value"),
    (["--device", "typical", "--verify-tolerance", "0.5", "--verify-max-pulses", "0"], "verify_max_pulses"),
    (["--sensing", "both"], "invalid choice"),
    (["--device", "typical", "--chip-aware-epochs", "-1"], "--chip-aware-epochs"),
    (["--sensitivity-batches", "0"], "--sensitivity-batches: expected >= 1"),
    (["--probe-head-epochs", "-1"], "--probe-head-epochs >= 0"),
    (["--shift-levels", "1", "-2"], "--shift-levels: ShiftLevels: k_min (1) must be <= k_max (-2)"),
    (["--shift-levels", "-200", "1"], "--shift-levels: MethodSpec.levels: expected exponents in [-126, 127]"),
    (["--shift-levels", "-2"], "--shift-levels: expected 2 arguments"),
    (["--validate", "-1"], "--validate: expected >= 0 images, got -1"),
    (["--validate", "10", "--adapters-from", "d"], "--validate trains new adapters")])
def test_deploy_refusals(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert message in str(e.value) + capsys.readouterr().err


def test_reexec_sets_a_passive_policy_when_unset():
    env, calls = {}, []
    cmd = threads.reexec_with_passive_wait_policy(["--quick", "--out", "x"], env, lambda exe, argv: calls.append(argv))
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert calls == [cmd] == [[sys.executable, "-m", "xma2_ops.mta", "--quick", "--out", "x"]]
    # the new process finds the variable set: no second exec (no loop)
    assert threads.reexec_with_passive_wait_policy(["--quick"], env, lambda *a: calls.append(a)) is None
    assert len(calls) == 1


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}, {"OMP_WAIT_POLICY": ""}])
def test_reexec_keeps_the_users_policy(user):
    env, calls = dict(user), []
    assert threads.reexec_with_passive_wait_policy(["--quick"], env, lambda *a: calls.append(a)) is None
    assert env == user and calls == []
    env = dict(user)
    assert threads.set_passive_wait_policy(env) is False and env == user
    env = {}
    assert threads.set_passive_wait_policy(env) is True and env == {"OMP_WAIT_POLICY": "PASSIVE"}


def _seen_policy(cmd, env) -> str:
    """Run ``cmd`` (which must print the child's OMP_WAIT_POLICY via sitecustomize) and return it."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_python_m_runs_with_a_passive_policy_unless_set(tmp_path, user):
    """python -m xma2_ops.mta re-executes once with OMP_WAIT_POLICY=PASSIVE; a user's value is kept.
    (device-sweep --help exits before any work; the policy is read back in the process that runs.)"""
    probe = tmp_path / "sitecustomize.py"  # runs in every interpreter started with this PYTHONPATH
    probe.write_text("import atexit, os\n"
                     "atexit.register(lambda: print('POLICY=' + os.environ.get('OMP_WAIT_POLICY', '-')))\n")
    env = {k: v for k, v in ENV.items() if k not in threads.USER_VARIABLES}
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    if user:
        env["OMP_WAIT_POLICY"] = user
    out = _seen_policy([sys.executable, "-m", "xma2_ops.mta", "device-sweep", "--help"], env)
    assert "--sigmas" in out and out.count("POLICY=") == 1  # one process ran to the end (exec replaced the first)
    assert f"POLICY={user or 'PASSIVE'}" in out
    out = _seen_policy([sys.executable, str(ROOT / "examples" / "train_mta.py"), "--help"], env)
    assert "--weight-only-also" in out and f"POLICY={user or 'PASSIVE'}" in out


def test_console_script_and_main_module_entry_points():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]' in text and 'xma2-mta = "xma2_ops.mta.experiment.cli:console_main"' in text
    assert callable(cli.console_main)
    assert (ROOT / "xma2_ops" / "mta" / "__main__.py").exists()
    for script in ("train_mta.py", "device_sweep.py"):
        assert len((ROOT / "examples" / script).read_text().splitlines()) <= 100


def test_cli_help_lists_the_example_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--quick", "--data-root", "--arch", "--backbone-weights", "--device", "--deploy", "--noise-aware",
                 "--weight-only-also", "--shared-bn", "--seeds", "--threads", "--no-progress"):
        assert flag in out


def test_chip_aware_refused_under_torchrun(monkeypatch):
    """Each rank would adapt its own copy on its own shard and the summed counts would mix models."""
    import torch
    from xma2_ops.mta.experiment import evaluate
    monkeypatch.setattr(evaluate, "is_dist", lambda: True)
    args = cli.parse_args(["--device", "typical", "--deploy", "naive", "chip-aware"])
    data = (torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(SystemExit, match="chip-aware: not supported under torchrun"):
        evaluate.evaluate_device(None, data, args, False, "", data)


def test_sensing_and_write_verify_reach_the_layers_and_the_chips():
    from xma2_ops import DeviceModel
    from xma2_ops.mta.experiment import backbone, evaluate
    args = cli.parse_args(["--device", "chen2017", "--sensing", "differential", "--verify-tolerance", "0.25",
                           "--verify-max-pulses", "20", "--remap-stuck"])
    assert backbone.xbar_config(args).sensing == "differential"
    assert evaluate.device_model(args) == dataclasses.replace(DeviceModel.preset("chen2017"), verify_tolerance=0.25,
                                                              verify_max_pulses=20, remap_stuck=True)
    plain = cli.parse_args(["--device", "chen2017"])
    assert backbone.xbar_config(plain).sensing == "per_polarity"
    assert evaluate.device_model(plain) == DeviceModel.preset("chen2017")
    src = ((None, [0] * 40), None)
    # another sensing is another cached backbone (its input ranges see the ADC); the default key is unchanged
    assert backbone.backbone_key(args, src) != backbone.backbone_key(plain, src)
    assert backbone.backbone_key(plain, src) == backbone.backbone_key(cli.parse_args([]), src)


def test_chip_aware_schedule_follows_the_training_flags():
    """The chip-aware adaption trains --chip-aware-epochs at the ADC-aware rates and re-selects with the
    probe's --sensitivity-batches (it was fixed at the Schedule default)."""
    from xma2_ops.mta.experiment.evaluate import chip_schedule
    args = cli.parse_args(["--chip-aware-epochs", "2", "--sensitivity-batches", "9", "--lr-weight", "0.5",
                           "--lr-reprogrammed", "0.25", "--optimizer", "sgd"])
    s = chip_schedule(args)
    assert (s.stage1_epochs, s.stage2_epochs, s.hw_epochs) == (0, 0, 2)
    assert (s.sensitivity_batches, s.lr_weight, s.lr_reprogrammed, s.optimizer) == (9, 0.5, 0.25, "sgd")


def test_targets_compare_with_the_runs_of_the_same_shift_levels():
    """With --shift-levels the targets compare xma2 with xma of the same levels and with pe (no levels)."""
    from xma2_ops.mta.experiment.targets import check_targets
    ref = "xma2@10%cells/snip_per_cell/shift-4..2"
    acc = {"finetune": 90.0, ref: 88.0, "xma/shift-4..2": 89.0, "xma": 80.0, "piggyback": 85.0, "xbm": 84.0}
    summary = [{"task": t, "method": m, "acc": a, "energy_uJ": 50.0 if m == "finetune" else 5.0}
               for m, a in acc.items() for t in ("a", "AVERAGE")]
    paired = [{"method": "pe@10%cells/snip_per_cell", "task": "AVERAGE", "diff": 0.5, "ci95_lo": 0.1, "ci95_hi": 0.9,
               "n": 5}]
    met = {t["target"]: t["met"] for t in check_targets(summary, paired, ref)}
    assert met == {f"{ref} average within 1 point of finetune": False,
                   f"{ref} >= 10x less re-programming energy than finetune": True,
                   f"{ref} above piggyback on every task": True, f"{ref} above xbm on every task": True,
                   f"{ref} above xma/shift-4..2 on every task": False,
                   f"{ref} above pe@10%cells/snip_per_cell by more than the paired 95 % interval": True}


def test_full_run_estimate_counts_each_runs_own_epochs(monkeypatch):
    """The --quick run's estimate of the full run: stage 1 only for the runs whose selection trains one
    (here the weight-change criterion), the head-only probe epochs for the snip probes, no ADC-aware
    epoch for the weight-only ablation."""
    from xma2_ops.mta.experiment import estimate
    t = {"step_weight_only_s": 1e-3, "step_quantised_s": 1e-2, "eval_per_image_s": 1e-4}
    monkeypatch.setattr(estimate, "measure", lambda *a: t)
    full = cli.parse_args(["--methods", "finetune", "xma2", "--budgets", "0.1", "--also", "xma2@10%/delta",
                           "--weight-only-also", "finetune", "--probe-head-epochs", "2", "--stage1-epochs", "3",
                           "--tasks", "animals", "letters", "--seeds", "3", "--n-train", "100", "--batch", "64"])
    e = estimate.full_run_estimate(None, {"a": ((None, None), (None, None))}, full, full, 2)
    images = 128  # two batches of 64 per epoch
    # (weight-only epochs, ADC-aware epochs): finetune 6 + 1; xma2 cells/snip_per_cell 6 + 2 probe + 1;
    # xma2/delta 6 + 3 stage 1 + 1; finetune weight-only 6 + 0
    per_task = sum(wo * images * 1e-3 + hw * images * 1e-2 + 1000 * 1e-4 for wo, hw in [(6, 1), (8, 1), (9, 1), (6, 0)])
    assert e["runs"] == 4 * 2 * 3
    assert e["total_s"] == pytest.approx(per_task * 2 * 3) and e["per_run_s"] == pytest.approx(per_task / 4)


def test_energy_plot_draws_every_method_of_the_default_run_differently(tmp_path, monkeypatch):
    """The default run has 11 methods; each gets its own (marker, colour) pair (finetune and
    xma2@20% were both blue circles)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from xma2_ops.mta.experiment import report
    drawn = []
    plain = Axes.errorbar

    def record(self, x, y, *a, **kw):
        drawn.append((kw["label"], kw["fmt"], kw["color"]))
        return plain(self, x, y, *a, **kw)
    monkeypatch.setattr(Axes, "errorbar", record)
    labels = [r.label for r in method_list(cli.parse_args([]))]
    summary = [{"task": "AVERAGE", "method": m, "acc": 80.0 + i, "acc_std": 0.0, "energy_uJ": float(i),
                "infer_nJ": 9000.0 + i} for i, m in enumerate(labels)]
    report.plot_energy(summary, tmp_path / "e.png", 1)
    assert (tmp_path / "e.png").stat().st_size > 1000
    per_axis = drawn[:len(labels)]
    assert [d[0] for d in per_axis] == labels and drawn[len(labels):] == per_axis  # the same in both panels
    assert len({d[1:] for d in per_axis}) == len(labels)
