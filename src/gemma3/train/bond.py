"""BOND: best-of-N distillation, as J-BOND (Sessa et al., 2024) runs it, on LoRA adapters.

The target is π_BoN, the distribution of the best of N samples of an *anchor* policy. Per prompt:
- N samples from the anchor are scored; the best (ties broken at random) is the *forward* term's
  target: maximise log π(best) (the best-of-N distribution's samples, SFT-like: KL(π_BoN ‖ π));
- K samples from the policy carry the *backward* term, KL(π ‖ π_BoN), as a policy gradient:
  log π_BoN(y) = log π_anchor(y) + log N + (N − 1)·log p≤(y), where p≤(y) is the anchor's chance
  of scoring at most r(y), estimated from the N anchor samples (ties count half, and one pseudo-
  sample each side keeps it in (0, 1)); so each policy sample gets the reward (N − 1)·log p̂≤(y),
  centred on its prompt's K samples, and the log π_anchor part is a KL to the anchor (k3, β);
- the anchor moves: anchor ← (1 − μ)·anchor + μ·θ after each step (J-BOND's EMA anchor), so the
  policy keeps distilling the best-of-N of an improving anchor (iterated BOND).
Loss = (1 − β_J)·forward + β_J·backward, J-BOND's Jeffreys divergence (each term a mean over its
sequences, token-normalised per sequence). The forward term is a one-sample log-likelihood of a
single target per prompt: its gradient is large and noisy next to the backward term's centred
policy gradient, and with equal weights it dominates Adam's normalised steps; on the toy task
(scripts/rl_toy_demos.py bond) equal weights plateaued at ~50 % of the best-of-N gain, β_J = 0.9
reached 87 %, hence the default.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import lora
from .grpo import LoopCheckpoints, _pad, first_accuracy, greedy_accuracy
from .merge import ema
from .metrics import MetricsLog, read_metrics
from .rl import ObjectiveConfig, completion_logprobs, policy_loss
from .rollout import EnginePolicy, rollout


@dataclass
class BONDConfig:
    out: str
    steps: int = 20
    prompts_per_step: int = 4
    n: int = 8  # anchor samples per prompt: the N of best-of-N
    policy_samples: int = 2  # K policy samples per prompt for the backward term
    max_tokens: int = 8
    temperature: float = 1.0
    lr: float = 1e-4
    beta: float = 0.05  # KL to the anchor in the backward term
    anchor_ema: float = 0.05  # μ: how fast the anchor follows the policy
    jeffreys_beta: float = 0.9  # β_J: the backward term's share of the loss, the forward term's is 1 − β_J
    eval_every: int = 0
    save_every: int = 0  # a resumable checkpoint every N steps (and at the end of a stopped run)
    stop_after: int | None = None  # end this run with a checkpoint after N steps of it; resume later
    seed: int = 0
    progress: bool = True


def quantile_rewards(policy_r: torch.Tensor, anchor_r: torch.Tensor, n: int) -> torch.Tensor:
    """(N − 1)·log p̂≤(y) per policy sample: `policy_r` [P, K] rewards, `anchor_r` [P, N] the anchor's."""
    below = (anchor_r[:, None, :] < policy_r[:, :, None]).float().sum(-1)
    ties = (anchor_r[:, None, :] == policy_r[:, :, None]).float().sum(-1)
    p = (below + 0.5 * ties + 0.5) / (anchor_r.shape[1] + 1)
    return (n - 1) * torch.log(p)


def best_of(rewards: torch.Tensor, rng: random.Random) -> list[int]:
    """Index of the best sample per row of `rewards` [P, N], ties broken at random."""
    out = []
    for row in rewards.tolist():
        top = max(row)
        out.append(rng.choice([i for i, r in enumerate(row) if r == top]))
    return out


def train_bond(model, tokenizer, train_samples: list[dict], eval_samples: list[dict], reward_fn, correct_fn,
               cfg: BONDConfig, engine=None, probe=None, resume: bool = False) -> dict:
    """Trains `model`'s LoRA adapters towards the best-of-N of its moving anchor; writes
    OUT/metrics.jsonl (per step: the policy's and the anchor's mean reward, the anchor's best-of-N
    reward, both loss terms, KL to the anchor), OUT/bond.png and OUT/adapter. `reward_fn(text,
    sample)` returns (total, {name: Score}); `engine`: the model on the CPU backend to sample on
    (the policy and the anchor as two adapters); `probe(model)`: a dict logged with each step (e.g. an
    exact expected reward where the task allows one). Checkpoints and `resume` as train_grpo's."""
    if not hasattr(model, "lora_config"):
        raise ValueError("train_bond trains LoRA adapters: apply_lora(model, ...) first")
    if cfg.n < 2 or cfg.policy_samples < 1:
        raise ValueError("BOND needs n ≥ 2 anchor samples and at least one policy sample per prompt")
    if not 0 <= cfg.jeffreys_beta <= 1:
        raise ValueError(f"the Jeffreys β must be in [0, 1] (0: forward term only, 1: backward only), got {cfg.jeffreys_beta}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    generator, order, ties = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed), random.Random(cfg.seed + 1)
    stop_ids = {tokenizer.eos_id, tokenizer.end_of_turn_id, tokenizer.encode("\n", add_bos=False)[-1]}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    anchor = {k: v.clone() for k, v in lora.lora_state(model).items()}
    saves = LoopCheckpoints(out, cfg, model, optimizer, tokenizer, lambda: {
        "generator": generator.get_state(), "order": order.getstate(), "ties": ties.getstate(), "anchor": anchor})
    start = 0
    if resume:
        start, loop = saves.resume()
        generator.set_state(loop["generator"])
        order.setstate(loop["order"])
        ties.setstate(loop["ties"])
        anchor = loop["anchor"]
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if resume else None)
    end = saves.end(start)
    objective = ObjectiveConfig(beta=cfg.beta, normalise="sequence")
    if engine is not None:
        policy, anchor_policy = EnginePolicy(engine, model), EnginePolicy(engine, model, "anchor", default=False)
        anchor_policy.refresh(anchor)  # a resumed anchor is not the policy's adapter

    def sample(prompts, group, use_anchor):
        if engine is not None:
            slot = anchor_policy.slot if use_anchor else policy.slot
            return rollout(engine, prompts, group, cfg.max_tokens, cfg.temperature, stop_ids, generator, adapter=slot)
        model.eval()
        if use_anchor:
            with lora.lora_values(model, anchor):
                return rollout(model, prompts, group, cfg.max_tokens, cfg.temperature, stop_ids, generator)
        return rollout(model, prompts, group, cfg.max_tokens, cfg.temperature, stop_ids, generator)

    def score(completions, batch, group):
        return torch.tensor([reward_fn(tokenizer.decode(c), batch[i // group])[0]
                             for i, c in enumerate(completions)]).reshape(len(batch), group)

    def evaluate(step):
        acc = greedy_accuracy(engine if engine is not None else model, tokenizer, eval_samples, correct_fn,
                              cfg.max_tokens, stop_ids)
        log.write({"step": step, "eval_accuracy": acc})
        return acc

    first_acc = (first_accuracy(out) if resume else evaluate(0)) if eval_samples else None
    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="bond", unit="step", disable=not cfg.progress)
    record = {}
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = order.sample(train_samples, min(cfg.prompts_per_step, len(train_samples)))
        prompts = [tokenizer.encode(x["prompt"], add_bos=True) for x in batch]
        anchor_c = sample(prompts, cfg.n, use_anchor=True)
        policy_c = sample(prompts, cfg.policy_samples, use_anchor=False)
        anchor_r, policy_r = score(anchor_c, batch, cfg.n), score(policy_c, batch, cfg.policy_samples)
        best = [anchor_c[p * cfg.n + i] for p, i in enumerate(best_of(anchor_r, ties))]
        bond_r = quantile_rewards(policy_r, anchor_r, cfg.n)
        advantages = (bond_r - bond_r.mean(1, keepdim=True)).reshape(-1)

        model.train()
        seqs, mask = _pad(prompts, policy_c, cfg.policy_samples, tokenizer.pad_id)
        with torch.no_grad(), lora.lora_values(model, anchor):  # before any graph: it swaps the adapters in place
            ref = completion_logprobs(model, seqs, mask, cfg.temperature)
        best_seqs, best_mask = _pad(prompts, best, 1, tokenizer.pad_id)
        logp = completion_logprobs(model, best_seqs, best_mask, cfg.temperature)
        forward = -((logp * best_mask).sum(-1) / best_mask.sum(-1).clamp(min=1)).mean()
        backward, stats = policy_loss(completion_logprobs(model, seqs, mask, cfg.temperature), advantages, mask,
                                      objective, ref_logp=ref)
        loss = (1 - cfg.jeffreys_beta) * forward + cfg.jeffreys_beta * backward
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema(anchor, lora.lora_state(model), cfg.anchor_ema)
        if engine is not None:
            policy.refresh()
            anchor_policy.refresh(anchor)
        record = {"step": step + 1, "reward": float(policy_r.mean()), "anchor_reward": float(anchor_r.mean()),
                  "anchor_best_of_n": float(anchor_r.max(1).values.mean()), "forward": float(forward.detach()),
                  "backward": float(backward.detach()), "kl_anchor": stats.get("kl", 0.0), "grad_norm": float(grad_norm),
                  "seconds": round(time.perf_counter() - t0, 2)}
        if probe is not None:
            model.eval()
            record.update(probe(model))
        if eval_samples and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            record["eval_accuracy"] = evaluate(step + 1)
        log.write(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", bon=f"{record['anchor_best_of_n']:.3f}")
        saves.stepped(step + 1)
    bar.close()
    if end < cfg.steps:  # paused by stop_after: resumable from here
        plot_bond(read_metrics(out / "metrics.jsonl"), out / "bond.png")
        return saves.paused(end, began, first_acc, record)
    last_acc = evaluate(cfg.steps) if eval_samples else None
    lora.save_adapter(out / "adapter", model.lora_config, lora.lora_state(model))
    plot_bond(read_metrics(out / "metrics.jsonl"), out / "bond.png")
    return {"out": str(out), "steps": cfg.steps, "finished": True, "seconds": round(time.perf_counter() - began, 1),
            "accuracy_before": first_acc, "accuracy_after": last_acc, "final_reward": record.get("reward"),
            "adapter": str(out / "adapter")}


def plot_bond(records: list[dict], path: Path, reference: dict | None = None):
    """The policy's single-sample reward per step against its anchor's mean and best-of-N reward;
    `reference`: horizontal lines {label: value} (e.g. the starting policy's best-of-N reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    rows = [r for r in records if "reward" in r]
    for key, label in (("reward", "policy, one sample"), ("anchor_reward", "anchor, one sample"),
                       ("anchor_best_of_n", "anchor, best of N")):
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1, label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, ls="--", color="grey", lw=1)
        ax.text(0, value, label, fontsize=8, va="bottom")
    ax.set(xlabel="step", ylabel="reward", title="BOND")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
