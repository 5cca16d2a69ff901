"""One results format for every evaluation, and `gemma3 eval report`.

With `--results [FILE]` an evaluation command appends one JSON line to FILE (default
results/eval.jsonl): what ran (`kind`, the command line and its arguments), on what (model,
config summary, git commit), when (UTC timestamp), and the command's own `--json` output under
`results`. Nothing is written without the flag. `gemma3 eval report` turns such a file into a
Markdown page: one table per kind of evaluation, newest run last, and the runs' plots.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_RESULTS = "results/eval.jsonl"


def git_commit() -> str | None:
    """The commit of the checkout this package runs from ("+dirty" with uncommitted tracked
    changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True,
                               timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def config_summary(config) -> dict:
    """The architecture in a few fields, from a Gemma3Config or its to_dict()."""
    if isinstance(config, dict):
        from ..model.config import Gemma3Config

        config = Gemma3Config(**{**config, "layer_types": tuple(config["layer_types"])})
    n_global = sum(t == "global" for t in config.layer_types)
    return {"name": config.name, "params": config.num_params(), "layers": config.num_layers,
            "hidden_size": config.hidden_size, "heads": f"{config.num_heads}q/{config.num_kv_heads}kv",
            "local_global": f"{config.num_layers - n_global}:{n_global}", "sliding_window": config.sliding_window,
            "vocab_size": config.vocab_size, "max_context": config.max_context}


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def make_entry(kind: str, results: dict, args, config=None) -> dict:
    options = {k: v for k, v in vars(args).items() if k not in ("func", "argv", "results") and _jsonable(v)}
    argv = getattr(args, "argv", None)
    return {"kind": kind, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": "gemma3 " + shlex.join(argv) if argv is not None else None,
            "cwd": os.getcwd(), "model": getattr(args, "model", None) or "270m",
            "config": config_summary(config) if config is not None else None, "args": options, "results": results}


def append(path: str | Path, entry: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def record(args, kind: str, results: dict, config=None) -> dict | None:
    """Appends the run to `args.results` when the flag was given; returns the entry written."""
    if not getattr(args, "results", None):
        return None
    entry = make_entry(kind, results, args, config)
    append(args.results, entry)
    return entry


def emit(args, kind: str, out: dict, config=None, plot=None) -> bool:
    """The common end of an evaluation command: draws `plot(path)` for --plot (and notes the path
    in `out`), records the run for --results, prints `out` for --json. True when JSON was printed,
    i.e. the caller has no table to print."""
    if args.plot:
        plot(args.plot)
        out["plot"] = args.plot
    record(args, kind, out, config)
    if args.json:
        print(json.dumps(out))
    return args.json


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    entries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(entry, dict) or "kind" not in entry or "results" not in entry:
            raise ValueError(f"{path}:{n}: not a results entry (needs 'kind' and 'results')")
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no results in the file")
    return entries


def _backend(args: dict) -> str:
    """The run's backend; runs recorded before --backend replaced --precision name it by precision."""
    return args.get("backend") or {"fast": "cpu", "fp32": "torch"}.get(args.get("precision"), "—")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _rows_perplexity(r: dict, args: dict) -> list[dict]:
    method = f"stride {args['stride']}" if args.get("stride") else "llama-perplexity"
    return [{"file": args.get("file"), "ctx": args.get("ctx"), "method": method, "scored tokens": r["tokens"],
             "perplexity": f"{r['ppl']:.4f}", "nll": f"{r['nll']:.5f}"}]


def _rows_memorization(r: dict, args: dict) -> list[dict]:
    return [{"text": d["name"], "windows": d["samples"],
             "exact": f"{d['exact']}/{d['samples']} = {_pct(d['exact_rate'])} "
                      f"[{_pct(d['exact_ci'][0])}, {_pct(d['exact_ci'][1])}]",
             "approximate": f"{d['approximate']}/{d['samples']} = {_pct(d['approximate_rate'])} "
                            f"[{_pct(d['approximate_ci'][0])}, {_pct(d['approximate_ci'][1])}]",
             "mean edit distance": f"{d['mean_edit_distance']:.3f}",
             "mean verbatim tokens": f"{d['mean_verbatim_tokens']:.2f}"}
            for d in r["datasets"]]


def _rows_needle(r: dict, args: dict) -> list[dict]:
    return [{"ctx": args.get("ctx"), "depths": args.get("depths"), "prompts": len(r["results"]),
             "accuracy": _pct(r["accuracy"])}]


def _rows_quant(r: dict, args: dict) -> list[dict]:
    return [{"format": f["format"], "file MiB": f"{f['file_bytes'] / 2**20:.1f}", "bits/param": f["bits_per_param"],
             "perplexity": f"{f['ppl']:.4f}",
             "Δ %": "—" if f.get("delta_ppl_pct") is None else f"{f['delta_ppl_pct']:+.2f}"}
            for f in [r["reference"]] + r["formats"]]


def _rows_generic(r: dict, args: dict) -> list[dict]:
    """Any other kind: its scalar results."""
    return [{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) and k != "plot"}]


ROWS = {"perplexity": _rows_perplexity, "memorization": _rows_memorization, "needle": _rows_needle,
        "quant": _rows_quant}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def render_report(entries: list[dict], out_dir: str | Path = ".") -> str:
    """Markdown: a table per kind (one block of rows per run) and the plots, linked relative to out_dir."""
    lines = ["# Evaluation results", "",
             f"{len(entries)} runs; model config, command line and raw figures are in the results file.", ""]
    for kind in dict.fromkeys(e["kind"] for e in entries):
        runs = [e for e in entries if e["kind"] == kind]
        lines += [f"## {kind}", ""]
        rows, plots = [], []
        for n, e in enumerate(runs, 1):
            args = e.get("args") or {}
            run = {"run": n, "date (UTC)": (e.get("timestamp") or "")[:16].replace("T", " "), "model": e.get("model"),
                   "backend": _backend(args),
                   "commit": (e.get("git_commit") or "—")[:12] + ("+" if "dirty" in (e.get("git_commit") or "") else "")}
            rows += [{**run, **row} for row in ROWS.get(kind, _rows_generic)(e["results"], args)]
            plot = e["results"].get("plot")
            if plot:
                where = Path(e.get("cwd") or ".") / plot
                plots.append((n, os.path.relpath(where, Path(out_dir).resolve())))
        lines += _table(rows) + [""]
        for n, plot in plots:
            lines += [f"Run {n}: ![{kind}, run {n}]({Path(plot).as_posix()})", ""]
        commands = [f"{n}. `{e['command']}`" for n, e in enumerate(runs, 1) if e.get("command")]
        if commands:
            lines += ["Commands:", ""] + commands + [""]
    return "\n".join(lines)
