"""The training subcommands of `gemma3`: distill (and distill precompute), finetune (and finetune
merge), qat. Each one wires data, model, target source and `trainer.train`; all of them run
unchanged under `torchrun --nproc-per-node N` (DDP by default, `--strategy fsdp` to shard)."""

from __future__ import annotations

import argparse
import json
import sys

from . import options


def _add_data_args(p: argparse.ArgumentParser):
    p.add_argument("--data", action="append", default=None,
                   help="training data: .txt/.md file, .jsonl with \"text\" or \"messages\" (chat; loss on model "
                        "turns only), or a directory of them (repeatable)")
    p.add_argument("--seq-len", type=options.positive_int, default=512, help="tokens per packed sequence (default 512)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    options.add(p, "seed", "threads", "json", defaults={"seed": 0},
                helps={"seed": "data order and target sampling seed (default: %(default)s)"})
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_args(p: argparse.ArgumentParser, lr: float, steps: int):
    _add_data_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=options.positive_int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=options.positive_int, default=8,
                   help="sequences per optimizer step, all ranks together (default 8)")
    g.add_argument("--micro-batch", type=options.positive_int, default=None,
                   help="sequences per forward on one rank; the rest is gradient accumulation")
    g.add_argument("--lr", type=options.positive, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--min-lr-ratio", type=options.fraction, default=0.1, help="cosine decay floor as a fraction of --lr")
    g.add_argument("--warmup", type=options.count, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--weight-decay", type=options.non_negative, default=0.0, help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--clip", type=options.non_negative, default=1.0, help="max global gradient norm (0 = off; default 1)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay fp32)")
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    g.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: DDP (replicas) or FSDP2 (sharded); default ddp")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-data", action="append", default=None, help="held-out data (same formats as --data)")
    g.add_argument("--eval-every", type=options.count, default=0, help="evaluate every N steps (default: at the end)")
    g.add_argument("--save-every", type=options.count, default=0, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--stop-after", type=options.positive_int, default=None,
                   help="stop with a checkpoint after N steps of this run (continue with --resume)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest, exactly")


def register(sub):
    p = sub.add_parser(
        "distill", help="distill a teacher into a student with 256 sampled teacher logits per token",
        description="Train a student on sparse teacher targets (the report's distillation: 256 sampled logits per token): per token, 256 ids sampled from the "
                    "teacher and the teacher's probabilities on them. `gemma3 distill precompute` runs the teacher "
                    "once and stores the targets in --out; `gemma3 distill --targets STORE` trains from them, "
                    "otherwise the teacher runs on the fly.")
    p.add_argument("action", nargs="?", choices=("train", "precompute"), default="train",
                   help="train (default) or precompute teacher targets into --out")
    p.add_argument("--teacher", default=None, help="teacher model (default: the embedded 270M)")
    p.add_argument("--student", default=None,
                   help="student: a preset name (random init), a config .json, or a model to start from")
    p.add_argument("--targets", default=None, help="precomputed target store (from `distill precompute`)")
    p.add_argument("--k", type=options.positive_int, default=256, help="teacher samples per token (default 256)")
    p.add_argument("--temperature", type=options.positive, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--target-mode", choices=("renorm", "unbiased"), default="renorm",
                   help="renorm: teacher probabilities renormalised over the sampled ids, as the report "
                        "(default); unbiased: Horvitz-Thompson weights p/π, an unbiased estimate of the dense loss")
    p.add_argument("--onehot-weight", type=options.non_negative, default=0.0, help="mix in the one-hot LM loss with this weight")
    _add_train_args(p, lr=1e-3, steps=1000)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "finetune", help="supervised fine-tuning, full weights or LoRA",
        description="SFT on text or chat JSONL (loss on model turns only). `--lora-rank R` trains LoRA adapters "
                    "(saved in PEFT layout); `gemma3 finetune merge --model BASE --adapter A --out DIR` folds an "
                    "adapter into a full model.")
    p.add_argument("action", nargs="?", choices=("train", "merge"), default="train",
                   help="train (default), or merge: fold --adapter into --model and write the full model to --out")
    options.add(p, "model", helps={"model": "model to fine-tune: GGUF file, HF-style directory or preset "
                                            "(default: the embedded 270M)"})
    p.add_argument("--lora-rank", type=options.count, default=0, help="train LoRA adapters of this rank (0 = full weights)")
    p.add_argument("--lora-alpha", type=options.positive, default=None, help="LoRA alpha (default 2 × rank)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated projections to adapt (default: all seven)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to continue training (or to merge)")
    p.add_argument("--merge", action="store_true", help="LoRA: write OUT/final as a merged full model")
    _add_train_args(p, lr=2e-5, steps=1000)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "qat", help="quantization-aware training towards the unquantized model's distribution",
        description="Fake-quantize every weight `gemma3 quantize` would store quantized (straight-through "
                    "estimator) and train towards the unquantized model's output distribution (KL). OUT/final "
                    "holds the latent float weights; at the end they are quantized with the same recipe "
                    "into --export (default OUT/quantized.gguf), which `--model` loads.")
    options.add(p, "model", helps={"model": "model to adapt: GGUF file, HF-style directory or preset "
                                            "(default: the embedded 270M)"})
    p.add_argument("--format", default="int4-block32", choices=("int4-block32", "int4-channel", "sfp8"),
                   help="target format (default int4-block32)")
    p.add_argument("--recipe", default=None, help="per-weight formats as for `gemma3 quantize --recipe`")
    p.add_argument("--temperature", type=options.positive, default=1.0, help="teacher temperature (default 1)")
    p.add_argument("--train-embeddings", action="store_true",
                   help="train the tied embedding / LM head too (default: frozen, still read quantized as "
                        "exported; training it needs its gradient, optimizer state and a teacher copy: ~4.5 GB "
                        "more RAM for the 270M)")
    p.add_argument("--export", default=None,
                   help="where `gemma3 quantize` writes the QAT model: OUT.gguf or a directory (default "
                        "OUT/quantized.gguf, which runs on the C++ kernels; OUT/quantized for formats without "
                        "a GGUF type)")
    _add_train_args(p, lr=1e-5, steps=500)
    # On by default with the embedding frozen: without it every layer's fake-quantized weight (and
    # activation) is kept for the backward pass, 0.4 GB more for the 270M, which would not fit in 3 GB.
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep activations and fake-quantized weights for the backward pass instead of "
                        "recomputing them per layer (default: checkpointing unless --train-embeddings)")
    p.set_defaults(func=cmd_qat, checkpointing=None)


def _train_config(args, **extra):
    from ..train.trainer import TrainConfig

    return TrainConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
        bf16=args.bf16, checkpointing=args.checkpointing, seed=args.seed,
        eval_every=args.eval_every or (args.steps if args.eval_data else 0), save_every=args.save_every,
        stop_after=args.stop_after, strategy=args.strategy, progress=not args.quiet,
        extra={"argv": sys.argv[1:], **extra})


def _setup(args):
    from ..train.distributed import setup

    options.set_threads(args)
    return setup(getattr(args, "strategy", "ddp"))


def _datasets(args, tok):
    from ..train.data import PackedDataset

    if not args.data:
        raise ValueError(f"{args.command} needs --data")
    data = PackedDataset.from_files(args.data, tok, args.seq_len)
    eval_data = PackedDataset.from_files(args.eval_data, tok, args.seq_len) if getattr(args, "eval_data", None) else None
    return data, eval_data


def _report(args, ctx, result: dict, human: str):
    if ctx.is_main:
        print(json.dumps(result) if args.json else human)


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def cmd_distill(args):
    from pathlib import Path

    from ..formats.tokenizer import Tokenizer
    from ..inference.load import load, load_tokenizer
    from ..train import distill, student
    from ..train.distributed import teardown
    from ..train.trainer import WithOneHot, train

    ctx = _setup(args)
    # A store carries its teacher's tokenizer: the data must be tokenized as the teacher saw it.
    tok = Tokenizer.from_dir(args.targets) if args.targets and args.action == "train" else load_tokenizer(args.teacher)
    data, eval_data = _datasets(args, tok)
    if args.action == "precompute":
        if ctx.distributed:
            raise ValueError("distill precompute runs in one process (start it without torchrun)")
        teacher = _frozen(load(args.teacher)[0]).to(ctx.device)
        meta = distill.precompute(teacher, data, args.out, k=args.k, temperature=args.temperature,
                                  mode=args.target_mode, seed=args.seed, batch_size=args.micro_batch or 4,
                                  teacher_name=str(args.teacher or "270m"), progress=not args.quiet)
        tok.save(args.out)
        _report(args, ctx, meta, f"{meta['sequences']} sequences × {meta['seq_len']} tokens: "
                f"{meta['ids_per_target_token']:.1f} distinct ids per token, {meta['bytes'] / 2**20:.1f} MiB "
                f"in {args.out} ({meta['seconds']:.0f} s)")
        return
    if args.student is None:
        raise ValueError("distill needs --student (a preset, a config .json or a model)")
    if args.targets:
        source = distill.TargetStore(args.targets)
        source.check(data)
    else:
        teacher = _frozen(load(args.teacher)[0]).to(ctx.device)
        source = distill.TeacherTargets(teacher, args.k, args.temperature, args.target_mode, args.seed)
    if args.onehot_weight:
        source = WithOneHot(source, args.onehot_weight)
    if Path(args.student).is_dir() or args.student.endswith(".gguf"):
        model = load(args.student)[0]
    else:
        model = student.new_model(student.student_config(args.student, tok.vocab_size), seed=args.seed)
    result = train(model, data, source, _train_config(args), tokenizer=tok, eval_data=eval_data,
                   resume=args.resume, ctx=ctx)
    result["student_params"] = model.config.num_params()
    _report(args, ctx, result, _summary(result))
    teardown(ctx)


def cmd_finetune(args):
    from pathlib import Path

    from ..formats.checkpoint import save_hf_dir
    from ..inference.load import load
    from ..train import lora
    from ..train.distributed import teardown
    from ..train.trainer import one_hot, train

    if args.action == "merge":
        if not args.adapter:
            raise ValueError("finetune merge needs --adapter")
        model, tok = load(args.model)
        lora.merge_lora(lora.load_adapter(model, args.adapter))
        save_hf_dir(args.out, model.config, {k: v.detach() for k, v in model.state_dict().items()})
        tok.save(args.out)
        print(json.dumps({"out": args.out}) if args.json else f"merged model written to {args.out}")
        return
    ctx = _setup(args)
    model, tok = load(args.model)
    # What an adapter's `base_model_name_or_path` names, so `--model OUT/final` finds its base.
    model.base_name = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() \
        else (args.model or "270m")
    if args.adapter:
        lora.load_adapter(model, args.adapter)
    elif args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora.apply_lora(model, lora.LoRAConfig(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, targets))
    data, eval_data = _datasets(args, tok)
    result = train(model, data, one_hot, _train_config(args), tokenizer=tok, eval_data=eval_data,
                   resume=args.resume, merge_lora=args.merge, ctx=ctx)
    _report(args, ctx, result, _summary(result))
    teardown(ctx)


def cmd_qat(args):
    import gc
    from pathlib import Path

    from ..formats.checkpoint import read_gguf_model
    from ..inference.convert import convert
    from ..inference.load import load, resolve
    from ..quant.store import check_output, without_gguf_type
    from ..server.arenas import map_large_blocks, release_free_memory
    from ..train import qat
    from ..train.distributed import teardown
    from ..train.trainer import train

    # What fits the 270M in 3 GB and costs time (mapped blocks, recomputation, a teacher decoding
    # its GGUF) comes with the frozen embedding; a run that trains it needs ~7 GB anyway.
    low_memory = not args.train_embeddings
    if args.checkpointing is None:
        args.checkpointing = low_memory
    if low_memory:
        map_large_blocks()  # freed gradients leave between steps instead of adding to the next peak
    ctx = _setup(args)
    recipe = qat.recipe_for(args.format, args.recipe)
    export = args.export or str(Path(args.out) / ("quantized" if without_gguf_type(recipe) else "quantized.gguf"))
    check_output(export, recipe)
    model, tok = load(args.model)
    source = resolve(args.model)
    # From a GGUF file the teacher's projections are read from its blocks (qat.DecodingLinear).
    tensors = read_gguf_model(source)[2] if low_memory and source.is_file() and ctx.device.type == "cpu" else None
    teacher = qat.teacher_of(model, share_embedding=not args.train_embeddings, source=tensors).to(ctx.device)
    qat.apply_fake_quant(model, recipe, train_embeddings=args.train_embeddings)
    release_free_memory()  # the loader's and the quantizer's temporaries, before the optimizer state
    data, eval_data = _datasets(args, tok)
    result = train(model, data, qat.TeacherDistribution(teacher, args.temperature),
                   _train_config(args, recipe=recipe.spec, train_embeddings=args.train_embeddings),
                   tokenizer=tok, eval_data=eval_data, resume=args.resume, ctx=ctx)
    result["recipe"] = recipe.spec
    del model, teacher  # the export reads OUT/final: the training copies would only add to its peak
    gc.collect()
    release_free_memory()
    if result.get("final") and ctx.is_main:
        result["quantized"] = convert(result["final"], recipe, export)
    _report(args, ctx, result, _summary(result) + (f"\nquantized ({recipe.spec}): {export}" if result.get("final") else ""))
    teardown(ctx)


def _summary(r: dict) -> str:
    import math

    lines = [f"{r['steps']} steps in {r['seconds']:.0f} s" + (
        f", final train loss {r['final_loss']:.4f}" if r["final_loss"] is not None else " (nothing left to train)")]
    if r.get("eval_loss") is not None:
        lines.append(f"held-out NLL {r['eval_loss']:.4f} (ppl {math.exp(r['eval_loss']):.2f})")
    lines.append(f"model: {r['final']}" if r.get("final") else f"stopped early; resume with --resume (out {r['out']})")
    return "\n".join(lines)
