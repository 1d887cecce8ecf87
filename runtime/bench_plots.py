"""bench_plots: the benchmark report as pictures: speed against prompt length, and where the time goes."""
from __future__ import annotations

from pathlib import Path


def write_plots(report: dict, directory: Path) -> list[Path]:
    """bench-speed.png (prefill and decode tokens/s against prompt length, one line per system) and, where a
    system reports it, bench-time-share.png (its graph time by graph kind and by EP). Needs matplotlib (the
    `bench` extra); without it nothing is drawn and the list is empty."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["results"]:
        lengths = [row["prompt_tokens"] for row in r["rows"]]
        for ax, key in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s")):
            ax.plot(lengths, [row[key] for row in r["rows"]], marker="o", label=f"{r['system']} ({r['label']})")
    lengths = sorted({row["prompt_tokens"] for r in report["results"] for row in r["rows"]})
    for ax, title in zip(axes, ("prefill", "decode")):
        ax.set(xscale="log", xlabel="prompt tokens", ylabel="tokens/s", title=title)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    fig.suptitle(f"{report['machine']}, {report['date']}", fontsize="small")
    fig.tight_layout()
    written.append(directory / "bench-speed.png")
    fig.savefig(written[-1], dpi=120)
    shares = [(r["system"], key, r[key]) for r in report["results"] for key in ("time_by_graph_kind_s", "time_by_provider_s") if r.get(key)]
    if shares:
        fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(shares)))
        for i, (system, key, share) in enumerate(shares):
            total, left = sum(share.values()) or 1.0, 0.0
            for part, seconds in share.items():
                ax.barh(i, seconds / total, left=left)
                ax.text(left + seconds / total / 2, i, part, ha="center", va="center", fontsize="x-small")
                left += seconds / total
        ax.set_yticks(range(len(shares)), [f"{s}: {'graph kind' if k.endswith('kind_s') else 'EP'}" for s, k, _ in shares])
        ax.set(xlim=(0, 1), xlabel="share of time in graphs")
        fig.tight_layout()
        written.append(directory / "bench-time-share.png")
        fig.savefig(written[-1], dpi=120)
    plt.close("all")
    return written
