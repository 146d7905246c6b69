"""`make plots`: PNG charts from gpu_check result JSON, never from hand-entered numbers.

    python -m bench.plots bench/results            # every result JSON in the folder
    python -m bench.plots bench/results/X.json     # one file

For each result file X.json it writes, next to it:
  X-bandwidth.png  one panel per memory-bound op: GB/s per shape and pass, a bar per impl, and
                   the measured copy ceiling as a dashed line
  X-tflops.png     the same for rows that report TFLOP/s (attention), against the matmul ceiling
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.harness import Row, read_json


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit(
            "bench.plots needs matplotlib, which is not installed here. Install it "
            "(`pip install matplotlib`, or `make install`, whose dev extras include it) and rerun; "
            "the result JSON itself needs nothing."
        )
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _panels(rows: list[Row], metric: str) -> dict[str, list[Row]]:
    by_op: dict[str, list[Row]] = {}
    for r in rows:
        if getattr(r, metric) is not None and not r.error:
            by_op.setdefault(r.op, []).append(r)
    return by_op


def plot_metric(
    rows: list[Row],
    ceiling: float | None,
    metric: str,
    unit: str,
    ceiling_label: str,
    title: str,
    path: Path,
) -> Path | None:
    """One figure with a panel per op; None when no row has the metric."""
    panels = _panels(rows, metric)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (op, op_rows) in zip(axes[:, 0], panels.items()):
        cases = list(dict.fromkeys(f"{r.shape}\n{r.dtype} {r.pass_}" for r in op_rows))
        impls = list(dict.fromkeys(r.impl for r in op_rows))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = {
                f"{r.shape}\n{r.dtype} {r.pass_}": getattr(r, metric)
                for r in op_rows
                if r.impl == impl
            }
            xs = [i + (j - (len(impls) - 1) / 2) * width for i, c in enumerate(cases) if c in vals]
            ax.bar(xs, [vals[c] for c in cases if c in vals], width=width, label=impl)
        if ceiling:
            ax.axhline(
                ceiling,
                linestyle="--",
                color="black",
                linewidth=1,
                label=f"{ceiling_label} {ceiling:.0f}",
            )
        ax.set_xticks(range(len(cases)), cases, fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(path: Path) -> list[Path]:
    """Charts for one result JSON; [] when it has no plottable rows."""
    rows, doc = read_json(path)
    meta, ceilings = doc.get("meta", {}), doc.get("ceilings", {})
    commit = str(meta.get("git", {}).get("commit", "?"))[:10]
    title = f"{meta.get('card', '?')} {meta.get('date', '')} commit {commit}"
    if meta.get("cpu_smoke"):
        title += " (CPU SMOKE: plumbing check, not a measurement)"
    made = [
        plot_metric(
            rows,
            ceilings.get("copy_gbps"),
            "gbps",
            "GB/s",
            "measured copy",
            title,
            path.with_name(path.stem + "-bandwidth.png"),
        ),
        plot_metric(
            rows,
            ceilings.get("matmul_tflops"),
            "tflops",
            "TFLOP/s",
            "measured matmul",
            title,
            path.with_name(path.stem + "-tflops.png"),
        ),
    ]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.plots", description="PNG charts from gpu_check result JSON"
    )
    ap.add_argument("paths", nargs="+", help="result JSON files or folders holding them")
    args = ap.parse_args(argv)
    files: list[Path] = []
    for p in map(Path, args.paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        print(f"bench.plots: no result JSON in {', '.join(args.paths)} (gpu_check writes them)")
        return 0
    for f in files:
        try:
            made = plot_file(f)
        except (ValueError, KeyError, TypeError) as e:
            print(f"bench.plots: {f}: not a gpu_check result ({type(e).__name__}: {e}); skipped")
            continue
        print(f"{f}: " + (", ".join(map(str, made)) if made else "no rows with GB/s or TFLOP/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
