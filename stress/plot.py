"""``sage-queue bench --plot out.png``: the backend comparison as one figure (matplotlib, optional extra ``plot``).

One panel per measured scenario, bars per backend and anchor: single and batch in
messages/s, pingpong p50 in microseconds (lower is better), large in MB/s. Drawn from the
results dict that ``--json`` writes, so ``plot_results(json.load(f), path)`` redraws an old run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plot_results", "PANELS"]

PANELS: tuple[tuple[str, str, str], ...] = (
    ("single", "msgs_per_s", "single put/get: messages/s"),
    ("batch", "msgs_per_s", "put_many/get_many: messages/s"),
    ("pingpong", "p50_us", "ping-pong p50: us (lower is better)"),
    ("large", "mb_per_s", "1 MiB items: MB/s"),
)
"""(scenario, key, title): ``results["backends"][b][scenario][key]`` maps contender -> number
(for pingpong, contender -> {"p50_us": ...})."""


def _series(results: dict[str, Any], scenario: str, key: str) -> dict[str, float]:
    """contender -> value, over every backend measured (each anchor once, from the first backend that has it)."""
    out: dict[str, float] = {}
    for backend, data in results.get("backends", {}).items():
        section = data.get(scenario) if isinstance(data, dict) else None
        if not section:
            continue
        values = section if scenario == "pingpong" else section.get(key, {})
        for name, value in values.items():
            if name == "runs":
                continue
            number = value.get(key) if isinstance(value, dict) else value
            if isinstance(number, (int, float)) and (name == backend or name not in out):
                out[name] = float(number)
    return out


def plot_results(results: dict[str, Any], path: str) -> int:
    """Draw the panels that have data into ``path`` (PNG); returns the number of panels drawn.

    Raises ImportError naming the extra when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'sage-queue[plot]'") from exc
    panels = [(title, series) for scenario, key, title in PANELS if (series := _series(results, scenario, key))]
    if not panels:
        return 0
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    backends = set(results.get("backends", {}))
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        names = list(series)
        colors = ["tab:blue" if n in backends else "tab:gray" for n in names]
        ax.bar(names, [series[n] for n in names], color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("sage-queue bench (blue: our backends, grey: anchors)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(panels)
