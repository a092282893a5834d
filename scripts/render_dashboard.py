#!/usr/bin/env python3
"""Draw the key panels of grafana/ca-watchdog.json from a lab failover, for the README.

The data are Prometheus range queries of the dashboard's panels, kept by the lab test that runs a
real Prometheus through a failover:

    CA_WATCHDOG_DASHBOARD_DATA=/tmp/dashboard.json \\
        .venv/bin/python -m pytest tests/scenarios/test_prometheus_lab.py -k master_ca_killed
    .venv/bin/python scripts/render_dashboard.py --data /tmp/dashboard.json --out docs/dashboard.png

Needs matplotlib (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.axes import Axes

Series = list[tuple[str, list[float], list[float]]]


def series(run: dict[str, Any], title: str, legend: str, query: int = 0) -> Series:
    """(label, seconds since the kill, values) of one panel query; `legend` formats the labels like
    Grafana's legendFormat ({{member}}), `instance` shown as the member it belongs to."""
    out: Series = []
    for r in run["panels"][title][query]["result"]:
        labels = dict(r["metric"])
        if "instance" in labels:
            labels["instance"] = run["members"].get(labels["instance"], labels["instance"])
        name = legend
        for k, v in labels.items():
            name = name.replace("{{" + k + "}}", v)
        xs = [float(t) - run["killed_at"] for t, _ in r["values"]]
        ys = [float(v) for _, v in r["values"]]
        out.append((name, xs, ys))
    return sorted(out)


def plot(ax: Axes, data: Series, title: str, unit: str = "", step: bool = False) -> None:
    for name, xs, ys in data:
        ys = [math.nan if math.isinf(y) else y for y in ys]
        if step:
            ax.step(xs, ys, where="post", label=name, linewidth=2)
        else:
            ax.plot(xs, ys, label=name, linewidth=1.5)
    ax.axvline(0, color="red", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("seconds since the master CA was killed", fontsize=8)
    if unit:
        ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def roles_table(ax: Axes, run: dict[str, Any]) -> None:
    """The 'Cluster roles' table at the end of the run (after the failover)."""
    cols = ("serving master", "leader key", "CS.cfg role", "CA up")
    rows: dict[str, dict[str, str]] = {}
    for query, col in enumerate(cols):
        for r in run["panels"]["Cluster roles"][query]["result"]:
            member, last = r["metric"]["member"], r["values"][-1]
            if float(last[0]) < run["end"] - 5:
                continue  # a role the member no longer has
            value = r["metric"]["role"] if col == "CS.cfg role" else ("yes" if float(last[1]) == 1 else "no")
            rows.setdefault(member, {})[col] = value
    cells = [[m, *(rows[m].get(c, "") for c in cols)] for m in sorted(rows)]
    ax.axis("off")
    ax.set_title(f"Cluster roles ({run['new_master']} took over)", fontsize=11, loc="left")
    table = ax.table(cellText=cells, colLabels=("member", *cols), loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1, 2.2)
    for (row, _), cell in table.get_celld().items():
        if row > 0 and cells[row - 1][1] == "yes":
            cell.set_facecolor("#d8f0d8")


def render(run: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(3, 2, figsize=(13, 11))
    roles_table(axes[0][0], run)
    plot(axes[0][1], series(run, "Serving master by member", "{{member}}"), "Serving master by member", step=True)
    plot(axes[1][0], series(run, "CRL number", "{{issuing_point}}"), "CRL number", step=True)
    plot(axes[1][1], series(run, "CRL age", "{{issuing_point}}"), "CRL age", "s")
    plot(axes[2][0], series(run, "Replication lag", "{{member}} from replica {{replica_id}}"), "Replication lag", "s")
    plot(axes[2][1], series(run, "Cycle time (p99)", "{{instance}}"), "Cycle time (p99)", "s")
    fig.suptitle("ca-watchdog dashboard: a lab failover (the master's CA killed at 0 s)", fontsize=13)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the JSON the lab test kept (CA_WATCHDOG_DASHBOARD_DATA)")
    ap.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = ap.parse_args()
    render(json.loads(args.data.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
