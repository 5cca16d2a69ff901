"""`gemma3 bench`: load time, prefill and decode speed, peak memory; optionally side by side with
llama.cpp (llama-cpp-python) on the same GGUF, same threads, same context size.

Every measurement runs in a fresh worker process (a cold load, and a peak RSS that belongs to one
side only); repetitions alternate the two sides and the figures are medians. The model file is
read once first (warm_page_cache): both sides load it from the page cache, neither from disk.
Both sides get the same token ids (a fixed pseudo-random sequence after <bos>, so no text file is
needed), the same warm-up, and a greedy decode loop that includes the argmax over the vocabulary.

`--lookup` adds, on our side only, greedy generation after a prompt that repeats its input (a
pseudo-random passage, then its first tokens again: the model goes on copying it, as when editing
or quoting a document), plain and with prompt-lookup speculative decoding, back to back.
`--draft-model FILE` adds, on our side only, greedy generation after an ordinary instruction,
plain and with the draft model drafting `--draft-k` tokens per step, back to back.

This file imports only the standard library at module level: the llama.cpp worker runs it as a
plain script under another interpreter (`--llama-python`), which need not have torch or gemma3.
The command's options are defined in cli/evaluate.py; a worker gets its part of them as JSON.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PREFILL_LENGTHS = (512, 2048)
DECODE_TOKENS = 256
PROMPT_TOKENS = 16  # decode starts after a short prompt, like llama-bench's tg runs
BATCH_STEPS = 32  # decode steps per batched-decode measurement
WARMUP_TOKENS = 32
REPEAT_PASSAGE, REPEAT_TOKENS = 200, 128  # --lookup: the passage the prompt repeats, tokens generated
# --draft-model: free text (drafts are guesses, not copies), as a chat turn, REPEAT_TOKENS generated
DRAFT_PROMPT = "Explain how a refrigerator keeps food cold, step by step."
BOS = 2


def token_ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [BOS] + [rng.randrange(1000, 200_000) for _ in range(n - 1)]


def repeat_prompt() -> list[int]:
    """<bos>, a passage, then its first 8 tokens again: the greedy continuation copies the rest."""
    passage = token_ids(REPEAT_PASSAGE + 1, seed=7)[1:]
    return [BOS] + passage + passage[:8]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def emit(key: str, value):
    """One result per line, flushed: a worker that dies later keeps what it measured."""
    print(json.dumps({key: value}), flush=True)


# ---- workers (one process each) -------------------------------------------------------------------


def run_ours(args):
    import torch

    torch.set_num_threads(args.threads)
    from ..inference.load import load

    def loaded(path):
        if args.device == "cuda":  # bf16 float weights: the quantized kernels are CPU-only
            model, tok = load(path, dtype=torch.bfloat16, backend="torch")
            return model.to("cuda"), tok
        return load(path, backend=args.backend)

    start = time.perf_counter()
    model, tok = loaded(args.model)
    emit("load_s", time.perf_counter() - start)

    def step(ids, cache):  # greedy next tokens, as `generate` decodes; .tolist() waits for the GPU
        return model.greedy_next(torch.tensor(ids, device=model.device), cache).tolist()

    # One single-row cache for every phase, cleared between them, as llama.cpp clears and reuses
    # its one context: a new cache's pages are made resident by the first prompt written to them
    # (~6% of a 270M prefill of 512 tokens), a cost llama.cpp's timed phases never see either.
    single = None

    def cleared():
        nonlocal single
        if single is None:
            single = model.new_cache(1, max_len=args.ctx)
        single.clear()
        return single

    with torch.inference_mode():
        for phase in args.phases:
            if phase == "warmup":  # single-token steps, then one multi-token batch
                cache = cleared()
                tokens = [BOS]
                for _ in range(4):
                    tokens = step([tokens], cache)
            elif phase == "warmup_batch":
                step([token_ids(WARMUP_TOKENS, 1)], cleared())
            elif phase.startswith("prefill"):
                n = int(phase[len("prefill"):])
                ids = [token_ids(n)]
                cache = cleared()
                start = time.perf_counter()
                step(ids, cache)
                emit(phase, n / (time.perf_counter() - start))
            elif phase == "decode":
                cache = cleared()
                tokens = step([token_ids(PROMPT_TOKENS)], cache)
                start = time.perf_counter()
                for _ in range(args.decode):
                    tokens = step([tokens], cache)
                emit("decode", args.decode / (time.perf_counter() - start))
                emit("peak_rss_mb", peak_rss_mb())
            elif phase in ("repeat_plain", "repeat_lookup"):
                from ..inference.generate import generate_step
                from ..inference.sampling import SamplingParams
                from ..inference.speculative import PromptLookup

                drafter = PromptLookup() if phase == "repeat_lookup" else None
                start, n = None, 0
                for _ in generate_step(model, repeat_prompt(), SamplingParams(), REPEAT_TOKENS, speculative=drafter):
                    start, n = start or time.perf_counter(), n + 1  # timed from the first token: decode only
                emit(phase, (n - 1) / (time.perf_counter() - start))
                if drafter is not None:
                    emit("repeat_acceptance", drafter.stats.acceptance)
                    emit("repeat_tokens_per_step", drafter.stats.tokens_per_step)
            elif phase in ("draft_plain", "draft"):
                from ..formats.tokenizer import apply_chat_template
                from ..inference.generate import generate_step
                from ..inference.prompt import encode_prompt
                from ..inference.sampling import SamplingParams
                from ..inference.speculative import DraftModel

                drafter = DraftModel(loaded(args.draft_model)[0], k=args.draft_k) if phase == "draft" else None
                prompt = encode_prompt(tok, apply_chat_template([{"role": "user", "content": DRAFT_PROMPT}]))
                start, n = None, 0
                for _ in generate_step(model, prompt, SamplingParams(), REPEAT_TOKENS, speculative=drafter):
                    start, n = start or time.perf_counter(), n + 1  # timed from the first token: decode only
                emit(phase, (n - 1) / (time.perf_counter() - start))
                if drafter is not None:
                    emit("draft_acceptance", drafter.stats.acceptance)
                    emit("draft_tokens_per_step", drafter.stats.tokens_per_step)
            elif phase.startswith("batch"):
                b = int(phase[len("batch"):])
                cache = model.new_cache(b, max_len=PROMPT_TOKENS + BATCH_STEPS + 1)
                tokens = step([token_ids(PROMPT_TOKENS, seed=r) for r in range(b)], cache)
                start = time.perf_counter()
                for _ in range(BATCH_STEPS):
                    tokens = step([[t] for t in tokens], cache)
                emit(phase, b * BATCH_STEPS / (time.perf_counter() - start))


def run_llama(args):
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    start = time.perf_counter()
    mparams = L.llama_model_default_params()
    # llama.cpp's extra buffer types (AMX / repacked weights) are its default; some builds crash
    # in them on multi-token batches, so the bench can measure those phases without them.
    mparams.use_extra_bufts = not args.no_extra_bufts
    model = L.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.model}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    def context(n_ctx, n_seq=1):
        p = L.llama_context_default_params()
        # n_batch: tokens one llama_decode may take; never below the default lengths' 2048, which the
        # warm-up and batched phases stay within whatever --prefill asks for.
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, max(PREFILL_LENGTHS + tuple(args.prefill)), 512
        p.n_seq_max, p.n_threads, p.n_threads_batch = n_seq, args.threads, args.threads
        if n_seq > 1:
            p.kv_unified = True
        ctx = L.llama_init_from_model(model, p)
        if not ctx:
            raise SystemExit("llama.cpp could not create a context")
        return ctx

    ctx = context(args.ctx)
    emit("load_s", time.perf_counter() - start)

    def step(ctx, ids):
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return [int(logits.argmax())]

    def clear(ctx):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

    for phase in args.phases:
        if phase == "warmup":
            clear(ctx)
            tokens = [BOS]
            for _ in range(4):
                tokens = step(ctx, tokens)
        elif phase == "warmup_batch":
            clear(ctx)
            step(ctx, token_ids(WARMUP_TOKENS, 1))
        elif phase.startswith("prefill"):
            n = int(phase[len("prefill"):])
            ids = token_ids(n)
            clear(ctx)
            start = time.perf_counter()
            step(ctx, ids)
            emit(phase, n / (time.perf_counter() - start))
        elif phase == "decode":
            clear(ctx)
            tokens = token_ids(PROMPT_TOKENS)
            for t in tokens[:-1]:  # the prompt one token at a time: single-token batches only
                step(ctx, [t])
            tokens = step(ctx, tokens[-1:])
            start = time.perf_counter()
            for _ in range(args.decode):
                tokens = step(ctx, tokens)
            emit("decode", args.decode / (time.perf_counter() - start))
            emit("peak_rss_mb", peak_rss_mb())
        elif phase.startswith("batch"):
            b = int(phase[len("batch"):])
            bctx = context(b * (PROMPT_TOKENS + BATCH_STEPS + 1), n_seq=b)
            batch = L.llama_batch_init(b * PROMPT_TOKENS, 0, 1)

            def decode_rows(rows, pos):
                batch.n_tokens = 0
                for seq, ids in enumerate(rows):
                    for i, t in enumerate(ids):
                        k = batch.n_tokens
                        batch.token[k], batch.pos[k], batch.n_seq_id[k] = t, pos + i, 1
                        batch.seq_id[k][0], batch.logits[k] = seq, i == len(ids) - 1
                        batch.n_tokens += 1
                if L.llama_decode(bctx, batch) != 0:
                    raise SystemExit("llama_decode failed")
                out = []
                for k in range(batch.n_tokens):
                    if batch.logits[k]:
                        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(bctx, k), shape=(n_vocab,))
                        out.append([int(logits.argmax())])
                return out

            tokens = decode_rows([token_ids(PROMPT_TOKENS, seed=r) for r in range(b)], 0)
            start = time.perf_counter()
            for s in range(BATCH_STEPS):
                tokens = decode_rows(tokens, PROMPT_TOKENS + s)
            emit(phase, b * BATCH_STEPS / (time.perf_counter() - start))
            L.llama_batch_free(batch)
            L.llama_free(bctx)


# ---- orchestration ----------------------------------------------------------------------------------


def worker_command(python, side, args, phases, no_extra_bufts=False):
    """One worker process: this file as a plain script (llama.cpp's side, another interpreter) or
    as gemma3's module, told what to do by one JSON argument."""
    spec = {"worker": side, "model": args.model_path, "threads": args.threads, "ctx": args.ctx,
            "decode": args.decode, "phases": phases, "no_extra_bufts": no_extra_bufts, "prefill": args.prefill}
    if side == "ours":
        spec |= {"backend": args.backend, "device": args.device, "draft_model": args.draft_model_path,
                 "draft_k": args.draft_k}
    head = [python, os.path.abspath(__file__)] if side == "llama" else [python, "-m", "gemma3.eval.bench"]
    return head + [json.dumps(spec)]


def run_worker(cmd) -> tuple[dict, int, str]:
    """(results, return code, stderr tail) of one worker process."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        err.seek(0)
        tail = err.read()[-2000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    return results, proc.returncode, tail


def phases_for(args, side: str) -> list[str]:
    return (["warmup", "decode", "warmup_batch"] + [f"prefill{n}" for n in args.prefill]
            + [f"batch{b}" for b in args.batch]
            + (["repeat_plain", "repeat_lookup"] if args.lookup and side == "ours" else [])
            + (["draft_plain", "draft"] if args.draft_model and side == "ours" else []))


class Side:
    """Repeated measurements of one implementation."""

    def __init__(self, name, python):
        self.name, self.python = name, python
        self.samples: dict[str, list[float]] = {}
        self.fallback_phases: set[str] = set()  # llama.cpp phases that need --no-extra-bufts
        self.notes: list[str] = []

    def measure(self, args):
        side = "llama" if self.name == "llama_cpp" else "ours"
        phases = phases_for(args, side)
        first = [p for p in phases if p not in self.fallback_phases
                 and not (p == "warmup_batch" and self.fallback_phases)]
        results, rc, err = run_worker(worker_command(self.python, side, args, first))
        missing = [p for p in phases if not p.startswith("warmup") and p not in results]
        if rc != 0 and side == "llama" and missing:
            # A crash inside llama.cpp's extra buffer types: redo the rest without them.
            self.fallback_phases.update(missing)
            self.notes.append(f"llama.cpp exited with code {rc} in its default configuration during "
                              f"{', '.join(missing)}; those phases ran with use_extra_bufts=False")
            more, rc, err = run_worker(worker_command(self.python, side, args, ["warmup_batch"] + missing, True))
            results.update({k: v for k, v in more.items() if k in missing})
            results["peak_rss_mb"] = max(results.get("peak_rss_mb", 0), more.get("peak_rss_mb", 0))
        elif self.fallback_phases and side == "llama":
            more, rc, err = run_worker(worker_command(self.python, side, args,
                                                      ["warmup_batch"] + sorted(self.fallback_phases), True))
            results.update({k: v for k, v in more.items() if k in self.fallback_phases})
        missing = [p for p in phases if not p.startswith("warmup") and p not in results]
        if missing:
            raise RuntimeError(f"{self.name} worker failed (exit code {rc}) before {', '.join(missing)}:\n{err}")
        for key, value in results.items():
            self.samples.setdefault(key, []).append(value)

    def figures(self, args) -> dict:
        med = {k: statistics.median(v) for k, v in self.samples.items()}
        out = {"load_s": round(med["load_s"], 3),
               "prefill_tok_s": {str(n): round(med[f"prefill{n}"], 1) for n in args.prefill},
               "decode_tok_s": round(med["decode"], 2),
               "peak_rss_mb": round(med["peak_rss_mb"], 1)}
        if args.batch:
            out["batch_decode_tok_s"] = {str(b): round(med[f"batch{b}"], 1) for b in args.batch}
        if "repeat_lookup" in med:
            out["lookup"] = {"plain_tok_s": round(med["repeat_plain"], 1),
                             "lookup_tok_s": round(med["repeat_lookup"], 1),
                             "speedup": round(med["repeat_lookup"] / med["repeat_plain"], 2),
                             "acceptance": round(med["repeat_acceptance"], 3),
                             "tokens_per_step": round(med["repeat_tokens_per_step"], 2)}
        if "draft" in med:
            out["draft"] = {"model": os.path.basename(args.draft_model_path), "k": args.draft_k,
                            "plain_tok_s": round(med["draft_plain"], 1), "draft_tok_s": round(med["draft"], 1),
                            "speedup": round(med["draft"] / med["draft_plain"], 2),
                            "acceptance": round(med["draft_acceptance"], 3),
                            "tokens_per_step": round(med["draft_tokens_per_step"], 2)}
        return out


def ratios(ours: dict, theirs: dict) -> dict:
    """>1 means we are better: speeds ours/theirs, times and memory theirs/ours."""
    def r(a, b):
        return round(a / b, 3) if b else None

    out = {"load_s": r(theirs["load_s"], ours["load_s"]),
           "prefill_tok_s": {k: r(v, theirs["prefill_tok_s"][k]) for k, v in ours["prefill_tok_s"].items()},
           "decode_tok_s": r(ours["decode_tok_s"], theirs["decode_tok_s"]),
           "peak_rss_mb": r(theirs["peak_rss_mb"], ours["peak_rss_mb"])}
    if "batch_decode_tok_s" in ours:
        out["batch_decode_tok_s"] = {k: r(v, theirs["batch_decode_tok_s"][k]) for k, v in ours["batch_decode_tok_s"].items()}
    return out


def llama_python(requested: str | None) -> str:
    if requested:
        return requested
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("--against llama.cpp needs llama-cpp-python: install the extra with "
                         "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python, or point "
                         "--llama-python at an interpreter that has it")
    return sys.executable


def table(result: dict, args) -> str:
    sides = [k for k in ("ours", "llama_cpp") if k in result]
    rows = [("load (s)", lambda f: f["load_s"], "{:.2f}"),
            *[(f"prefill {n} (tok/s)", lambda f, n=str(n): f["prefill_tok_s"][n], "{:.0f}") for n in args.prefill],
            (f"decode {args.decode} (tok/s)", lambda f: f["decode_tok_s"], "{:.1f}"),
            ("peak RSS (MB)", lambda f: f["peak_rss_mb"], "{:.0f}"),
            *[(f"batch {b} decode (tok/s)", lambda f, b=str(b): f["batch_decode_tok_s"][b], "{:.0f}") for b in args.batch]]
    head = ["", *[{"ours": "gemma3", "llama_cpp": "llama.cpp"}[s] for s in sides]] + (["ratio"] if "ratio" in result else [])
    lines = [head]
    for label, get, fmt in rows:
        line = [label, *[fmt.format(get(result[s])) for s in sides]]
        if "ratio" in result:
            line.append(f"{get(result['ratio']):.2f}x")
        lines.append(line)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))) for l in lines]
    lookup = result["ours"].get("lookup")
    if lookup:
        text.append(f"repeat-the-input {REPEAT_TOKENS} tokens (ours): plain {lookup['plain_tok_s']:.1f} tok/s, "
                    f"--lookup {lookup['lookup_tok_s']:.1f} tok/s ({lookup['speedup']:.2f}x; "
                    f"{lookup['acceptance']:.0%} of drafted tokens accepted, {lookup['tokens_per_step']:.2f} "
                    "tokens per step)")
    draft = result["ours"].get("draft")
    if draft:
        text.append(f"free text {REPEAT_TOKENS} tokens (ours): plain {draft['plain_tok_s']:.1f} tok/s, "
                    f"--draft-model {draft['model']} --draft-k {draft['k']} {draft['draft_tok_s']:.1f} tok/s "
                    f"({draft['speedup']:.2f}x; {draft['acceptance']:.0%} of drafted tokens accepted, "
                    f"{draft['tokens_per_step']:.2f} tokens per step)")
    m = result.get("machine")
    if m:
        text.append(f"({m['cpu']}, {m['threads']} threads; our path: {m['isa']})")
    return "\n".join(text)


def machine(args) -> dict:
    """What the figures were measured on: the CPU, the instruction-set path our side took, threads."""
    from ..cpu import kernels

    return {"cpu": kernels.cpu_model(), "isa": kernels.isa() if args.device == "cpu" and args.backend == "cpu"
            else f"torch-{args.device}", "threads": args.threads}


def warm_page_cache(path: str, chunk: int = 16 << 20):
    """Reads the model file once, so that every load measures a file in the page cache: a file
    read from disk (seconds for a 2.5 GB 4B model, minutes where the disk is slow) would be
    charged to whichever side happens to load it first."""
    if os.path.isfile(path):
        buf = bytearray(chunk)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def bench(args) -> dict:
    from ..inference.load import resolve

    args.model_path = str(resolve(args.model))
    args.draft_model_path = str(resolve(args.draft_model)) if args.draft_model else None
    if args.draft_model and not 1 <= args.draft_k <= 7:
        raise ValueError(f"--draft-k must be 1 to 7, got {args.draft_k}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU")
    if max(args.prefill, default=0) > args.ctx:
        raise ValueError(f"--prefill {max(args.prefill)} tokens do not fit --ctx {args.ctx}")
    if args.device == "cuda" and args.against:
        raise ValueError("--against llama.cpp compares CPU builds; use --device cpu")
    if not args.model_path.endswith(".gguf") and args.against:
        raise ValueError("--against llama.cpp needs a GGUF model")
    sides = [Side("ours", sys.executable)]
    if args.against:
        sides.append(Side("llama_cpp", llama_python(args.llama_python)))
    warm_page_cache(args.model_path)
    for rep in range(args.repeat):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            if not args.json:
                print(f"repetition {rep + 1}/{args.repeat}: {side.name} ...", file=sys.stderr, flush=True)
            side.measure(args)
    result = {s.name: s.figures(args) for s in sides}
    result["machine"] = machine(args)
    if args.against:
        result["ratio"] = ratios(result["ours"], result["llama_cpp"])
    for s in sides:
        for note in dict.fromkeys(s.notes):
            print(f"note: {note}", file=sys.stderr)
    return result


def _worker_main(argv):
    from types import SimpleNamespace

    spec = SimpleNamespace(**json.loads(argv[0]))
    (run_ours if spec.worker == "ours" else run_llama)(spec)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
