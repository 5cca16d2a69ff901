"""`gemma3 study ratio` and `gemma3 study window` (report §5.1, Figs. 3 and 4): models that differ
only in their attention pattern, compared on held-out perplexity and KV cache memory.

Same data, same steps, same seed, hence the same initial weights and the same batches (local
and global layers have the same parameters, so the parameter count is the same too):
- ratio: local:global 1:1, 3:1, 5:1, 7:1 (`config.layer_pattern`: layer i is global iff
  (i + 1) % (r + 1) == 0) and global only; Δ perplexity against global only (Fig. 3);
- window: sliding windows from seq_len/16 to seq_len for one or more ratios; Δ perplexity against
  the largest window of the same ratio (Fig. 4).
Both also plot KV memory against perplexity. The first baseline is retrained with one more seed:
the difference between the two is the yardstick for "no effect" at this scale.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..train.trainer import one_hot
from .tiny import Corpus, ModelSize, Schedule, data_note, kv_figures, pattern, train_and_measure

PAPER = {
    "ratio": "Gemma 3 report Fig. 3: local:global 1:1 … 7:1 changes perplexity very little",
    "window": "Gemma 3 report Fig. 4: the sliding window can be cut a lot (to 1024 of 4096+) at little perplexity cost",
}


@dataclass(frozen=True)
class Variant:
    label: str
    line: str  # the curve it belongs to: "ratio", or the ratio label in the window study
    local_per_global: int | None  # None: every layer global
    window: int


def ratio_label(r: int | None) -> str:
    return "global only" if r is None else f"{r}:1"


def parse_ratios(spec: str) -> list[int | None]:
    """"global,1,3,5,7" → [None, 1, 3, 5, 7]."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in ("global", "g"):
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise ValueError(f"ratio {item!r}: expected a positive number of local layers per global one, or 'global'")
    if not out:
        raise ValueError("no ratios given")
    return out


def ratio_variants(ratios: list[int | None], window: int) -> list[Variant]:
    if None not in ratios:
        raise ValueError("the ratio study compares against global only: include 'global' in --ratios")
    return [Variant(ratio_label(r), "ratio", r, window) for r in sorted(ratios, key=lambda r: r or 0)]


def window_variants(windows: list[int], ratios: list[int | None]) -> list[Variant]:
    if any(r is None for r in ratios):
        raise ValueError("the window study varies local layers: --ratios must not include 'global'")
    return [Variant(f"{ratio_label(r)} W={w}", ratio_label(r), r, w) for r in ratios for w in sorted(set(windows))]


def _baselines(study: str, variants: list[Variant]) -> dict[str, Variant]:
    """The reference of each curve: global only (ratio), the largest window of the ratio (window)."""
    if study == "ratio":
        return {"ratio": next(v for v in variants if v.local_per_global is None)}
    return {line: max((v for v in variants if v.line == line), key=lambda v: v.window)
            for line in dict.fromkeys(v.line for v in variants)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def run(study: str, variants: list[Variant], size: ModelSize, corpus: Corpus, schedule: Schedule,
        seeds: list[int], kv_ctx: int, kv_dtype: str, work: Path, ctx, progress: bool, log) -> dict | None:
    """Trains every variant for every seed plus the seed-noise run; the result on the main process."""
    seq_len = corpus.train.seq_len
    configs = {v: size.config(seq_len, v.window, v.local_per_global, v.label) for v in variants}
    if len({cfg.num_params() for cfg in configs.values()}) != 1:
        raise RuntimeError("study variants differ in parameter count")  # cannot happen: only masks differ
    baselines = _baselines(study, variants)
    noise_variant = baselines[variants[0].line]
    noise_seed = max(seeds) + 1
    jobs = [(v, s) for v in variants for s in seeds] + [(noise_variant, noise_seed)]
    records: dict[tuple[Variant, int], dict] = {}
    began = time.perf_counter()
    for i, (v, seed) in enumerate(jobs, 1):
        cfg = configs[v]
        log(f"[{i}/{len(jobs)}] {study} study: {v.label} — layers {pattern(cfg)}, window {v.window}, seed {seed}")
        _, records[v, seed] = train_and_measure(cfg, corpus, one_hot, schedule, seed,
                                                work / _slug(v.label) / f"seed{seed}", ctx, progress)
    if not ctx.is_main:
        return None

    models = []
    for v in variants:
        cfg, base = configs[v], baselines[v.line]
        runs = [records[v, s] for s in seeds]
        deltas = [records[v, s]["held_out_ppl"] - records[base, s]["held_out_ppl"] for s in seeds]
        models.append({
            "label": v.label, "line": v.line, "local_per_global": v.local_per_global, "window": v.window,
            "layers": pattern(cfg), "global_layers": len(cfg.global_layers), "params": cfg.num_params(),
            **kv_figures(cfg, kv_ctx, kv_dtype),
            "held_out_ppl": statistics.fmean(r["held_out_ppl"] for r in runs),
            "ppl_delta": statistics.fmean(deltas),
            "ppl_delta_std": statistics.stdev(deltas) if len(deltas) > 1 else None,
            "baseline": base.label, "runs": runs,
        })
    first = records[noise_variant, seeds[0]]["held_out_ppl"]
    noise = records[noise_variant, noise_seed]
    return {
        "study": study, "paper": PAPER[study],
        "settings": {
            "data": corpus.info(), "model": asdict(size), "training": schedule.to_dict(), "seeds": seeds,
            "kv": {"ctx": kv_ctx, "dtype": kv_dtype, "formula": "memory.kv_bytes_windowed: local layers min(window, "
                                                                  "ctx) slots, global layers ctx slots"},
            "held_out_eval": f"mean NLL over every held-out token, packed in sequences of {seq_len} (trainer evaluate)",
            "delta": ("held-out perplexity minus that of global only, same seed" if study == "ratio" else
                      "held-out perplexity minus that of the largest window of the same ratio, same seed"),
            "device": str(ctx.device), "processes": ctx.world, "threads": torch.get_num_threads(),
        },
        "models": models,
        "seed_noise": {"model": noise_variant.label, "seeds": [seeds[0], noise_seed],
                       "held_out_ppl": noise["held_out_ppl"], "ppl_delta": noise["held_out_ppl"] - first, "run": noise},
        "seconds": round(time.perf_counter() - began, 1),
    }


def summary_lines(result: dict) -> list[str]:
    kv = result["settings"]["kv"]
    lines = [f"{'model':18}{'layers':>16}{'params':>9}{'held-out ppl':>14}{'Δ ppl':>9}"
             f"{'KV @' + str(kv['ctx']) + ' (KiB)':>17}{'vs global':>11}"]
    for m in result["models"]:
        lines.append(f"{m['label']:18}{m['layers']:>16}{m['params']:>9}{m['held_out_ppl']:>14.4f}"
                     f"{m['ppl_delta']:>+9.4f}{m['kv_bytes'] / 1024:>17.1f}{m['kv_vs_global_only']:>11.0%}")
    noise = result["seed_noise"]
    lines.append(f"seed noise: {noise['model']} retrained with seed {noise['seeds'][1]}: "
                 f"Δ ppl {noise['ppl_delta']:+.4f}")
    lines.append(f"{len(result['models'])} models in {result['seconds']:.0f} s")
    return lines


def plot(result: dict, path: str | Path):
    """Left: Δ perplexity vs ratio (Fig. 3) or vs window (Fig. 4), the seed-noise band in grey.
    Right: KV memory at the stated context vs held-out perplexity, every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study, models, kv = result["study"], result["models"], result["settings"]["kv"]
    noise = abs(result["seed_noise"]["ppl_delta"])
    lines = list(dict.fromkeys(m["line"] for m in models))
    fig, (ax, ax_kv) = plt.subplots(1, 2, figsize=(12, 4.6))
    ax.axhspan(-noise, noise, color="0.85", label=f"seed noise (±{noise:.3f})")
    ax.axhline(0, color="0.4", lw=0.8)
    for i, line in enumerate(lines):
        ms = [m for m in models if m["line"] == line]
        xs = list(range(len(ms))) if study == "ratio" else [m["window"] for m in ms]
        err = [m["ppl_delta_std"] or 0 for m in ms]
        ax.errorbar(xs, [m["ppl_delta"] for m in ms], yerr=err if any(err) else None, color=f"C{i}", marker="o",
                    capsize=3, label="tiny model" if study == "ratio" else f"L:G {line}")
        ax_kv.plot([m["kv_bytes"] / 1024 for m in ms], [m["held_out_ppl"] for m in ms], color=f"C{i}", marker="o",
                   ls="" if study == "ratio" else "-", label=None if study == "ratio" else f"L:G {line}")
        for m in ms:
            ax_kv.annotate(m["label"] if study == "ratio" else f"W={m['window']}",
                           (m["kv_bytes"] / 1024, m["held_out_ppl"]), textcoords="offset points", xytext=(4, 4),
                           fontsize=7)
    if study == "ratio":
        ax.set_xticks(range(len(models)), [m["label"] for m in models])
        ax.set_xlabel("local:global ratio")
        ax.set_ylabel("Δ held-out perplexity vs global only")
        ax.set_title(f"Local:global ratio (cf. Fig. 3), window {models[0]['window']}")
    else:
        ax.set_xscale("log", base=2)
        windows = sorted({m["window"] for m in models})
        ax.set_xticks(windows, [str(w) for w in windows])
        ax.set_xlabel(f"sliding window (training sequence {result['settings']['data']['seq_len']} tokens)")
        ax.set_ylabel("Δ held-out perplexity vs the largest window")
        ax.set_title("Sliding window size (cf. Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_kv.set_xlabel(f"KV cache at {kv['ctx']} tokens ({kv['dtype']}, KiB)")
    ax_kv.set_ylabel("held-out perplexity")
    ax_kv.set_title("KV memory vs perplexity")
    ax_kv.grid(alpha=0.3)
    if study != "ratio":
        ax_kv.legend(fontsize=8)
    m = result["settings"]["model"]
    t = result["settings"]["training"]
    fig.suptitle(f"{m['layers']} layers × d_model {m['d_model']}, {models[0]['params'] / 1e6:.2f}M params, "
                 f"{t['steps']} steps × {t['batch_size']} × {result['settings']['data']['seq_len']} byte tokens; "
                 f"{data_note(result['settings']['data'])}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
