"""Policy-gradient objectives for RL with verifiable rewards: GRPO (Shao et al., 2024) and RLOO
(Ahmadian et al., 2024), on per-token log-probabilities of sampled completions.

Each prompt gets a *group* of G completions; rewards are [P·G], laid out group after group.
- Advantages: GRPO centres each reward on its group mean and (by default) divides by the group's
  standard deviation (Bessel-corrected, + 1e-4, as TRL); RLOO subtracts the mean of the *other*
  G − 1 rewards (the leave-one-out baseline, unbiased), unscaled.
- Per token: ratio ρ = exp(logπ − logπ_old); loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)
  + β·KL, with KL to the reference by the k3 estimator exp(r) − r − 1, r = logπ_ref − logπ
  (Schulman, 2020: unbiased, always ≥ 0).
- Normalisation: "sequence" averages each completion's tokens, then the completions (GRPO's paper,
  TRL's loss_type="grpo"); "token" averages over every completion token of the batch (DAPO, TRL's
  "bnpo"), so long completions weigh more.
With one optimisation step per rollout batch, π_old = π (detached): ρ = 1 and the gradient is the
plain policy gradient; the clip matters when a batch is reused for several steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ObjectiveConfig:
    advantage: str = "grpo"  # "grpo" (group mean / std) or "rloo" (leave-one-out mean)
    scale_rewards: bool = True  # GRPO: divide by the group std (Dr. GRPO turns it off)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04  # KL coefficient (0: no reference model needed)
    normalise: str = "sequence"  # "sequence" or "token"

    def __post_init__(self):
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"advantage must be 'grpo' or 'rloo', got {self.advantage!r}")
        if self.normalise not in ("sequence", "token"):
            raise ValueError(f"normalise must be 'sequence' or 'token', got {self.normalise!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, cfg: ObjectiveConfig = ObjectiveConfig()) -> torch.Tensor:
    """Advantages [P·G] for rewards [P·G] in groups of `group_size` consecutive completions."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("group-relative advantages need at least 2 completions per prompt")
    r = rewards.reshape(-1, group_size).float()
    if cfg.advantage == "rloo":
        baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
        return (r - baseline).reshape(-1)
    advantages = r - r.mean(1, keepdim=True)
    if cfg.scale_rewards:
        advantages = advantages / (r.std(1, keepdim=True) + 1e-4)  # torch.std is Bessel-corrected
    return advantages.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate exp(r) − r − 1 with r = logπ_ref − logπ."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def policy_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cfg: ObjectiveConfig,
                old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None):
    """The clipped surrogate (+ β·KL) over completion tokens: `logp`, `old_logp`, `ref_logp`, `mask`
    are [B, T] (mask 1 on completion tokens), `advantages` [B]. Returns (loss, stats)."""
    mask = mask.to(logp.dtype)
    old_logp = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token = -torch.min(ratio * a, clipped * a)
    stats = {}
    if cfg.beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + cfg.beta * kl
        stats["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    if cfg.normalise == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    clipped_tokens = ((ratio < 1 - cfg.epsilon_low) & (a < 0)) | ((ratio > 1 + cfg.epsilon_high) & (a > 0))
    stats["clip_fraction"] = float((clipped_tokens * mask.detach()).sum() / mask.sum().clamp(min=1))
    return loss, stats


def completion_logprobs(model, sequences: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log π(token_t | tokens_<t) [B, L] for `sequences` [B, L] (prompt + completion, right-padded),
    0 where `completion_mask` is 0. Logits are computed only at the positions that predict a
    completion token, so the [tokens, vocab] tensor covers completions, not prompts."""
    hidden = model.hidden_states(sequences)  # [B, L, D]
    out = torch.zeros(sequences.shape, dtype=hidden.dtype, device=hidden.device)
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)
    cols = cols + 1  # position t is predicted by the hidden state at t − 1
    logits = model.logits(hidden[rows, cols - 1]).float() / temperature
    picked = torch.log_softmax(logits, -1).gather(1, sequences[rows, cols][:, None])[:, 0]
    return out.index_put((rows, cols), picked.to(out.dtype))
