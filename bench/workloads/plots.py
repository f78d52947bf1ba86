"""The packer report's figures: latency CDF, instances over time, cost per policy (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from veil.packer.metrics import InstanceSpan, RequestRecord, timeline  # noqa: E402

COLORS = {"per-model": "tab:gray", "sesemi": "tab:orange", "veil": "tab:blue"}


def latency_cdf(runs: dict[str, list[RequestRecord]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in runs.items():
        lat = np.sort([r.latency_s * 1000 for r in records if r.ok])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=name, color=COLORS.get(name))
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.axhline(0.99, color="k", lw=0.5, ls=":")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def instances_over_time(runs: dict[str, tuple[list[InstanceSpan], float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (spans, end) in runs.items():
        steps = [(0.0, 0), *timeline(spans, end)]
        t = [s[0] for s in steps]
        n = [s[1] for s in steps]
        ax.step(t, n, where="post", label=name, color=COLORS.get(name))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("instances alive")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_bars(summaries: dict[str, dict[str, dict]], path: Path, title: str) -> None:
    """`summaries`: {run label: {policy: summary}}; one group of bars per run."""
    fig, axes = plt.subplots(1, len(summaries), figsize=(4 * len(summaries), 4), squeeze=False)
    for ax, (label, per) in zip(axes[0], summaries.items(), strict=True):
        names = list(per)
        values = [per[n]["gb_s"] for n in names]
        ax.bar(names, values, color=[COLORS.get(n) for n in names])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_ylabel("GB-seconds")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
