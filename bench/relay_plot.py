"""
The relay benchmark's picture: relay.json -> relay.png (matplotlib, from the
bench's own venv in bench/.peers; bench/relay_bench.py calls it).

Run: ``bench/.peers/venv/bin/python bench/relay_plot.py relay.json relay.png``.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {
    "consoleproxy": "#1f77b4",
    "consoleproxy /rfb": "#1f77b4",
    "consoleproxy, Argon2 user": "#9ecae1",
    "guacamole-lite": "#ff7f0e",
    "websockify": "#2ca02c",
    "direct TCP": "#b0b0b0",
    "direct TCP (VNC)": "#b0b0b0",
}


def med(runs: list[dict[str, Any]], key: str) -> float:
    """Median of one figure over runs."""
    return statistics.median(r[key] for r in runs)


def bars(ax: Any, groups: list[str], series: dict[str, list[float]], unit: str) -> None:
    """Grouped bars, one group per case, one bar per target, values written on them."""
    width = 0.8 / len(series)
    for n, (name, values) in enumerate(series.items()):
        xs = [g + (n - (len(series) - 1) / 2) * width for g in range(len(groups))]
        drawn = ax.bar(xs, values, width, label=name, color=COLOURS.get(name))
        ax.bar_label(drawn, labels=[f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)


def latency_panel(ax: Any, lat: dict[str, Any]) -> None:
    """p50 and p99 per target, 1 and 100 sessions."""
    series = {}
    for name in ("consoleproxy", "guacamole-lite", "direct TCP"):
        for q in ("p50", "p99"):
            series[f"{name} {q}"] = [med(lat[c][name], f"{q}_us") for c in lat]
    width = 0.8 / len(series)
    for n, (name, values) in enumerate(series.items()):
        xs = [g + (n - (len(series) - 1) / 2) * width for g in range(len(lat))]
        target = name.rsplit(" ", 1)[0]
        drawn = ax.bar(
            xs,
            values,
            width,
            label=name,
            color=COLOURS[target],
            hatch="//" if name.endswith("p99") else None,
            edgecolor="white",
        )
        ax.bar_label(drawn, labels=[f"{v:.0f}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(lat)), [f"{c} session(s)" for c in lat])
    ax.set_yscale("log")
    ax.set_ylabel("µs (log)")
    ax.set_title("Round trip browser → guacd echo → browser")
    ax.legend(fontsize=6, ncol=3)


def capacity_panels(ax_setup: Any, ax_idle: Any, results: dict[str, Any]) -> None:
    """Set-up rate, and RSS per idle session against the goal."""
    setup = results["setup"]
    ax = ax_setup
    names = list(next(iter(setup.values())))
    series = {n: [med(setup[c][n], "rate") for c in setup] for n in names}
    bars(ax, [f"{c} in flight" for c in setup], series, "sessions per s")
    ax.set_yscale("log")
    ax.set_ylabel("sessions per s (log)")
    ax.set_title("Session set-up rate (token → ready)")
    cap = results["capacity"]
    ax = ax_idle
    names = list(cap)
    values = [cap[n]["kib_per_session"] for n in names]
    drawn = ax.bar(range(len(names)), values, color=[COLOURS[n] for n in names])
    ax.bar_label(
        drawn,
        labels=[
            f"{v:.1f} KiB\n({cap[n]['alive']} held)" for v, n in zip(values, names, strict=True)
        ],
        fontsize=8,
    )
    ax.axhline(64, color="red", linestyle="--", linewidth=1, label="goal: 64 KiB")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("KiB RSS per idle session")
    ax.set_ylim(0, max([*values, 64]) * 1.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Idle sessions: {results['plan']['idle_sessions']} opened")


def main() -> None:
    """Draw the six panels."""
    with open(sys.argv[1]) as f:
        results = json.load(f)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    t = results["throughput"]
    for ax, workload in zip(axes[0][:2], ("blob", "small"), strict=True):
        cases = [c for c in t if c.startswith(workload + "/")]
        targets = ["consoleproxy", "guacamole-lite", "direct TCP"]
        series = {name: [med(t[c][name], "mbps") for c in cases] for name in targets}
        bars(ax, [f"{c.split('/')[1]} session(s)" for c in cases], series, "MB/s")
        ax.set_yscale("log")
        ax.set_title(f"Throughput guacd → browser, {workload} stream")
    latency_panel(axes[0][2], results["latency"])
    capacity_panels(axes[1][0], axes[1][1], results)
    rfb = results["rfb"]
    targets = ["consoleproxy /rfb", "websockify", "direct TCP (VNC)"]
    series = {name: [med(rfb[c][name], "mbps") for c in rfb] for name in targets}
    bars(axes[1][2], [f"{c} session(s)" for c in rfb], series, "MB/s")
    axes[1][2].set_yscale("log")
    axes[1][2].set_title("Raw VNC relay (same RFB stream)")
    fig.suptitle(
        f"consoleproxy relay benchmark, {results['date']}: {results['machine']}; "
        f"median of {results['plan']['runs']} runs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
