"""PNG plots beside the results (matplotlib, Agg backend: no display needed on CI or the 2-core CPU machines).

- robust accuracy vs ε per attack (the audit's sweep: accuracy must fall to ~0 at large ε);
- robust accuracy vs steps (an attack still falling at 2× steps has not converged);
- the sandwich: certified accuracy below, the attacks' worst case above, the band between them shaded;
- the paper's Figure 3 (§3.6): the 3-D embedding sub-spaces of an N_S = 4, d = 3 model trained without
  noise, train and test points coloured by class, showing the clustering of the exponential contrastive loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..config import ExperimentConfig, get_model_config  # noqa: E402
from ..data import CLASSES, Split  # noqa: E402
from ..distances import split_spaces  # noqa: E402
from ..evaluation.certify import CERTIFIED  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


STYLES = {"worst case": {"color": "black", "linestyle": "--", "linewidth": 2},
          CERTIFIED: {"color": "tab:green", "linestyle": ":", "linewidth": 2}}


def _eps_axis(norm: str) -> tuple[float, str]:
    """ε's scale and axis label: ℓ∞ in /255, ℓ2 in pixel units."""
    return (255, "ε (×1/255, ℓ∞)") if norm == "Linf" else (1, "ε (ℓ2, pixel units in [0, 1])")


def plot_eps_curves(curves: dict[str, list[tuple[float, float]]], path: str | os.PathLike, *, title: str = "",
                    norm: str = "Linf") -> Path:
    """Robust accuracy (%) vs ε per attack (ℓ∞: in /255; ℓ2: in pixel units); ``curves`` maps a label to
    [(ε, accuracy), ...]."""
    scale, xlabel = _eps_axis(norm)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        if pts:
            e, a = zip(*sorted(pts))
            style = STYLES.get(label, {})
            ax.plot([v * scale for v in e], a, marker="o", label=label, **style)
    lower, upper = sorted(curves.get(CERTIFIED) or []), sorted(curves.get("worst case") or [])
    if lower and upper:  # where the true robust accuracy lies, between the drawn (straight-line) curves
        lo_e, hi_e = max(lower[0][0], upper[0][0]), min(lower[-1][0], upper[-1][0])
        xs = sorted({e for e, _ in lower + upper if lo_e <= e <= hi_e})
        ys = [np.interp(xs, *zip(*curve)) for curve in (lower, upper)]
        ax.fill_between([v * scale for v in xs], ys[0], ys[1], color="tab:green", alpha=0.12)
    ax.set(xlabel=xlabel, ylabel="robust accuracy (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sandwich(rows: list[dict[str, Any]], path: str | os.PathLike, *, norm: str = "Linf", title: str = "",
                  violations: list[float] | tuple[float, ...] = (),
                  curves: dict[str, list[list[float]]] | None = None) -> Path:
    """Certified accuracy (lower curve) and the attacks' worst case (upper curve) vs ε, the band between them (where
    the true robust accuracy lies) shaded at the ε both hold; ``rows`` hold eps, certified_acc, worst_case_acc;
    ``curves`` ("certified", "worst case": [[ε, %], ...]), where given, draw each side at all of its own ε; ε in
    ``violations`` (a certified figure above the worst case or a certified point broken) marked in red."""
    scale, xlabel = _eps_axis(norm)
    rows = sorted(rows, key=lambda r: r["eps"])
    e = [r["eps"] * scale for r in rows]
    lo, hi = [r["certified_acc"] for r in rows], [r["worst_case_acc"] for r in rows]
    lines = {k: ([p[0] * scale for p in v], [p[1] for p in v]) for k, v in (curves or {}).items() if v}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(e, lo, hi, color="tab:blue", alpha=0.2, label="robust accuracy lies here")
    ax.vlines(e, [min(a, b) for a, b in zip(lo, hi)], [max(a, b) for a, b in zip(lo, hi)], color="tab:blue",
              alpha=0.4)
    ax.plot(*lines.get("worst case", (e, hi)), marker="o", color="black", linestyle="--", linewidth=2,
            label="worst case of the attacks (upper)")
    ax.plot(*lines.get("certified", (e, lo)), marker="s", color="tab:green", linewidth=2, label="certified (lower)")
    bad = [i for i, r in enumerate(rows) if r["eps"] in set(violations)]
    if bad:
        ax.scatter([e[i] for i in bad], [lo[i] for i in bad], marker="x", s=120, color="red", zorder=5,
                   label="SOUNDNESS VIOLATION")
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_steps_curves(curves: dict[str, list[tuple[float, float]]], path: str | os.PathLike, *, eps: float | None = None,
                      norm: str = "Linf") -> Path:
    """Robust accuracy (%) vs the multiple of each attack's default steps/restarts/queries (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        f, a = zip(*sorted(pts))
        ax.plot(f, a, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="× default steps / restarts / queries", ylabel="robust accuracy (%)",
           title=("accuracy vs steps" if eps is None else f"accuracy vs steps at ε = {eps * 255:.0f}/255"
                  if norm == "Linf" else f"accuracy vs steps at ℓ2 ε = {eps:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ Figure 3
def figure3_config(base: ExperimentConfig | None = None) -> ExperimentConfig:
    """§3.6: FULL with N_S = 4, d = 3, trained without noise (``base`` carries any other overrides)."""
    return (base or get_model_config("full")).replace(name="fig3", model={"n_spaces": 4, "d": 3},
                                                      train={"noise": False})


@torch.no_grad()
def figure3_points(net: torch.nn.Module, n_spaces: int, train: Split, test: Split, *, spaces: tuple[int, ...] = (0, 1),
                   max_train: int | None = None) -> dict[str, Any]:
    """Embeddings of train and test images split into sub-spaces: {"train"/"test": {"points": (len(spaces), N, d),
    "labels": (N,)}}; ``max_train`` keeps the first N training images (the scatter needs no more)."""
    from ..defenses.defense import embed_in_batches

    dev = next(net.parameters()).device
    out: dict[str, Any] = {}
    for name, split in (("train", train if max_train is None else train.head(max_train)), ("test", test)):
        sub = split_spaces(embed_in_batches(net, split.x, dev, batch_size=1024).cpu(), n_spaces)[list(spaces)]
        out[name] = {"points": sub, "labels": split.y.cpu()}
    out["spaces"] = list(spaces)
    return out


def plot_figure3(points: dict[str, Any], path: str | os.PathLike) -> Path:
    """The paper's layout: (a) P¹ train, (b) P¹ test, (c) P² train, (d) P² test, one 3-D scatter each."""
    spaces = points["spaces"]
    fig = plt.figure(figsize=(10, 5 * len(spaces)))
    cmap = plt.get_cmap("tab10")
    for row, space in enumerate(spaces):
        for col, split in enumerate(("train", "test")):
            pts, labels = points[split]["points"][row], points[split]["labels"]
            ax = fig.add_subplot(len(spaces), 2, 2 * row + col + 1, projection="3d" if pts.shape[1] == 3 else None)
            coords = [pts[:, i].numpy() for i in range(min(3, pts.shape[1]))]
            size = min(8.0, max(0.3, 20000 / max(len(labels), 1)))  # readable for 100 points and for 50 000
            ax.scatter(*coords, c=[cmap(int(c) % 10) for c in labels], s=size, alpha=0.5)
            letter = "abcdefgh"[2 * row + col]
            ax.set_title(rf"({letter}) $\mathcal{{P}}^{{{space + 1},\mathrm{{{split}}}}}$")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(i), label=c) for i, c in enumerate(CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    return _save(fig, path)


def figure3(data: Any, out_dir: str | os.PathLike, *, base: ExperimentConfig | None = None,
            cache_dir: str | None = None, device: str = "auto", progress: bool = True,
            max_train: int | None = None) -> Path:
    """Train (or load) the Figure 3 model and write ``figure3-<hash>.png`` into ``out_dir``."""
    from ..paper.train import train_model

    cfg = figure3_config(base)
    trained = train_model(cfg, data, device=device, cache_dir=cache_dir, progress=progress)
    pts = figure3_points(trained.net, cfg.model.n_spaces, trained.train_split, data.test, max_train=max_train)
    return plot_figure3(pts, Path(out_dir) / f"figure3-{cfg.config_hash()}.png")
