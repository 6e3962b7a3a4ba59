"""PNG plots of a run's ``metrics.jsonl``: training loss terms, learning rate, throughput, validation."""
from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(log_path: str | Path, out_dir: str | Path) -> list[Path]:
    # An explicit Figure with the Agg canvas: no pyplot state, so a notebook's inline backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if "lr" in r]
    val = [r for r in rows if "val/loss" in r]
    panels = {
        "losses": sorted({k for r in train for k in r if k.endswith("loss")}),
        "val_losses": sorted({k for r in val for k in r if k.startswith("val/") and k.endswith("loss")}),
        "lr": ["lr"], "throughput": ["samples_per_s"], "logit_scale": ["logit_scale"],
    }
    written = []
    for name, keys in panels.items():
        source = val if name == "val_losses" else train
        keys = [k for k in keys if any(r.get(k) is not None for r in source)]
        if not keys:
            continue
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for k in keys:
            pts = [(r["step"], r[k]) for r in source if r.get(k) is not None]
            ax.plot(*zip(*pts), label=k, marker="o" if name == "val_losses" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        if name in ("losses", "val_losses"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written
