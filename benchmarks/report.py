"""
From per-run measurements to what a person reads: a table, JSON and a PNG.

`summarize` takes the raw records of a suite run (one per run, chain and
method) and keeps, per method, chain and figure, the median over the runs
that measured it.  Ratios compare ssx with the peers of the same suite run
(ssx/libev, ssx/pproxy, ssx/floor), never with stored numbers, and
`check_targets` holds them against the issue's targets.  `render_table`
prints it all (`render_markdown` too, for RESULTS.md: ``python report.py
results.json``); `write_png` draws the ratios so that up is always better
for ssx, whatever the figure's direction.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steal import HIGH as STEAL_HIGH

__all__ = [
    "FIGURES",
    "Figure",
    "TARGETS",
    "check_targets",
    "ratios",
    "render_markdown",
    "render_table",
    "summarize",
    "write_json",
    "write_png",
]

NA = "n/a"  # does not apply to this chain, or the chain cannot do it yet
FAIL = "FAIL"  # measured, but the load failed or the data did not check out


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    decimals: int


FIGURES = (
    Figure("bulk_up", "bulk upload", "MB/s", True, 0),
    Figure("bulk_down", "bulk download", "MB/s", True, 0),
    Figure("cpu_per_gib", "CPU per GiB relayed", "CPU-s/GiB", False, 2),
    Figure("paced_up", "paced upload", "MB/s", True, 0),
    Figure("paced_down", "paced download", "MB/s", True, 0),
    Figure("paced_cpu_per_gib", "CPU per GiB, paced", "CPU-s/GiB", False, 2),
    Figure("conn_rate", "connection rate", "conn/s", True, 0),
    Figure("conn_p50", "connection latency p50", "ms", False, 2),
    Figure("conn_p99", "connection latency p99", "ms", False, 2),
    Figure("cpu_per_conn", "CPU per connection", "CPU-ms/conn", False, 3),
    Figure("udp_rate", "UDP round trips", "rt/s", True, 0),
    Figure("idle_kib", "idle memory per connection", "KiB/conn", False, 1),
)
_BY_KEY = {f.key: f for f in FIGURES}

# The targets of the issue "Every core, and cheaper connections":
# (what ssx is compared with, comparison, bound).
TARGETS: dict[str, tuple[str, str, float]] = {
    "bulk_up": ("libev", ">=", 1.5),
    "bulk_down": ("libev", ">=", 1.5),
    "cpu_per_gib": ("libev", "<=", 0.67),
    "paced_cpu_per_gib": ("libev", "<=", 0.67),
    "cpu_per_conn": ("libev", "<=", 2.5),
    "udp_rate": ("libev", ">=", 0.5),
    "idle_kib": ("absolute", "<=", 8.0),
}

PEERS = ("libev", "pproxy", "python", "floor")


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float))]
    if numbers:
        return statistics.median(numbers)
    if values and all(v == NA for v in values):
        return NA
    return FAIL if values else None


def summarize(records: list[dict[str, Any]], methods: list[str], chains: list[str]) -> dict[str, Any]:
    """summary[method][chain][figure] = median over runs (or n/a, FAIL, None)."""
    summary: dict[str, Any] = {}
    for method in methods:
        summary[method] = {}
        for chain in chains:
            mine = [r for r in records if r["chain"] == chain and (chain == "floor" or r["method"] == method)]
            summary[method][chain] = {
                f.key: _median([r["figures"].get(f.key) for r in mine if f.key in r["figures"]]) for f in FIGURES
            }
    return summary


def steal_summary(records: list[dict[str, Any]], methods: list[str], chains: list[str]) -> dict[str, Any]:
    """steal[method][chain] = {"max": highest steal of any step in %, "high": whether it passed steal.HIGH}."""
    out: dict[str, Any] = {}
    for method in methods:
        out[method] = {}
        for chain in chains:
            mine = [r for r in records if r["chain"] == chain and (chain == "floor" or r["method"] == method)]
            values = [v for r in mine for v in r.get("steal", {}).values() if isinstance(v, (int, float))]
            peak = max(values) if values else None
            out[method][chain] = {"max": peak, "high": peak is not None and peak > STEAL_HIGH}
    return out


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    """ratios[method][figure]["ssx/PEER"] = ssx's median / the peer's median."""
    out: dict[str, Any] = {}
    for method, by_chain in summary.items():
        out[method] = {}
        ssx = by_chain.get("ssx", {})
        for f in FIGURES:
            row = {}
            for peer in PEERS:
                mine, theirs = ssx.get(f.key), by_chain.get(peer, {}).get(f.key)
                if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                    row[f"ssx/{peer}"] = mine / theirs
            out[method][f.key] = row
    return out


def check_targets(summary: dict[str, Any], ratio_table: dict[str, Any]) -> dict[str, Any]:
    """targets[method][figure] = {target, value, met (True/False/None if unmeasured)}."""
    out: dict[str, Any] = {}
    for method in summary:
        out[method] = {}
        for key, (against, op, bound) in TARGETS.items():
            if against == "absolute":
                value = summary[method].get("ssx", {}).get(key)
                text = f"ssx {op} {bound:g} {_BY_KEY[key].unit}"
            else:
                value = ratio_table[method][key].get(f"ssx/{against}")
                text = f"ssx/{against} {op} {bound:g}"
            met = None
            if isinstance(value, (int, float)):
                met = value >= bound if op == ">=" else value <= bound
            out[method][key] = {"target": text, "value": value, "met": met}
    return out


def _cell(value: Any, decimals: int) -> str:
    if isinstance(value, (int, float)):
        return f"{value:,.{decimals}f}"
    return "-" if value is None else str(value)


def _steal_row(stolen: dict[str, Any] | None, method: str, chains: list[str]) -> tuple[list[str], bool] | None:
    """The table row of each chain's highest steal, '!' where it passed STEAL_HIGH."""
    if not stolen or method not in stolen:
        return None
    cells = []
    for chain in chains:
        entry = stolen[method].get(chain, {})
        peak = entry.get("max")
        cells.append("-" if peak is None else f"{peak:.1f}" + ("!" if entry.get("high") else ""))
    flagged = any(stolen[method].get(c, {}).get("high") for c in chains)
    return ["hypervisor steal, max", "%"] + cells, flagged


def render_table(
    summary: dict[str, Any], ratio_table: dict[str, Any], targets: dict[str, Any], chains: list[str],
    stolen: dict[str, Any] | None = None,
) -> str:
    """One block per method: each chain's medians, the ratios, the targets, and the steal seen."""
    lines: list[str] = []
    peers = [p for p in PEERS if p in chains and "ssx" in chains]
    header = ["figure", "unit"] + chains + [f"ssx/{p}" for p in peers] + ["target", "met"]
    for method, by_chain in summary.items():
        rows = [header]
        for f in FIGURES:
            row = [f.label, f.unit]
            row += [_cell(by_chain[c][f.key], f.decimals) for c in chains]
            row += [_cell(ratio_table[method][f.key].get(f"ssx/{p}"), 2) for p in peers]
            target = targets[method].get(f.key)
            if target:
                row += [target["target"], {True: "yes", False: "NO", None: "-"}[target["met"]]]
            else:
                row += ["", ""]
            rows.append(row)
        steal_row = _steal_row(stolen, method, chains)
        if steal_row:
            cells, flagged = steal_row
            rows.append(cells + [""] * len(peers) + [f"<= {STEAL_HIGH:g}", "NO: rerun" if flagged else "yes"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines.append(f"== {method} ==")
        for n, row in enumerate(rows):
            cells = [c.ljust(w) if i < 2 or i >= len(row) - 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
    return "\n".join(lines)


def render_markdown(
    summary: dict[str, Any], ratio_table: dict[str, Any], targets: dict[str, Any], chains: list[str],
    stolen: dict[str, Any] | None = None,
) -> str:
    """The table of `render_table` as Markdown, for RESULTS.md."""
    peers = [p for p in PEERS if p in chains and "ssx" in chains]
    lines: list[str] = []
    for method, by_chain in summary.items():
        lines += [f"### {method}", ""]
        header = ["figure", "unit", *chains, *(f"ssx/{p}" for p in peers), "target", "met"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(chains) + len(peers)) + ["---", "---"]) + "|")
        for f in FIGURES:
            row = [f.label, f.unit]
            row += [_cell(by_chain[c][f.key], f.decimals) for c in chains]
            row += [_cell(ratio_table[method][f.key].get(f"ssx/{p}"), 2) for p in peers]
            target = targets[method].get(f.key)
            if target:
                row += [target["target"].replace(">=", "≥").replace("<=", "≤"),
                        {True: "yes", False: "**no**", None: "-"}[target["met"]]]
            else:
                row += ["", ""]
            lines.append("| " + " | ".join(row) + " |")
        steal_row = _steal_row(stolen, method, chains)
        if steal_row:
            cells, flagged = steal_row
            cells += [""] * len(peers) + [f"≤ {STEAL_HIGH:g} (else not a result)", "**no: rerun**" if flagged else "yes"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def write_png(path: Path, summary: dict[str, Any], ratio_table: dict[str, Any], title: str) -> str | None:
    """Bar chart of ssx against each peer, up = better for ssx; why not, if it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
    except ImportError:
        return "matplotlib is not installed"
    methods = list(ratio_table)
    figures = [f for f in FIGURES if f.key != "conn_p50"]
    panels = [p for p in ("libev", "pproxy", "python") if any(f"ssx/{p}" in ratio_table[m][f.key] for m in methods for f in figures)]
    if not panels:
        return "no ratio of ssx to libev or pproxy to draw"
    fig, axes = plt.subplots(len(panels), 1, figsize=(15, 5.2 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    for ax, peer in zip(axes[:, 0], panels):
        shown = [1.0]
        for m_index, method in enumerate(methods):
            for f_index, f in enumerate(figures):
                raw = ratio_table[method][f.key].get(f"ssx/{peer}")
                x = f_index + (m_index - (len(methods) - 1) / 2) * width
                if raw is None or raw <= 0:
                    ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
                    continue
                advantage = raw if f.higher_is_better else 1 / raw
                shown.append(advantage)
                # Bars grow from parity (1x): up when ssx is better, down when worse.
                ax.bar(x, advantage - 1, width, bottom=1, color=colors[m_index % len(colors)],
                       label=method if f_index == 0 else None)
                ax.text(x, advantage, f"{raw:.2f}", ha="center", va="bottom" if advantage >= 1 else "top", fontsize=7)
                bound = _target_advantage(f, peer, summary[method])
                if bound is not None:
                    shown.append(bound)
                    ax.plot([x - width / 2, x + width / 2], [bound, bound], color="red", linewidth=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        low, high = min(shown) / 1.6, max(shown) * 1.6
        ax.set_ylim(low, high)
        ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= high]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticklabels([f"{t:g}x" for t in ticks])
        ax.set_xticks(range(len(figures)))
        ax.set_xticklabels(
            [f"{f.label}\n({f.unit}, {'higher' if f.higher_is_better else 'lower'} better)" for f in figures],
            fontsize=8,
        )
        ax.set_ylabel(f"how much better ssx is than {peer}")
        ax.set_title(
            f"ssx vs {peer}: bar up = ssx better, down = worse; number = raw ratio ssx/{peer}"
            + ("; red = the issue's target" if peer == "libev" else ""),
            fontsize=10,
        )
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _target_advantage(figure: Figure, peer: str, by_chain: dict[str, Any]) -> float | None:
    """The issue's target for `figure` in the chart's orientation, if it is against `peer`."""
    target = TARGETS.get(figure.key)
    if target is None or peer != "libev":
        return None
    against, _, bound = target
    if against == "absolute":  # idle memory: an absolute bound, shown against libev's figure
        theirs = by_chain.get("libev", {}).get(figure.key)
        return theirs / bound if isinstance(theirs, (int, float)) and theirs > 0 else None
    return bound if figure.higher_is_better else 1 / bound


if __name__ == "__main__":
    # python report.py results.json: the tables again, as Markdown.
    import sys

    document = json.loads(Path(sys.argv[1]).read_text())
    print(render_markdown(document["summary"], document["ratios"], document["targets"], document["settings"]["chains"],
                          document.get("steal")))
