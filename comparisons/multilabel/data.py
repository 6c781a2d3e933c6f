"""scikit-learn's bundled digits (no download) with symmetric label noise: a method-faithful
stand-in for the paper's CIFAR-100 top-k experiment (not its benchmark)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Digits", "load", "symmetric_noise"]


@dataclass
class Digits:
    """Standardised features and labels; training labels noisy, test labels clean.

    Attributes:
        x_train, x_test: ``(N, 64)`` float64; y_train (noisy), y_test (clean): int64;
        y_train_clean: the training labels before noise; flipped: which training labels changed.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    y_train_clean: Tensor
    flipped: Tensor


def symmetric_noise(y: np.ndarray, rate: float, n_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """With probability ``rate`` replace each label by one of the other ``n_classes − 1``
    classes, uniformly."""
    flip = rng.random(len(y)) < rate
    other = (y + rng.integers(1, n_classes, len(y))) % n_classes
    return np.where(flip, other, y)


def load(noise: float = 0.4, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1,797 8×8 digits, a stratified-by-chance split, features standardised on the
    training part, ``noise`` symmetric label noise on the training labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the multilabel suite uses scikit-learn's bundled digits: "
                          "pip install scikit-learn") from exc
    d = load_digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(d.target))
    n_test = int(round(test_fraction * len(perm)))
    te, tr = perm[:n_test], perm[n_test:]
    x = d.data.astype(np.float64)
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    x = (x - mu) / sd
    y = d.target.astype(np.int64)
    noisy = symmetric_noise(y[tr], noise, 10, rng)
    t = torch.as_tensor
    return Digits(t(x[tr]), t(noisy), t(x[te]), t(y[te]), t(y[tr]), t(noisy != y[tr]))
