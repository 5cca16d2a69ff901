"""WARM under label noise: with a share of the training pairs' labels flipped, the weight average of
M reward models (one initialisation; each its own data order and bootstrap resample of the pairs)
against the best of the M on held-out pairs, over several seeds (each its own flips and orders).
The defaults are the settings of docs/rl.md's table: the head alone trained (a linear probe of the
frozen backbone), lr 3e-3, 20 epochs, bagging on.

    PYTHONPATH=src python scripts/warm_demo.py [--flip 0.25 --models 4 --seeds 3] [--plot docs/rl_warm.png]

Pairs: the built-in arithmetic task's prompts with *constructed* answers (tasks.arithmetic_pairs:
chosen = the correct result, rejected = off by 1..10), not samples of the model. Reward model: the
embedded 270M (or --model), frozen except its head (and with --trainable-layers N its top N layers
and final norm; train/reward_model.py); the frozen trunk's features are computed once and shared by
every model."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gemma3.inference.load import load
from gemma3.train import reward_model as rmod
from gemma3.train import tasks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--train", type=int, default=400, help="training pairs")
    ap.add_argument("--test", type=int, default=300, help="held-out pairs (labels never flipped)")
    ap.add_argument("--digits", type=int, default=1, help="operand digits of the arithmetic task")
    ap.add_argument("--flip", type=float, default=0.25, help="share of training labels flipped")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trainable-layers", type=int, default=0, help="0: the head alone (a linear probe)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-spread", type=float, default=1.0, help="member learning rates over [lr/s, lr·s]")
    ap.add_argument("--bootstrap", action=argparse.BooleanOptionalAction, default=True,
                    help="each member trains on its own resample of the pairs (bagging; default on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default=None, help="write a PNG of the accuracies here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    backbone, tok = load(args.model)
    pairs = tasks.arithmetic_pairs(args.train + args.test, seed=1234, digits=args.digits)
    rm = rmod.RewardModel(backbone, args.trainable_layers, head_seed=0)
    train = rmod.PairFeatures(rm, *rmod.encode_pairs(tok, pairs[:args.train]))
    test = rmod.PairFeatures(rm, *rmod.encode_pairs(tok, pairs[args.train:]))
    init = rmod.trained_state(rm)
    runs = []
    for seed in range(args.seeds):
        flipped = torch.rand(args.train, generator=torch.Generator().manual_seed(seed)) < args.flip
        rmod.load_trained_state(rm, init)
        cfg = rmod.RMConfig(args.trainable_layers, args.lr, args.epochs, 8, seed=100 * seed, bootstrap=args.bootstrap)
        members, averaged = rmod.train_warm(rm, train, cfg, args.models, args.lr_spread, flipped)
        accs = [rmod.accuracy(rmod.load_trained_state(rm, s), test) for _, s in members]
        warm = rmod.accuracy(rmod.load_trained_state(rm, averaged), test)
        runs.append({"seed": seed, "flipped": int(flipped.sum()), "members": accs, "best_member": max(accs),
                     "mean_member": statistics.mean(accs), "warm": warm})
        print(json.dumps(runs[-1]), flush=True)
    rmod.load_trained_state(rm, init)
    summary = {"init_accuracy": rmod.accuracy(rm, test),
               "warm_mean": statistics.mean(r["warm"] for r in runs),
               "best_member_mean": statistics.mean(r["best_member"] for r in runs),
               "member_mean": statistics.mean(r["mean_member"] for r in runs),
               "seconds": round(time.perf_counter() - began, 1), "args": vars(args)}
    print(json.dumps(summary))
    if args.plot:
        plot(runs, summary, args)


def plot(runs, summary, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, r in enumerate(runs):
        ax.scatter([i] * len(r["members"]), r["members"], color="tab:blue", label="individual RMs" if i == 0 else None)
        ax.scatter([i], [r["warm"]], color="tab:red", marker="*", s=160, label="WARM (weight average)" if i == 0 else None)
    ax.axhline(summary["init_accuracy"], color="grey", ls=":", label="initialisation")
    ax.set(xticks=range(len(runs)), xticklabels=[f"seed {r['seed']}" for r in runs], ylabel="held-out pair accuracy",
           title=f"{args.models} RMs, {args.flip:.0%} training labels flipped: WARM {summary['warm_mean']:.3f} vs "
                 f"best single {summary['best_member_mean']:.3f} (means)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
