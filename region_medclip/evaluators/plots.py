"""Evaluation plots saved as PNG: ROC curves, recall@K curves, grounding overlays and a PCA of
the image and text embeddings (the modality gap).

matplotlib is imported inside each function with the non-interactive Agg backend, so evaluation on
a headless host never needs a display.
"""

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC curve of ``scores [N]`` for binary ``labels [N]`` (values other than 0/1
    left out): ``(fpr [K], tpr [K])`` from (0, 0) to (1, 1), one point per distinct score."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    keep = (labels == 0) | (labels == 1)
    scores, positive = scores[keep], labels[keep] == 1
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # A threshold between each run of tied scores: ties move together along the diagonal.
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(positive)[last_of_run]
    fp = np.cumsum(~positive)[last_of_run]
    tpr = np.r_[0.0, tp / max(positive.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~positive).sum(), 1)]
    return fpr, tpr


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projects rows of ``x [N, D]`` onto their first two principal components: ``([N, 2],
    explained variance ratio [2])``."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ratio = s**2 / max((s**2).sum(), 1e-12)
    return centred @ vt[:2].T, ratio[:2]


def plot_roc(probs: np.ndarray, labels: np.ndarray, class_names: list[str], path: str) -> None:
    """One ROC curve per class of ``probs, labels [N, C]``, with its AUROC in the legend."""
    from region_medclip.evaluators import common

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(class_names):
        fpr, tpr = roc_curve(probs[:, c], labels[:, c])
        auc = common.auroc(probs[:, c], labels[:, c])
        ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="zero-shot ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_recall(ranks: dict[str, np.ndarray], path: str, title: str = "retrieval") -> None:
    """Recall@K against K (log scale) for each named set of 1-based ``ranks [Q]``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in ranks.items():
        r = np.asarray(r)
        ks = np.arange(1, int(r.max()) + 1)
        ax.plot(ks, (r[None, :] <= ks[:, None]).mean(1), label=name)
    ax.set_xscale("log")
    ax.set(xlabel="K", ylabel="recall@K", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_grounding(
    images: np.ndarray,
    heatmaps: np.ndarray,
    boxes: np.ndarray,
    titles: list[str],
    path: str,
) -> None:
    """Heatmaps over their images, ground-truth box outlined.

    Args:
      images: ``[K, S, S]`` grayscale (any range).
      heatmaps: ``[K, S, S]`` phrase–pixel similarity.
      boxes: ``[K, 4]`` pixel ``xyxy``.
      titles: ``K`` strings (the phrases).
    """
    plt = _pyplot()
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, box, title in zip(axes.flat, images, heatmaps, boxes, titles, strict=True):
        ax.imshow(image, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.4)
        x0, y0, x1, y1 = box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.5))
        ax.plot(*np.unravel_index(np.argmax(heat), heat.shape)[::-1], "w+", markersize=10)
        ax.set_title(title, fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_pca(zimg: np.ndarray, ztxt: np.ndarray, path: str) -> None:
    """Image and text embeddings ``[N, D]`` on the first two principal components of both, their
    centroids joined by a line: the modality gap."""
    plt = _pyplot()
    both, ratio = pca_2d(np.concatenate([zimg, ztxt]))
    image_xy, text_xy = both[: len(zimg)], both[len(zimg) :]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*image_xy.T, s=6, alpha=0.5, label="images")
    ax.scatter(*text_xy.T, s=6, alpha=0.5, label="reports")
    centres = np.stack([image_xy.mean(0), text_xy.mean(0)])
    ax.plot(*centres.T, "k-o", markersize=5, label="centroids")
    gap = float(np.linalg.norm(np.mean(zimg, 0) - np.mean(ztxt, 0)))
    ax.set(
        xlabel=f"PC1 ({ratio[0]:.0%})",
        ylabel=f"PC2 ({ratio[1]:.0%})",
        title=f"embedding PCA (gap {gap:.3f})",
    )
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: str) -> None:
    """A confusion matrix ``[K, K]`` (rows: true class, columns: predicted; row fractions)."""
    plt = _pyplot()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1))
    ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_detections(images, truths, found, titles: list[str], path: str) -> None:
    """Films ``images [n, S, S]`` with their finding boxes (``truths[i] [G, 4]`` pixel xyxy,
    green) and detections (``found[i]``: ``[(box [4] pixel xyxy, label str)]``, red)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    n = len(images)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3 * max(n, 1), 3.3), squeeze=False)
    if not n:  # a split without finding boxes: say so rather than fail the evaluation
        axes[0, 0].text(0.5, 0.5, "no film with a finding box", ha="center", va="center")
        axes[0, 0].axis("off")
    panels = zip(axes[0][:n], images, truths, found, titles, strict=True)
    for ax, image, truth, boxes, title in panels:
        ax.imshow(image, cmap="gray")
        for x0, y0, x1, y1 in truth:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
        for (x0, y0, x1, y1), label in boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1.2))
            ax.text(x0, y0, label, color="red", fontsize=6, va="bottom")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
