"""Training and evaluation of the top-k classifiers (one MLP per method, same initial weights,
same minibatch order)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..experiments.training import mlp as shared_mlp
from .data import Digits
from .layers import LML, EntropicKSubset, cvxpylayers_layer, folded_layer

__all__ = ["METHODS", "make_loss", "train", "accuracy", "mlp"]

#: method name → (layer kind, entropy); "ce" is plain cross-entropy on the logits
METHODS = {
    "cross-entropy": ("ce", None),
    "LML (closed form)": ("lml", "binary"),
    "folded k-subset (binary H)": ("folded", "binary"),
    "cvxpylayers (exp cone)": ("cvxpylayers", "binary"),
    "closed form (−x log x)": ("lml", "xlogx"),
    "folded k-subset (−x log x)": ("folded", "xlogx"),
}
EPS = 1e-12


def mlp(seed: int) -> nn.Module:
    """64 → 128 → 10, ReLU, float64; weights from ``seed``."""
    return shared_mlp([64, 128, 10], False, seed, torch.float64, torch.device("cpu"))


def make_loss(method: str, k: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss(logits, y)``: cross-entropy, or ``−log p_y`` with ``p`` the k-subset layer's
    output (the LML top-k loss)."""
    kind, entropy = METHODS[method]
    if kind == "ce":
        return nn.functional.cross_entropy
    if kind == "lml":
        fn = LML if entropy == "binary" else EntropicKSubset

        def layer(c: Tensor) -> Tensor:
            return fn.apply(c, float(k))
    elif kind == "folded":
        layer = folded_layer(entropy, float(k))
    else:
        layer = cvxpylayers_layer(10, float(k))

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        p = layer(logits)
        return -torch.log(p.gather(1, y.view(-1, 1)).clamp_min(EPS)).mean()

    return loss


def accuracy(model: nn.Module, x: Tensor, y: Tensor, k: int) -> tuple[float, float]:
    """Top-1 and top-k accuracy of ``model``'s logits."""
    with torch.no_grad():
        logits = model(x)
        top1 = float((logits.argmax(1) == y).double().mean())
        topk = float((logits.topk(k, 1).indices == y.view(-1, 1)).any(1).double().mean())
    return top1, topk


def train(data: Digits, method: str, k: int, epochs: int, seed: int, *, batch: int = 64,
          lr: float = 1e-3, max_batches: int | None = None) -> dict:
    """Adam on the method's loss; per epoch: training seconds, test top-1 / top-k.

    ``max_batches`` stops each epoch early (for timing a slow layer on a subset); the epoch
    time is then extrapolated to the full epoch and flagged with ``extrapolated``.
    """
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = make_loss(method, k)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    nb = (n + batch - 1) // batch
    out: dict = {"epoch_s": [], "top1": [], "topk": [], "extrapolated": False}
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        t0, done = time.perf_counter(), 0
        for b in range(nb):
            if max_batches is not None and b >= max_batches:
                break
            idx = perm[b * batch:(b + 1) * batch]
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        dt = time.perf_counter() - t0
        if done < nb:
            dt, out["extrapolated"] = dt * nb / done, True
        out["epoch_s"].append(dt)
        t1, tk = accuracy(model, data.x_test, data.y_test, k)
        out["top1"].append(t1)
        out["topk"].append(tk)
    return out
