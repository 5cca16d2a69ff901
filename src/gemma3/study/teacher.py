"""`gemma3 study teacher` (report §5.4, Fig. 8): one student distilled from a small and from a large
teacher for increasing training-token budgets. The report finds the smaller teacher better for
short trainings and the larger one better for long ones.

- Teachers: trained first by this command, from scratch, on the same training text with the
  one-hot LM loss (`--teacher-steps`); both are tiny. The embedded 270M is not used: its 262k
  vocabulary would make the student's embedding and head ~99% of its compute (the 26M-student
  distillation demo takes ~19 min per 100 steps on this CPU) and needs another tokenizer than
  the byte-level one every study shares.
- Students: one run per budget and teacher, each from the same initial weights and with its own
  cosine schedule (a shorter training is not a prefix of a longer one). Targets are the report's:
  256 ids sampled per token from the teacher on the fly (`train.distill.TeacherTargets`, unbiased
  weights). With a 261-id vocabulary 256 draws cover nearly all of the teacher's mass, so the
  sparse target is close to the full distribution.
- A student trained on one-hot labels for the same budgets is the no-teacher reference; the
  student at the largest budget is retrained with one more seed as the noise yardstick.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..train.distill import TeacherTargets
from ..train.trainer import one_hot
from .tiny import Corpus, ModelSize, Schedule, data_note, kv_figures, pattern, train_and_measure

PAPER = ("Gemma 3 report Fig. 8: relative perplexity of a student distilled from a large vs a small teacher; "
         "the small teacher wins on short trainings, the large one on long ones")
TEACHERS = ("small", "large")


def _frozen(model, device):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def run(student: ModelSize, teachers: dict[str, ModelSize], corpus: Corpus, schedule: Schedule, teacher_steps: int,
        budgets: list[int], seed: int, window: int, local_per_global: int | None, k: int, kv_ctx: int,
        kv_dtype: str, work: Path, ctx, progress: bool, log, baseline: bool = True) -> dict | None:
    seq_len = corpus.train.seq_len
    budgets = sorted(set(budgets))
    cfg = student.config(seq_len, window, local_per_global, "student")
    jobs = len(teachers) + len(budgets) * (len(teachers) + baseline) + 1
    began, n = time.perf_counter(), 0

    def step(text):
        nonlocal n
        n += 1
        log(f"[{n}/{jobs}] teacher study: {text}")

    teacher_info, sources = {}, {}
    for name, size in teachers.items():
        tcfg = size.config(seq_len, window, local_per_global, f"{name} teacher")
        step(f"{name} teacher {size.d_model}x{size.layers} ({tcfg.num_params() / 1e6:.2f}M params), "
             f"{teacher_steps} steps of one-hot training")
        model, record = train_and_measure(tcfg, corpus, one_hot, schedule, seed, work / f"teacher_{name}", ctx,
                                          progress, steps=teacher_steps)
        teacher_info[name] = {"size": asdict(size), "layers": pattern(tcfg), "params": tcfg.num_params()} | record
        sources[name] = TeacherTargets(_frozen(model, ctx.device), k=k, seed=seed)
    if baseline:
        sources["none"] = one_hot

    runs = {}
    for steps in budgets:
        for name, source in sources.items():
            step(f"student from {'no teacher (one-hot labels)' if name == 'none' else f'the {name} teacher'}, "
                 f"{steps} steps = {steps * schedule.batch_size * seq_len:,} tokens")
            _, runs[name, steps] = train_and_measure(cfg, corpus, source, schedule, seed,
                                                     work / f"student_{name}_{steps}", ctx, progress, steps=steps)
    noise_teacher = TEACHERS[-1]
    step(f"student from the {noise_teacher} teacher, {budgets[-1]} steps, seed {seed + 1} (noise yardstick)")
    _, noise = train_and_measure(cfg, corpus, sources[noise_teacher], schedule, seed + 1,
                                 work / f"student_{noise_teacher}_{budgets[-1]}_seed{seed + 1}", ctx, progress,
                                 steps=budgets[-1])
    if not ctx.is_main:
        return None

    rows = []
    for steps in budgets:
        row = {"steps": steps, "tokens": steps * schedule.batch_size * seq_len}
        row |= {name: runs[name, steps] for name in sources}
        small, large = (runs[t, steps]["held_out_ppl"] for t in TEACHERS)
        row["relative_delta"] = (large - small) / small
        rows.append(row)
    same = runs[noise_teacher, budgets[-1]]["held_out_ppl"]
    return {
        "study": "teacher", "paper": PAPER,
        "settings": {
            "data": corpus.info(), "training": schedule.to_dict(), "teacher_steps": teacher_steps, "seed": seed,
            "targets": f"{k} ids sampled per token from the teacher (train.distill.TeacherTargets, unbiased weights)",
            "teachers": "trained from scratch by this command on the same training text (one-hot LM loss)",
            "held_out_eval": f"mean NLL over every held-out token, packed in sequences of {seq_len} (trainer evaluate)",
            "relative_delta": "(ppl with the large teacher − ppl with the small one) / ppl with the small one; "
                              "negative: the large teacher is better",
            "device": str(ctx.device), "processes": ctx.world, "threads": torch.get_num_threads(),
        },
        "student": {"size": asdict(student), "layers": pattern(cfg), "params": cfg.num_params(),
                    **kv_figures(cfg, kv_ctx, kv_dtype), "kv": {"ctx": kv_ctx, "dtype": kv_dtype}},
        "teachers": teacher_info,
        "budgets": rows,
        "seed_noise": {"teacher": noise_teacher, "steps": budgets[-1], "seeds": [seed, seed + 1],
                       "held_out_ppl": noise["held_out_ppl"], "ppl_delta": noise["held_out_ppl"] - same,
                       "relative": (noise["held_out_ppl"] - same) / same, "run": noise},
        "seconds": round(time.perf_counter() - began, 1),
    }


def summary_lines(result: dict) -> list[str]:
    lines = [f"{name} teacher: {t['size']['d_model']}x{t['size']['layers']}, {t['params'] / 1e6:.2f}M params, "
             f"held-out ppl {t['held_out_ppl']:.4f}" for name, t in result["teachers"].items()]
    s = result["student"]
    lines.append(f"student: {s['size']['d_model']}x{s['size']['layers']}, {s['params'] / 1e6:.2f}M params")
    names = [n for n in ("small", "large", "none") if n in result["budgets"][0]]
    lines.append(f"{'steps':>6}{'tokens':>11}" + "".join(f"{'ppl ' + n:>12}" for n in names) + f"{'rel. Δ':>9}")
    for row in result["budgets"]:
        ppls = "".join(f"{row[n]['held_out_ppl']:>12.4f}" for n in names)
        lines.append(f"{row['steps']:>6}{row['tokens']:>11,}{ppls}{row['relative_delta']:>+9.2%}")
    noise = result["seed_noise"]
    lines.append(f"seed noise: student from the {noise['teacher']} teacher at {noise['steps']} steps retrained with "
                 f"seed {noise['seeds'][1]}: {noise['relative']:+.2%}")
    models = len(result["budgets"]) * len(names) + len(result["teachers"]) + 1
    lines.append(f"{models} models in {result['seconds']:.0f} s")
    return lines


def plot(result: dict, path: str | Path):
    """Left: student perplexity vs training tokens per teacher. Right: relative Δ (Fig. 8 shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["budgets"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(12, 4.6))
    labels = {"small": "small teacher", "large": "large teacher", "none": "no teacher (one-hot)"}
    for i, name in enumerate(n for n in labels if n in rows[0]):
        ax.plot(tokens, [r[name]["held_out_ppl"] for r in rows], marker="o", color=f"C{i}",
                label=f"student, {labels[name]}")
        if name in result["teachers"]:
            t = result["teachers"][name]
            ax.axhline(t["held_out_ppl"], color=f"C{i}", ls=":", lw=1,
                       label=f"{labels[name]} itself ({t['params'] / 1e6:.2f}M params)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("student training tokens")
    ax.set_ylabel("held-out perplexity (byte tokens, log scale)")
    ax.set_title("Student perplexity vs training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    noise = abs(result["seed_noise"]["relative"]) * 100
    ax_d.axhspan(-noise, noise, color="0.85", label=f"seed noise (±{noise:.2f}%)")
    ax_d.axhline(0, color="0.4", lw=0.8)
    ax_d.plot(tokens, [100 * r["relative_delta"] for r in rows], marker="o", color="C3", label="large vs small teacher")
    ax_d.set_xscale("log")
    ax_d.set_xlabel("student training tokens")
    ax_d.set_ylabel("relative perplexity Δ (%)")
    ax_d.set_title("Large vs small teacher (cf. Fig. 8); below 0: large is better")
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=8)
    s = result["student"]
    fig.suptitle(f"student {s['params'] / 1e6:.2f}M params, teachers "
                 + " and ".join(f"{t['params'] / 1e6:.2f}M" for t in result["teachers"].values())
                 + f" trained {result['settings']['teacher_steps']} steps; {data_note(result['settings']['data'])}",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
