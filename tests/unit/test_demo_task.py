"""The demo's target task: Fashion-MNIST with relabelled photographic negatives."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adafilter.data import fashion_mnist as fm
from helpers import make_fashion


def test_negatives_invert_and_relabel_a_fixed_half(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm", n_train=400, n_test=200)
    plain = fm.load(root, seed=0)
    neg = fm.load_negatives(root, seed=0)
    again = fm.load_negatives(root, seed=7)  # which images are negatives ignores the run seed
    for split, p, n, a in zip(("train", "eval"), plain, neg, again, strict=True):
        mask = fm.negative_mask(len(p), split)
        assert 0.35 < mask.mean() < 0.65
        assert np.array_equal(n.source.images, a.source.images) and n.samples == a.samples
        for i, ((_, y), (_, yn)) in enumerate(zip(p.samples, n.samples, strict=True)):
            img, img_n = p.source.images[i], n.source.images[i]
            if mask[i]:
                assert yn == (y + 5) % 10
                assert np.array_equal(img_n.astype(int), 255 - img.astype(int))
            else:
                assert yn == y and np.array_equal(img_n, img)
        assert n.classes == p.classes
