"""The loss curve as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
from typing import Any


def loss_curve_png(losses: list[float], *, title: str = "training loss") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, linewidth=1, color="#1264a3", label="per step")
    if len(losses) >= 10:
        window = max(len(losses) // 20, 5)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        axes.plot(steps, smooth, linewidth=2, color="#e01e5a", label=f"mean of {window}")
        axes.legend()
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per answer token")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _use_cjk_font(font_manager: Any, plt: Any) -> None:
    """Labels are often Chinese: use the Noto Sans CJK font that ships as a Python package
    (cvttf-notosanscjk-regular, SIL Open Font License), else a CJK font the system has."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("cvttf_NotoSansCJK_Regular")
    if spec is not None and spec.submodule_search_locations:
        for path in Path(next(iter(spec.submodule_search_locations))).glob("*.otf"):
            font_manager.fontManager.addfont(str(path))
    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in ("Noto Sans CJK TC", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "SimHei"):
        if name in installed:
            plt.rcParams["font.sans-serif"] = [name, *plt.rcParams["font.sans-serif"]]
            return


def confusion_png(
    labels: list[str],
    columns: list[str],
    matrix: list[list[int]],
    *,
    title: str = "confusion (rows: reference, columns: predicted)",
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    _use_cjk_font(font_manager, plt)
    size = max(4.0, 0.55 * len(columns) + 2)
    figure, axes = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels=labels)
    peak = max((max(row) for row in matrix), default=0)
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            if value:
                axes.text(
                    c,
                    r,
                    str(value),
                    ha="center",
                    va="center",
                    color="white" if value > peak / 2 else "black",
                    fontsize=8,
                )
    axes.set_xlabel("predicted")
    axes.set_ylabel("reference")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def reliability_png(bins: list[dict[str, Any]], *, ece: float, title: str) -> bytes:
    """The reliability diagram: each confidence bin's accuracy against its mean confidence (on
    the diagonal: "90% sure" is right 90% of the time), bar widths the bins, counts annotated."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    _use_cjk_font(font_manager, plt)
    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axes.plot([0, 1], [0, 1], linestyle="--", color="#888888", linewidth=1, label="calibrated")
    for b in bins:
        width = b["hi"] - b["lo"]
        axes.bar(
            b["lo"],
            b["accuracy"],
            width=width,
            align="edge",
            color="#1264a3",
            edgecolor="white",
            alpha=0.85,
        )
        axes.plot(b["confidence"], b["accuracy"], "o", color="#e01e5a", markersize=4)
        axes.annotate(
            str(b["count"]),
            (b["lo"] + width / 2, b["accuracy"]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}\nECE {ece * 100:.1f} points")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def sweep_loss_curves_png(curves: dict[str, list[float]], *, title: str) -> bytes:
    """Every run's training loss on one plot (each run's curve smoothed when long), by label."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    _use_cjk_font(font_manager, plt)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for label, losses in curves.items():
        window = max(len(losses) // 20, 1)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        axes.plot(range(1, len(smooth) + 1), smooth, linewidth=1.5, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per answer token")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def sweep_scores_png(scores: dict[str, tuple[float | None, float | None]], *, title: str) -> bytes:
    """Accuracy and macro-F1 by run (label → (accuracy, macro-F1)); a run without an evaluation
    shows no bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    _use_cjk_font(font_manager, plt)
    labels = list(scores)
    figure, axes = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 4), dpi=100)
    width = 0.4
    for offset, (name, index) in ((-width / 2, ("accuracy", 0)), (width / 2, ("macro-F1", 1))):
        values = [100 * (scores[k][index] or 0.0) for k in labels]
        axes.bar([i + offset for i in range(len(labels))], values, width, label=name)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("%")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
