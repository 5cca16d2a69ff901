"""The shared results file (`--results`) and `gemma3 eval report`."""

import json
import re
from argparse import Namespace

import pytest

from gemma3.eval.results import config_summary, git_commit, read_results, record, render_report
from tests.helpers.cli import run_cli
from tests.helpers.models import random_model, tiny_config

WORDS = [f"w{i}" for i in range(200)]


class WordTokenizer:
    bos_id = 0

    def encode(self, text, add_bos=False):
        return [0] * add_bos + [int(w[1:]) + 1 for w in text.split()]


def _args(**kw):
    base = dict(model=None, backend="cpu", results=None, argv=["perplexity", "x.txt"], func=print)
    return Namespace(**{**base, **kw})


def test_nothing_is_written_without_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert record(_args(), "perplexity", {"ppl": 1.0}) is None
    assert list(tmp_path.iterdir()) == []


def test_each_run_appends_one_line(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "sub" / "eval.jsonl"
    for ppl in (12.5, 13.0):
        record(_args(results=str(path), argv=["perplexity", "my file.txt", "--ctx", "64"]), "perplexity",
               {"ppl": ppl}, cfg)
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert (first["results"], second["results"]) == ({"ppl": 12.5}, {"ppl": 13.0})
    assert first["kind"] == "perplexity" and first["model"] == "270m"
    assert first["command"] == "gemma3 perplexity 'my file.txt' --ctx 64"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", first["timestamp"])
    assert first["args"] == {"model": None, "backend": "cpu"}  # no func, argv or the results path
    n_global = sum(t == "global" for t in cfg.layer_types)
    assert first["config"] == config_summary(cfg)
    assert first["config"]["local_global"] == f"{cfg.num_layers - n_global}:{n_global}"
    assert first["config"]["params"] == cfg.num_params()
    assert config_summary(cfg.to_dict()) == config_summary(cfg)
    assert first["git_commit"] == git_commit()


def test_git_commit_names_this_checkout_or_nothing():
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)


def test_read_results_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"kind": "x", "results": {}}\nnot json\n')
    (tmp_path / "other.jsonl").write_text('{"ppl": 3}\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"kind": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="no results"):
        read_results(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        read_results(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="needs 'kind' and 'results'"):
        read_results(tmp_path / "other.jsonl")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_results(tmp_path / "latin1.jsonl")
    with pytest.raises(ValueError, match="cannot read"):
        read_results(tmp_path / "missing.jsonl")


def _entry(kind, results, **extra):
    return {"kind": kind, "timestamp": "2025-01-02T03:04:05+00:00", "git_commit": "0123456789abcdef" * 2 + "01234567",
            "command": f"gemma3 eval {kind}", "cwd": "/data/run", "model": "270m", "args": extra, "results": results}


def test_report_has_a_table_per_kind_and_links_plots(tmp_path):
    mem = {"datasets": [{"name": name, "samples": 40, "exact": k, "approximate": k + 1, "exact_rate": k / 40,
                         "exact_ci": [0.0, 0.1], "approximate_rate": (k + 1) / 40, "approximate_ci": [0.0, 0.15],
                         "mean_edit_distance": 0.5, "mean_verbatim_tokens": 1.25}
                        for name, k in (("gpl.txt", 3), ("control", 0))], "plot": "plots/mem.png"}
    entries = [_entry("perplexity", {"ppl": 13.8289, "nll": 2.6267, "tokens": 3570, "chunks": [1.0]},
                      file="gpl.txt", ctx=512, stride=None, backend="torch"),
               _entry("memorization", mem, backend="cpu"),
               _entry("perplexity", {"ppl": 14.1, "nll": 2.64, "tokens": 100, "chunks": []}, file="b.txt", ctx=64,
                      stride=32, precision="fast"),  # recorded before --backend replaced --precision
               _entry("study-ratio", {"best_ratio": "5:1", "runs": [1, 2], "plot": "ratio.png"})]
    md = render_report(entries, "/data/run/reports")
    sections = md.split("\n## ")
    assert [s.splitlines()[0] for s in sections[1:]] == ["perplexity", "memorization", "study-ratio"]
    ppl = sections[1]
    assert "13.8289" in ppl and "14.1000" in ppl and "llama-perplexity" in ppl and "stride 32" in ppl
    assert ppl.count("| 1 |") == 1 and ppl.count("| 2 |") == 1 and "| torch |" in ppl and "| cpu |" in ppl
    assert "`gemma3 eval perplexity`" in ppl
    memo = sections[2]
    assert "3/40 = 7.5% [0.0%, 10.0%]" in memo and "0/40 = 0.0%" in memo and "| 1.25 |" in memo
    assert "](../plots/mem.png)" in memo  # relative to the report's folder
    assert "best_ratio" in sections[3] and "5:1" in sections[3] and "](../ratio.png)" in sections[3]
    assert "runs" not in sections[3]  # only scalar results go into a generic table


def test_perplexity_and_report_through_the_cli(tmp_path, capsys, monkeypatch):
    import gemma3.cli.options

    model = random_model(tiny_config(vocab=len(WORDS) + 1))
    monkeypatch.setattr(gemma3.cli.options, "load_model", lambda args: (model, WordTokenizer()))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 2))
    code, out, err = run_cli(["perplexity", "text.txt", "--ctx", "64", "--json"], capsys)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == [tmp_path / "text.txt"]  # no results file by default
    code, out, err = run_cli(["perplexity", "text.txt", "--ctx", "64", "--json", "--results"], capsys)
    ppl = json.loads(out)["ppl"]
    entry = json.loads((tmp_path / "results" / "eval.jsonl").read_text())
    assert entry["results"]["ppl"] == ppl and entry["args"]["ctx"] == 64
    assert entry["command"] == "gemma3 perplexity text.txt --ctx 64 --json --results"
    code, out, err = run_cli(["eval", "report", "--out", "out/report.md"], capsys)
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## perplexity" in report and f"{ppl:.4f}" in report
    code, out, err = run_cli(["eval", "report", "--results", "missing.jsonl"], capsys)
    assert code == 1 and "cannot read" in err


def test_needle_and_quant_commands_record_their_json(tmp_path, capsys, monkeypatch):
    import gemma3.cli.options
    import gemma3.eval.needle
    import gemma3.eval.quant
    from gemma3.eval.needle import NeedleResult

    cfg = tiny_config()
    monkeypatch.setattr(gemma3.cli.options, "load_model", lambda args: (random_model(cfg), WordTokenizer()))
    monkeypatch.setattr(gemma3.eval.needle, "run_needle", lambda *a, **k: [
        NeedleResult(64, 0.5, "12345", " 12345.", True, -0.1), NeedleResult(64, 1.0, "777", " 8", False, -9.0)])
    row = {"format": "q8_0", "recipe": "q8_0", "file": "gguf", "file_bytes": 2**20, "weight_bytes": 1, "bits_per_param": 8.5,
           "ppl": 13.83, "nll": 2.6, "delta_ppl": 0.001, "delta_ppl_pct": 0.01, "decode_tok_s": None}
    monkeypatch.setattr(gemma3.eval.quant, "evaluate", lambda *a, **k: {
        "model": "270m", "params": 1, "ctx": 512, "chunks": None, "decode_tokens": 0,
        "reference": {**row, "format": "reference", "delta_ppl": None, "delta_ppl_pct": None}, "formats": [row]})
    (tmp_path / "t.txt").write_text("some text")
    results = str(tmp_path / "r.jsonl")
    code, out, err = run_cli(["eval", "needle", "--ctx", "64", "--depths", "0.5,1", "--json", "--results", results], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", "quant", "--text", str(tmp_path / "t.txt"), "--json", "--results", results], capsys)
    assert code == 0, err
    needle, quant = read_results(results)
    assert needle["kind"] == "needle" and needle["results"]["accuracy"] == 0.5
    assert needle["config"] == config_summary(cfg)
    assert quant["kind"] == "quant" and quant["results"]["formats"][0]["format"] == "q8_0"
    assert quant["config"]["layers"] > 0  # the source's config, read from its file
    md = render_report([needle, quant])
    assert "## needle" in md and "50.0%" in md and "## quant" in md and "`q8_0`" not in md and "| q8_0 |" in md
