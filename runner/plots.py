"""The loss curve as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io


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
