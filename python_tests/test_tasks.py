"""The experiment's built-in tasks (data.py): the default set, the textures task's split (train
and test crops from disjoint bands of each picture), its size, balance and seed, and --validate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xma2_ops.mta.experiment import cli, data


def test_default_tasks_replace_the_saturated_sk_digits():
    args = cli.parse_args([])
    assert args.tasks is None and data.DEFAULT_TASKS == ("animals", "textures", "letters", "shapes")
    args = cli.parse_args(["--tasks", "textures", "sk_digits", "--n-train", "200", "--n-test", "100"])
    tasks = data.builtin_tasks(args)
    assert list(tasks) == ["sk_digits", "textures"]  # on request, in the built-in order


@pytest.mark.parametrize("h, w", [(512, 512), (303, 384), (172, 448), (1411, 1411)])
def test_texture_crops_stay_in_their_bands(h, w):
    rng = np.random.default_rng(0)
    edges = np.linspace(0, w, data.TEXTURE_BANDS + 1).astype(int)
    seen = {False: set(), True: set()}
    for _ in range(2000):
        test = bool(rng.integers(2))
        x0, y0, side = data.texture_crop_box(rng, h, w, test)
        band = int(np.searchsorted(edges, x0, side="right")) - 1
        assert edges[band] <= x0 and x0 + side <= edges[band + 1], (x0, side, edges)  # inside one band
        assert 0 <= y0 and y0 + side <= h and side >= min(32, edges[band + 1] - edges[band], h)
        assert (band in data.TEXTURE_TEST_BANDS) == test
        seen[test].add(band)
    assert seen[True] == set(data.TEXTURE_TEST_BANDS)
    assert seen[False] == set(range(data.TEXTURE_BANDS)) - set(data.TEXTURE_TEST_BANDS)


def test_textures_task_size_balance_and_seed():
    (xtr, ytr), (xte, yte) = data.make_textures(300, 100, seed=3)
    assert xtr.shape == (300, 1, 28, 28) and xte.shape == (100, 1, 28, 28)
    assert xtr.dtype == torch.float32 and float(xtr.min()) >= 0 and float(xtr.max()) <= 1
    assert torch.bincount(ytr, minlength=10).tolist() == [30] * 10
    assert torch.bincount(yte, minlength=10).tolist() == [10] * 10
    assert len(set(ytr[:20].tolist())) > 3  # shuffled, not class after class
    again = data.make_textures(300, 100, seed=3)
    assert torch.equal(again[0][0], xtr) and torch.equal(again[1][1], yte)
    assert not torch.equal(data.make_textures(300, 100, seed=4)[0][0], xtr)


def test_validate_holds_images_out_of_a_larger_training_set_and_never_shows_the_test_images():
    argv = ["--tasks", "animals", "textures", "--n-train", "300", "--n-test", "100"]
    plain = data.task_data(cli.parse_args(argv))
    held = data.task_data(cli.parse_args(argv + ["--validate", "80"]))
    larger = data.builtin_tasks(cli.parse_args(argv[:-4] + ["--n-train", "380", "--n-test", "100"]))
    for name in ("animals", "textures"):
        (xtr, ytr), (xva, yva) = held[name]
        assert xtr.shape[0] == 300 and xva.shape[0] == 80 and ytr.shape[0] == 300 and yva.shape[0] == 80
        # the two parts are the larger draw's training images, disjoint, in a seeded order
        pool = larger[name][0][0].flatten(1)
        rows = lambda x: {tuple(r) for r in x.flatten(1).tolist()}  # noqa: E731
        assert rows(xtr) | rows(xva) == rows(pool) and not rows(xtr) & rows(xva)
        assert not rows(xva) & rows(plain[name][1][0]) and not rows(xtr) & rows(plain[name][1][0])
        assert len(set(yva.tolist())) > 3
    again = data.task_data(cli.parse_args(argv + ["--validate", "80"]))
    assert torch.equal(again["textures"][1][0], held["textures"][1][0])
    assert not torch.equal(data.task_data(cli.parse_args(argv + ["--validate", "80", "--seed", "1"]))["animals"][1][0],
                           held["animals"][1][0])
