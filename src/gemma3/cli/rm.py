"""`gemma3 rm pairs | train | warm | eval`: Bradley–Terry reward models and WARM (train/reward_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

from . import options


def register(sub):
    p = sub.add_parser(
        "rm", help="reward models: Bradley–Terry on preference pairs, WARM weight averaging",
        description="A reward model is the Gemma 3 backbone with a scalar head on the last token; the top "
                    "--trainable-layers layers, the final norm and the head are trained on preference pairs "
                    "(JSONL lines {prompt, chosen, rejected}) with the Bradley–Terry loss.\n"
                    "  pairs: write pairs built from the arithmetic task (correct vs near-miss answers)\n"
                    "  train: train one reward model on --pairs\n"
                    "  warm:  train --models reward models from one initialisation (different seeds, data "
                    "orders, learning rates) and average their weights into one (WARM)\n"
                    "  eval:  accuracy of a reward model (OUT of train or warm) on --pairs")
    p.add_argument("action", choices=("pairs", "train", "warm", "eval"), help="what to do (see above)")
    options.add(p, "model", "threads", "json", "seed", defaults={"seed": 0},
                helps={"model": "backbone: GGUF file, HF-style directory or preset (default: the embedded 270M)",
                       "seed": "seed of the pairs, the head initialisation and the data order (default: %(default)s)"})
    p.add_argument("--pairs", help="preference pairs (JSONL) to train on, evaluate on, or (pairs) write")
    p.add_argument("--eval-pairs", help="held-out pairs whose accuracy train and warm report")
    p.add_argument("--rm", help="eval: the reward model directory")
    p.add_argument("--out", "-o", help="train, warm: output directory")
    p.add_argument("--count", type=options.positive_int, default=500, help="pairs: how many (default 500)")
    p.add_argument("--trainable-layers", type=options.count, default=1, help="top decoder layers trained (default 1)")
    p.add_argument("--lr", type=options.positive, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--epochs", type=options.positive_int, default=2, help="passes over the pairs (default 2)")
    p.add_argument("--batch", type=options.positive_int, default=8, help="pairs per step (default 8)")
    p.add_argument("--models", type=options.positive_int, default=4, help="warm: reward models averaged (default 4)")
    p.add_argument("--lr-spread", type=options.positive, default=2.0,
                   help="warm: learning rates spread geometrically over [lr/s, lr·s] (default 2)")
    p.add_argument("--bootstrap", action="store_true",
                   help="train on a resample of the pairs with replacement; warm: each member its own "
                        "(bagging: under label noise the average then gains over its members, "
                        "scripts/warm_demo.py)")
    p.set_defaults(func=cmd_rm)


def _need(args, *names):
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"rm {args.action} needs {' and '.join(missing)}")


def cmd_rm(args):
    from ..train import reward_model as rmod
    from ..train import tasks

    options.set_threads(args)
    if args.action == "pairs":
        _need(args, "pairs")
        pairs = tasks.arithmetic_pairs(args.count, seed=args.seed)
        Path(args.pairs).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(json.dumps({"pairs": args.pairs, "count": len(pairs)}) if args.json
              else f"wrote {len(pairs)} pairs to {args.pairs}")
        return
    from ..inference.load import load

    if args.action == "eval":
        _need(args, "rm", "pairs")
        cfg, state = rmod.read_rm(args.rm)
        backbone, tok = load(args.model if args.model is not None else cfg.base)
        rm = rmod.load_trained_state(rmod.RewardModel(backbone, cfg.trainable_layers), state)
        acc = rmod.accuracy(rm, rmod.PairFeatures(rm, *rmod.encode_pairs(tok, rmod.read_pairs(args.pairs))))
        print(json.dumps({"rm": args.rm, "pairs": args.pairs, "accuracy": acc}) if args.json
              else f"{args.rm}: accuracy {acc:.1%} on {args.pairs}")
        return
    _need(args, "pairs", "out")
    backbone, tok = load(args.model)
    rm = rmod.RewardModel(backbone, args.trainable_layers, head_seed=args.seed)
    feats = rmod.PairFeatures(rm, *rmod.encode_pairs(tok, rmod.read_pairs(args.pairs)))
    held = (rmod.PairFeatures(rm, *rmod.encode_pairs(tok, rmod.read_pairs(args.eval_pairs)))
            if args.eval_pairs else None)
    cfg = rmod.RMConfig(args.trainable_layers, args.lr, args.epochs, args.batch, args.seed, args.model, args.bootstrap)
    if args.action == "train":
        rmod.train_rm(rm, feats, cfg)
        rmod.save_rm(args.out, rm, cfg)
        result = {"out": args.out, "train_accuracy": rmod.accuracy(rm, feats),
                  "eval_accuracy": rmod.accuracy(rm, held) if held else None}
    else:
        members, averaged = rmod.train_warm(rm, feats, cfg, args.models, args.lr_spread)
        for i, (member_cfg, state) in enumerate(members):
            rmod.save_rm(Path(args.out) / f"member{i}", rmod.load_trained_state(rm, state), member_cfg)
        rmod.save_rm(args.out, rmod.load_trained_state(rm, averaged), cfg, {"warm_members": len(members)})
        result = {"out": args.out, "members": [c.seed for c, _ in members]}
        if held:
            result["member_eval_accuracy"] = [rmod.accuracy(rmod.load_trained_state(rm, s), held) for _, s in members]
            result["eval_accuracy"] = rmod.accuracy(rmod.load_trained_state(rm, averaged), held)
    if args.json:
        print(json.dumps(result))
        return
    print(f"reward model in {args.out}")
    for i, a in enumerate(result.get("member_eval_accuracy", [])):
        print(f"  member {i}: held-out accuracy {a:.1%}")
    if result.get("eval_accuracy") is not None:
        print(f"held-out accuracy {result['eval_accuracy']:.1%}")
