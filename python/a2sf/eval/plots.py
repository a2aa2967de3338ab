"""PNG plots of the results (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .summary import POLICY_ORDER, load, mc_summary, ppl_summary

__all__ = ["make_plots"]

COLORS = {"streaming": "tab:gray", "random": "tab:olive", "tova": "tab:blue", "h2o": "tab:orange",
          "a2sf": "tab:green", "vatp": "tab:purple"}
DEFAULT_ALPHA = 0.95


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tasks_with(mc, configs, shots):
    """Tasks (of ``shots``) that have every config: the set every point is averaged over."""
    sets = [{k[0] for k in mc if k[1] == shots and (k[2], k[3], k[5]) == c} for c in configs]
    return set.intersection(*sets) if sets else set()


def _mc_mean(mc, ratio_alpha_policy, shots, tasks=None):
    """Accuracy averaged over ``tasks`` (question-weighted)."""
    policy, ratio, alpha = ratio_alpha_policy
    hits = [v for k, v in mc.items() if k[1] == shots and k[2] == policy and k[3] == ratio and k[5] == alpha
            and (tasks is None or k[0] in tasks)]
    if not hits:
        return None
    n = sum(v["n"] for v in hits)
    return sum(v["acc"] * v["n"] for v in hits) / n


def make_plots(out: Path) -> List[Path]:
    out = Path(out)
    plt = _plt()
    made = []
    ppl = ppl_summary(load(out, "ppl"))
    mc = mc_summary(load(out, "mc"))
    shots_list = sorted({k[1] for k in mc})

    # 1. quality vs cache ratio, one line per policy
    panels = (["ppl"] if ppl else []) + [f"mc{s}" for s in shots_list]
    main = [("none", None, None)] + [(p, r, DEFAULT_ALPHA if p == "a2sf" else None)
                                     for p in POLICY_ORDER[1:] for r in sorted({k[3] for k in mc if k[3] is not None})]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for pol in POLICY_ORDER[1:]:
                alpha = DEFAULT_ALPHA if pol == "a2sf" else None
                if panel == "ppl":
                    pts = sorted((k[1], v["ratio_to_full"]) for k, v in ppl.items()
                                 if k[0] == pol and k[3] == alpha and k[1] is not None)
                else:
                    s = int(panel[2:])
                    tasks = _tasks_with(mc, [c for c in main if any(
                        k[1] == s and (k[2], k[3], k[5]) == c for k in mc)], s)
                    ratios = sorted({k[3] for k in mc if k[2] == pol and k[3] is not None})
                    pts = [(r, _mc_mean(mc, (pol, r, alpha), s, tasks)) for r in ratios]
                    pts = [p for p in pts if p[1] is not None]
                if pts:
                    label = f"a2sf (a={DEFAULT_ALPHA})" if pol == "a2sf" else pol
                    ax.plot(*zip(*pts), marker="o", label=label, color=COLORS.get(pol))
            if panel == "ppl":
                ax.axhline(1.0, color="k", ls="--", lw=1, label="full cache")
                ax.set_ylabel("perplexity / full-cache perplexity")
                ax.set_title("Compressed-context perplexity (essays)")
            else:
                s = int(panel[2:])
                tasks = _tasks_with(mc, [c for c in main if any(
                    k[1] == s and (k[2], k[3], k[5]) == c for k in mc)], s)
                full = _mc_mean(mc, ("none", None, None), s, tasks)
                if full is not None:
                    ax.axhline(full, color="k", ls="--", lw=1, label="full cache")
                ax.set_ylabel(f"accuracy (mean over {', '.join(sorted(tasks))})")
                ax.set_title(f"Multiple choice, {s}-shot")
            ax.set_xlabel("cache budget (fraction of the context)")
            ax.set_xlim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "quality_vs_ratio.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    # 2. quality vs alpha at the sweep's budget (TOVA = alpha 0, H2O = alpha 1)
    sweep_ratios = sorted({k[1] for k in ppl if k[0] == "a2sf" and k[3] != DEFAULT_ALPHA})
    if sweep_ratios:
        r = sweep_ratios[0]
        fig, axes = plt.subplots(1, 1 + len(shots_list), figsize=(5 * (1 + len(shots_list)), 4), squeeze=False)
        ax = axes[0][0]
        pts = [(0.0, ppl[("tova", r, None, None)]["ratio_to_full"])] if ("tova", r, None, None) in ppl else []
        pts += sorted((k[3], v["ratio_to_full"]) for k, v in ppl.items() if k[0] == "a2sf" and k[1] == r)
        if ("h2o", r, None, None) in ppl:
            pts.append((1.0, ppl[("h2o", r, None, None)]["ratio_to_full"]))
        ax.plot(*zip(*pts), marker="o", color=COLORS["a2sf"])
        ax.set_xlabel("forgetting factor alpha (0 = TOVA, 1 = H2O)")
        ax.set_ylabel("perplexity / full-cache perplexity")
        ax.set_title(f"Perplexity vs alpha, budget {r:g}")
        ax.grid(alpha=0.3)
        for ax, s in zip(axes[0][1:], shots_list):
            pts = []
            cfgs = [("tova", None)] + sorted({("a2sf", k[5]) for k in mc if k[2] == "a2sf" and k[3] == r and k[1] == s}) + [("h2o", None)]
            tasks = _tasks_with(mc, [(p, r, a) for p, a in cfgs], s)
            for pol, a in cfgs:
                v = _mc_mean(mc, (pol, r, a), s, tasks)
                if v is not None:
                    pts.append((0.0 if pol == "tova" else 1.0 if pol == "h2o" else a, v))
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", color=COLORS["a2sf"])
            ax.set_xlabel("forgetting factor alpha (0 = TOVA, 1 = H2O)")
            ax.set_ylabel(f"accuracy (mean over {', '.join(sorted(tasks))})")
            ax.set_title(f"Multiple choice {s}-shot vs alpha, budget {r:g}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / "quality_vs_alpha.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made
