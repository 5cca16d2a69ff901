"""BOND and WARP demonstrated on a toy RL problem where rewards and KLs are exact.

    PYTHONPATH=src python scripts/rl_toy_demos.py bond [--steps 30 --n 4] [--plot docs/rl_bond.png]
    PYTHONPATH=src python scripts/rl_toy_demos.py warp [--steps 20]      [--plot docs/rl_warp.png]

The policy is a tiny random Gemma 3 (tests/helpers/models.py: 2 layers, byte vocabulary) with rank-4
LoRA adapters; a completion is one token and its reward is 1 when that byte is below "P" (about a
third of the start policy's mass). With one-token completions the expected reward of a policy is
exact (the probability mass of the rewarded bytes, mean over the prompts), so is the best-of-N
reward of the start policy (1 − (1 − p)^N per prompt) and the KL to the start policy (over the
vocabulary). Runs take a minute or two on 2 cores. This shows the algorithms' mechanics, not
their behaviour on the 270M (see docs/rl.md).

- bond: J-BOND (train/bond.py) from the start policy; logs the exact single-sample reward per step
  against the start policy's best-of-N reward; reports the share of the best-of-N gain reached.
- warp: two GRPO runs (different seeds, EMA anchor as the KL reference), their SLERP merge of task
  vectors, and LITI interpolations of the merge towards the init for several η; reports and plots
  each policy's exact reward and KL to the init (the reward–KL front).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"q{i}" for i in range(8)]


def toy(lora_cfg=None, tensors=None):
    """The toy policy: the tiny base with LoRA adapters (rank 4 by default), holding `tensors` if given."""
    sys.path.insert(0, str(REPO))
    from gemma3.train import lora
    from tests.helpers.models import random_model, tiny_config
    from tests.helpers.training import byte_tokenizer

    model = random_model(tiny_config(vocab=263, layers=2, local_per_global=1, window=16), seed=3)
    lora.apply_lora(model, lora_cfg or lora.LoRAConfig(rank=4, alpha=8))
    if tensors is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for k, v in tensors.items():
                params[k].copy_(v)
    return model, byte_tokenizer()


def reward_fn(tok):
    from gemma3.train.rewards import Score

    def low_first_byte(text, sample):
        return Score(float(bool(text) and ord(text[0]) < ord("P")), "toy")

    return (lambda t, s: (low_first_byte(t, s).value, {"toy": low_first_byte(t, s)})), low_first_byte


@torch.no_grad()
def first_token_probs(model, tok) -> torch.Tensor:
    return torch.stack([torch.softmax(model(torch.tensor([tok.encode(p, add_bos=True)]))[0, -1].float(), -1)
                        for p in PROMPTS])


def good_ids(tok) -> torch.Tensor:
    return torch.tensor([tok.token_to_id(f"<0x{b:02X}>") for b in range(ord("P"))])


def exact_reward(probs, tok) -> torch.Tensor:
    """Per prompt: the probability that the one-token completion is rewarded."""
    return probs[:, good_ids(tok)].sum(-1)


def kl(p, q) -> float:
    """Mean over prompts of KL(p ‖ q) between next-token distributions."""
    return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean())


def samples():
    return [{"prompt": p, "answer": "0"} for p in PROMPTS]


def bond(args):
    from gemma3.train.bond import BONDConfig, train_bond
    from gemma3.train.metrics import read_metrics

    model, tok = toy()
    p0 = exact_reward(first_token_probs(model, tok), tok)
    bon = float((1 - (1 - p0) ** args.n).mean())
    start = float(p0.mean())
    out = Path(args.out or tempfile.mkdtemp())
    cfg = BONDConfig(out=str(out), steps=args.steps, prompts_per_step=4, n=args.n, policy_samples=args.policy_samples,
                     max_tokens=1, lr=args.lr, beta=args.beta, anchor_ema=args.anchor_ema,
                     jeffreys_beta=args.jeffreys_beta, seed=args.seed, progress=False)
    reward, correct = reward_fn(tok)
    train_bond(model, tok, samples(), [], reward, correct, cfg,
               probe=lambda m: {"exact_reward": float(exact_reward(first_token_probs(m, tok), tok).mean())})
    records = [r for r in read_metrics(out / "metrics.jsonl") if "exact_reward" in r]
    final = records[-1]["exact_reward"]
    result = {"start_reward": round(start, 4), f"start_best_of_{args.n}": round(bon, 4), "final_reward": round(final, 4),
              "share_of_best_of_n_gain": round((final - start) / (bon - start), 3), "steps": args.steps,
              "metrics": str(out / "metrics.jsonl")}
    print(json.dumps(result))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.plot([0] + [r["step"] for r in records], [start] + [r["exact_reward"] for r in records],
                label="policy, one sample (exact)")
        ax.plot([r["step"] for r in records], [r["anchor_best_of_n"] for r in records], lw=0.8, alpha=0.6,
                label=f"moving anchor, best of {args.n} (sampled)")
        ax.axhline(bon, ls="--", color="grey", label=f"start policy, best of {args.n} (exact)")
        ax.axhline(start, ls=":", color="grey", label="start policy, one sample")
        ax.set(xlabel="step", ylabel="reward", title=f"J-BOND on the toy task: {result['share_of_best_of_n_gain']:.0%} "
                                                     f"of the best-of-{args.n} gain in one sample")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


def warp(args):
    from gemma3.train import lora, merge
    from gemma3.train.grpo import GRPOConfig, train_grpo
    from gemma3.train.rl import ObjectiveConfig

    model, tok = toy()
    init_probs = first_token_probs(model, tok)
    init_state = {k: v.clone() for k, v in lora.lora_state(model).items()}
    reward, correct = reward_fn(tok)
    root = Path(args.out or tempfile.mkdtemp())
    points = {}

    def measure(name):
        probs = first_token_probs(model, tok)
        points[name] = {"reward": float(exact_reward(probs, tok).mean()), "kl": kl(probs, init_probs)}

    measure("init")
    runs = []
    for i, seed in enumerate((1, 2)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init_state:
                    p.copy_(init_state[n])
        cfg = GRPOConfig(out=str(root / f"policy{i}"), steps=args.steps, prompts_per_step=4, group=8, max_tokens=1,
                         lr=args.lr, seed=seed, progress=False, anchor_ema=args.anchor_ema,
                         objective=ObjectiveConfig(beta=args.beta))
        train_grpo(model, tok, samples(), [], reward, correct, cfg)
        measure(f"policy {i + 1}")
        runs.append(root / f"policy{i}" / "adapter")

    def evaluate_adapter(name, cfg, tensors):
        nonlocal model
        model = toy(cfg, tensors)[0]
        measure(name)

    merged_cfg, merged = merge.merge_adapters(runs, "slerp")
    evaluate_adapter("SLERP merge", merged_cfg, merged)
    lora.save_adapter(root / "merged", merged_cfg, merged)
    for eta in (0.25, 0.5, 0.75):
        cfg_eta, tensors = merge.merge_adapters([root / "merged"], "liti", eta=eta)
        evaluate_adapter(f"LITI η={eta}", cfg_eta, tensors)
    print(json.dumps(points))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, pt in points.items():
            style = {"init": ("grey", "o"), "SLERP merge": ("tab:red", "*")}.get(
                name, ("tab:blue", "s") if name.startswith("policy") else ("tab:orange", "^"))
            ax.scatter(pt["kl"], pt["reward"], color=style[0], marker=style[1], s=90 if style[1] == "*" else 40)
            ax.annotate(name, (pt["kl"], pt["reward"]), fontsize=8, xytext=(4, -10), textcoords="offset points")
        ax.set(xlabel="KL(π ‖ π_init), first token (exact)", ylabel="expected reward (exact)",
               title="WARP on the toy task: reward–KL of single policies, merge, LITI")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", choices=("bond", "warp"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--n", type=int, default=4, help="bond: best of N")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--beta", type=float, default=0.05, help="KL coefficient to the EMA anchor")
    ap.add_argument("--policy-samples", type=int, default=4, help="bond: policy samples per prompt (backward term)")
    ap.add_argument("--jeffreys-beta", type=float, default=0.9,
                    help="bond: the backward term's share of the loss (the forward term's: 1 − β)")
    ap.add_argument("--anchor-ema", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.steps is None:
        args.steps = 30 if args.demo == "bond" else 20
    (bond if args.demo == "bond" else warp)(args)


if __name__ == "__main__":
    main()
