"""`gemma3 rl grpo | rloo | bond`: RL with verifiable rewards on LoRA adapters (train/grpo.py, train/bond.py), and
`gemma3 merge slerp | liti | average`: WARP's merges of such policies (train/merge.py)."""

from __future__ import annotations

import json

from . import options


def register(sub):
    p = sub.add_parser(
        "rl", help="reinforcement learning with verifiable rewards (GRPO, RLOO, BOND) on LoRA adapters",
        description="Sample --group completions per prompt with the policy (the model with its LoRA adapters) on "
                    "our batched decode, score them with the task's verifiable reward (plus an optional format "
                    "reward), and take one policy-gradient step per batch: GRPO (group-standardised advantages, "
                    "clipped ratio, k3 KL to the base model or a moving EMA anchor) or RLOO (leave-one-out "
                    "baseline). bond: best-of-N distillation (J-BOND): sample --n from a moving EMA anchor, train "
                    "towards the best one (forward term) and push the policy's own samples up the anchor's reward "
                    "quantiles (backward term). Writes OUT/metrics.jsonl (every reward component), a plot "
                    "(OUT/rewards.png or OUT/bond.png) and OUT/adapter (PEFT layout).")
    p.add_argument("algorithm", choices=("grpo", "rloo", "bond"),
                   help="grpo: group mean/std advantages; rloo: leave-one-out; bond: best-of-N distillation")
    options.add(p, "model", "threads", "json", "seed", defaults={"seed": 0},
                helps={"model": "policy base: GGUF file, HF-style directory or preset (default: the embedded 270M)",
                       "seed": "sampling, prompt order and LoRA initialisation seed (default: %(default)s)"})
    p.add_argument("--task", default="arithmetic",
                   help="arithmetic (built in) or reasoning-gym:NAME, e.g. reasoning-gym:basic_arithmetic")
    p.add_argument("--digits", type=options.positive_int, default=None,
                   help="arithmetic: operands below 10^DIGITS (default 2)")
    p.add_argument("--ops", default=None, help="arithmetic: the operators to draw from, a mix of + - * (default +-*)")
    p.add_argument("--prompt-style", choices=("question", "fewshot"), default=None,
                   help="arithmetic: 'question' (an instruction, the default) or 'fewshot' (four solved Q:/A: lines "
                        "first; a base model then answers after 'A:')")
    p.add_argument("--train-size", type=options.positive_int, default=1000,
                   help="problems drawn for training (default 1000; those equal to a held-out problem are dropped)")
    p.add_argument("--eval-size", type=options.count, default=200, help="held-out problems for greedy accuracy (default 200)")
    p.add_argument("--format-weight", type=options.non_negative, default=0.0,
                   help="weight of a format reward (the completion's first line is a bare number; default 0)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("rollouts")
    g.add_argument("--steps", type=options.positive_int, default=20, help="policy updates (default 20)")
    g.add_argument("--max-minutes", type=options.non_negative, default=0.0,
                   help="grpo/rloo: take no new step after this many minutes of training (default 0: no limit)")
    g.add_argument("--prompts", type=options.positive_int, default=4, help="prompts per step (default 4)")
    g.add_argument("--group", type=options.positive_int, default=8, help="completions per prompt (≥ 2; default 8)")
    g.add_argument("--max-tokens", type=options.positive_int, default=8, help="completion length cap (default 8)")
    g.add_argument("--temperature", type=options.positive, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--rollout", choices=("engine", "model"), default="engine",
                   help="engine: sample on the quantized CPU backend with the LoRA adapter applied unmerged, "
                        "refreshed each step (default); model: sample on the fp32 training model itself")
    g = p.add_argument_group("objective")
    g.add_argument("--lr", type=options.positive, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--beta", type=options.non_negative, default=0.04, help="k3 KL coefficient to the reference: the base, or the moving anchor (default 0.04)")
    g.add_argument("--epsilon", type=options.positive, default=0.2, help="ratio clip ε (default 0.2)")
    g.add_argument("--normalise", choices=("sequence", "token"), default="sequence",
                   help="mean over each completion then over completions (default), or over all tokens")
    g.add_argument("--no-scale-rewards", action="store_true", help="GRPO: do not divide by the group std")
    g.add_argument("--lora-rank", type=options.positive_int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--micro-batch", type=options.positive_int, default=8,
                   help="sequences per forward/backward in the update (default 8)")
    g.add_argument("--eval-every", type=options.count, default=0, help="held-out accuracy every N steps (default: start and end)")
    g.add_argument("--anchor-ema", type=options.fraction, default=None,
                   help="μ of the moving anchor θ_anchor ← (1 − μ)·θ_anchor + μ·θ: grpo/rloo's KL reference "
                        "instead of the base (default: the base), bond's anchor (default 0.05)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=options.count, default=0,
                   help="a resumable checkpoint (adapter, optimizer, RNGs, anchor) every N steps in OUT/checkpoints")
    g.add_argument("--stop-after", type=options.positive_int, default=None,
                   help="stop with a checkpoint after N steps of this run (continue with --resume)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/latest, exactly (same settings; checked)")
    g = p.add_argument_group("bond")
    g.add_argument("--n", type=options.positive_int, default=8, help="anchor samples per prompt, the N of best-of-N (default 8)")
    g.add_argument("--policy-samples", type=options.positive_int, default=2,
                   help="policy samples per prompt for the backward term (default 2)")
    g.add_argument("--jeffreys-beta", type=options.fraction, default=0.9,
                   help="J-BOND's β: the backward term's share of the loss, the forward (best-of-N likelihood) "
                        "term's is 1 − β (default 0.9: the forward term's noisy gradient otherwise dominates)")
    p.set_defaults(func=cmd_rl)
    register_merge(sub)


def cmd_rl(args):
    from ..inference.load import load
    from ..train import lora, rewards, tasks
    from ..train.bond import BONDConfig, train_bond
    from ..train.grpo import GRPOConfig, train_grpo
    from ..train.rl import ObjectiveConfig

    if args.algorithm == "bond" and args.n < 2:
        raise ValueError("--n must be at least 2 (best of N)")
    if args.algorithm != "bond" and args.group < 2:
        raise ValueError("--group must be at least 2 (advantages are relative to the group)")
    given = {"digits": args.digits, "ops": args.ops, "style": args.prompt_style}
    arithmetic = {k: v for k, v in given.items() if v is not None}
    if arithmetic and args.task != "arithmetic":
        raise ValueError("--digits, --ops and --prompt-style apply to --task arithmetic only")
    samples = tasks.load(args.task, args.train_size + args.eval_size, seed=args.seed, **arithmetic)
    options.set_threads(args)
    model, tok = load(args.model)
    import torch

    torch.manual_seed(args.seed)
    lora.apply_lora(model, lora.LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank))
    # held-out problems first and distinct, training on the rest: no problem is in both sets
    train, held_out = tasks.split_held_out(samples, args.eval_size) if args.eval_size else (samples, [])
    components = {"task": (1.0, tasks.task_reward)}
    if args.format_weight:
        components["format"] = (args.format_weight, rewards.format_reward(r"\s*-?\d+(\.\d+)?\s*(\n.*)?", full=True))
    engine = load(args.model, backend="cpu")[0] if args.rollout == "engine" else None
    reward_fn = rewards.Weighted(components)
    if args.algorithm == "bond":
        cfg = BONDConfig(out=args.out, steps=args.steps, prompts_per_step=args.prompts, n=args.n,
                         policy_samples=args.policy_samples, max_tokens=args.max_tokens, temperature=args.temperature,
                         lr=args.lr, beta=args.beta, jeffreys_beta=args.jeffreys_beta,
                         anchor_ema=0.05 if args.anchor_ema is None else args.anchor_ema,
                         eval_every=args.eval_every, save_every=args.save_every, stop_after=args.stop_after,
                         seed=args.seed, progress=not args.quiet)
        result = train_bond(model, tok, train, held_out, reward_fn, tasks.task_reward, cfg, engine, resume=args.resume)
        _report(args, result)
        return
    objective = ObjectiveConfig(advantage=args.algorithm, scale_rewards=not args.no_scale_rewards,
                                epsilon_low=args.epsilon, epsilon_high=args.epsilon, beta=args.beta,
                                normalise=args.normalise)
    cfg = GRPOConfig(out=args.out, steps=args.steps, prompts_per_step=args.prompts, group=args.group,
                     max_tokens=args.max_tokens, temperature=args.temperature, lr=args.lr,
                     micro_batch=args.micro_batch, eval_every=args.eval_every, seed=args.seed,
                     progress=not args.quiet, objective=objective, anchor_ema=args.anchor_ema or 0.0,
                     max_minutes=args.max_minutes, save_every=args.save_every, stop_after=args.stop_after)
    _report(args, train_grpo(model, tok, train, held_out, reward_fn, tasks.task_reward, cfg, engine, resume=args.resume))


def _report(args, result):
    if args.json:
        print(json.dumps(result))
        return
    if not result["finished"]:
        print(f"{args.algorithm}: stopped after step {result['steps']} with a checkpoint ({result['checkpoint']}); "
              f"continue with --resume")
        return
    acc = ""
    if result["accuracy_before"] is not None:
        acc = f"; held-out greedy accuracy {result['accuracy_before']:.1%} → {result['accuracy_after']:.1%}"
    print(f"{args.algorithm}: {result['steps']} steps in {result['seconds']:.0f} s, final mean reward "
          f"{result['final_reward']:.3f}{acc}; adapter in {result['adapter']}")


def register_merge(sub):
    p = sub.add_parser(
        "merge", help="merge LoRA policies fine-tuned from one base: SLERP, LITI, average (WARP)",
        description="Merges act on task vectors relative to the base model (per projection ΔW = (α/r)·B·A), "
                    "and the result is written as an adapter of rank Σ rᵢ, exactly.\n"
                    "  slerp:   spherical interpolation of two task vectors at --t (more: equal shares)\n"
                    "  liti:    one adapter moved towards the base: η·ΔW (η = 0: the base, 1: the adapter)\n"
                    "  average: the (weighted) mean of the task vectors")
    p.add_argument("how", choices=("slerp", "liti", "average"), help="the merge (see above)")
    p.add_argument("adapters", nargs="+", help="adapter directories (PEFT layout) of one base model")
    p.add_argument("--out", "-o", required=True, help="output adapter directory")
    p.add_argument("--t", type=options.fraction, default=0.5, help="slerp: interpolation point (default 0.5)")
    p.add_argument("--eta", type=options.fraction, default=0.5, help="liti: η (default 0.5)")
    p.add_argument("--weights", type=options.comma_list(options.non_negative), default=None,
                   help="average: one weight per adapter, comma-separated (default: equal)")
    options.add(p, "json")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args):
    from ..formats.peft import base_model
    from ..train import lora, merge

    cfg, tensors = merge.merge_adapters(args.adapters, args.how, t=args.t, eta=args.eta, weights=args.weights)
    lora.save_adapter(args.out, cfg, tensors, base_name=base_model(args.adapters[0]))
    result = {"out": args.out, "how": args.how, "rank": cfg.rank, "projections": len(tensors) // 2}
    print(json.dumps(result) if args.json else
          f"{args.how} of {len(args.adapters)} adapter(s) → {args.out} (rank {cfg.rank}, {result['projections']} projections)")
