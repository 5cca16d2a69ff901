"""`gemma3 study ratio | window | teacher` end to end on tiny settings (seconds), and the configs the
studies compare: layer patterns, windows, parameter counts and KV figures."""

import json
import math

import pytest
import torch

from gemma3.inference.load import load
from gemma3.model import memory
from gemma3.study import ablation
from gemma3.study.tiny import ModelSize, byte_tokenizer, kv_figures, load_corpus
from tests.helpers import DATA
from tests.helpers.cli import run_cli

GPL = DATA / "gpl-3.0.txt"
TINY = ["--seq-len", "32", "--batch-size", "2", "--held-out", "0.3", "--json", "--quiet"]
TINY_SIZE = ["--d-model", "16", "--layers", "4", "--heads", "2", "--head-dim", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(GPL.read_text()[:2500])
    return path


def _study(capsys, tmp_path, *argv):
    code, out, err = run_cli(["study", *argv, "--out", str(tmp_path / "out"), *TINY], capsys)
    assert code == 0, err
    result = json.loads(out)
    name = argv[0]
    assert json.loads((tmp_path / "out" / f"study_{name}.json").read_text()) == result
    assert (tmp_path / "out" / f"study_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


# ---------------------------------------------------------------- configs


def test_ratio_variants_have_the_paper_patterns_and_equal_parameters():
    variants = ablation.ratio_variants(ablation.parse_ratios("7,global,1,3,5"), window=32)
    configs = {v.label: ModelSize(layers=12).config(256, v.window, v.local_per_global, v.label) for v in variants}
    layers = {label: "".join("G" if t == "global" else "L" for t in cfg.layer_types) for label, cfg in configs.items()}
    assert layers == {"global only": "GGGGGGGGGGGG", "1:1": "LGLGLGLGLGLG", "3:1": "LLLGLLLGLLLG",
                      "5:1": "LLLLLGLLLLLG", "7:1": "LLLLLLLGLLLL"}
    assert [v.label for v in variants] == ["global only", "1:1", "3:1", "5:1", "7:1"]
    assert len({cfg.num_params() for cfg in configs.values()}) == 1
    assert {cfg.sliding_window for cfg in configs.values()} == {32}
    with pytest.raises(ValueError, match="global only"):
        ablation.ratio_variants([1, 3], 32)


def test_window_variants_and_their_baselines():
    variants = ablation.window_variants([64, 16, 256], ablation.parse_ratios("1,3"))
    assert [(v.line, v.window) for v in variants] == [("1:1", 16), ("1:1", 64), ("1:1", 256),
                                                      ("3:1", 16), ("3:1", 64), ("3:1", 256)]
    assert {line: v.window for line, v in ablation._baselines("window", variants).items()} == {"1:1": 256, "3:1": 256}
    with pytest.raises(ValueError, match="global"):
        ablation.window_variants([16], [None])
    with pytest.raises(ValueError, match="ratio"):
        ablation.parse_ratios("3,x")


def test_kv_figures_are_the_memory_formula_and_what_the_cache_allocates():
    size = ModelSize(d_model=32, layers=6, heads=2, kv_heads=2, head_dim=8, ffn=64)
    for lpg, window in ((None, 8), (1, 8), (5, 4), (5, 64)):
        cfg = size.config(64, window, lpg, "kv")
        kv = kv_figures(cfg, 64, "bf16")
        local = len(cfg.local_layers)
        # 2 (K and V) × kv heads × head_dim × 2 bytes per slot; min(window, ctx) slots on local layers.
        assert kv["kv_bytes"] == (local * min(window, 64) + (6 - local) * 64) * 2 * 2 * 8 * 2
        assert kv["kv_bytes"] == memory.kv_bytes_windowed(cfg, 64, "bf16")
        assert kv["kv_vs_global_only"] == kv["kv_bytes"] / memory.kv_bytes_full(cfg, 64, "bf16")
        from gemma3.train.student import new_model

        model = new_model(cfg)
        cache = model.new_cache(1, max_len=64, kv_dtype="bf16")
        with torch.inference_mode():
            model.forward_hidden(torch.randint(0, cfg.vocab_size, (1, 64)), cache)
        assert cache.nbytes() == kv["kv_bytes"]


def test_byte_tokenizer_round_trips_and_spaces_are_one_token():
    tok = byte_tokenizer()
    text = "Gemma 3 — naïve café\n  end"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # one id per byte; the space's "▁" piece is one id too
    assert tok.encode("a b", add_bos=False)[1] == tok.encode(" ", add_bos=False)[0]
    assert tok.vocab_size == 261


def test_corpus_split_and_clear_errors(tmp_path, text):
    corpus = load_corpus(text, 32, held_out=0.3)
    tok, full = corpus.tokenizer, text.read_text()
    train = tok.decode(corpus.train.tokens[1:-1].tolist())  # <bos> text <eos>
    held_out = tok.decode(corpus.held_out.tokens[1:-1].tolist())
    assert train + held_out == full
    assert train.endswith("\n") and abs(len(held_out) - 0.3 * len(full)) < 200  # cut at a line break near 70%
    assert corpus.info()["files"] == 1
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.py").write_text("print('b')")
    (tmp_path / "dir" / "sub" / "a.md").write_text(full)
    (tmp_path / "dir" / "skip.bin").write_text("not read")
    joined = load_corpus(tmp_path / "dir", 32, held_out=0.3)
    assert joined.info()["files"] == 2
    assert tok.decode(joined.train.tokens[1:11].tolist()) == "print('b')"  # path order: b.py before sub/a.md
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty, 32)
    with pytest.raises(ValueError, match="held-out part is too short"):
        load_corpus(text, 1024)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe" * 100)
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(binary, 32)
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "missing.txt", 32)


# ---------------------------------------------------------------- end to end


def test_study_ratio_end_to_end(capsys, tmp_path, text):
    work = tmp_path / "work"
    result = _study(capsys, tmp_path, "ratio", "--data", str(text), "--steps", "2", *TINY_SIZE,
                    "--ratios", "global,1,3", "--window", "4", "--work", str(work))
    models = {m["label"]: m for m in result["models"]}
    assert list(models) == ["global only", "1:1", "3:1"]
    assert {label: m["layers"] for label, m in models.items()} == {"global only": "GGGG", "1:1": "LGLG", "3:1": "LLLG"}
    assert len({m["params"] for m in models.values()}) == 1
    assert models["global only"]["ppl_delta"] == 0
    for m in models.values():
        assert m["held_out_ppl"] == pytest.approx(m["runs"][0]["held_out_ppl"])
        assert m["ppl_delta"] == pytest.approx(m["held_out_ppl"] - models["global only"]["held_out_ppl"])
        assert math.isfinite(m["held_out_ppl"]) and 1 < m["held_out_ppl"] < 261 * 2
        assert m["runs"][0]["train_tokens"] == 2 * 2 * 32
    # The trained models really have these patterns, and the patterns change what they compute.
    for label, m in models.items():
        model, _ = load(work / ablation._slug(label) / "seed0" / "final")
        assert model.config.layer_types == tuple("global" if c == "G" else "local" for c in m["layers"])
        assert model.config.sliding_window == 4
        kv = memory.kv_bytes_windowed(model.config, 32, "bf16")
        assert m["kv_bytes"] == kv and m["kv_vs_global_only"] == kv / memory.kv_bytes_full(model.config, 32, "bf16")
    assert models["global only"]["kv_bytes"] > models["1:1"]["kv_bytes"] > models["3:1"]["kv_bytes"]
    assert len({m["held_out_ppl"] for m in models.values()}) == 3
    noise = result["seed_noise"]
    assert noise["seeds"] == [0, 1] and noise["ppl_delta"] == pytest.approx(
        noise["held_out_ppl"] - models["global only"]["held_out_ppl"])
    assert result["settings"]["kv"]["ctx"] == 32 and result["settings"]["training"]["steps"] == 2


def test_study_window_end_to_end(capsys, tmp_path, text):
    result = _study(capsys, tmp_path, "window", "--data", str(text), "--steps", "1", *TINY_SIZE,
                    "--windows", "4,32,8", "--ratios", "1", "--seeds", "2", "--kv-ctx", "64")
    models = result["models"]
    assert [m["window"] for m in models] == [4, 8, 32]
    assert {m["layers"] for m in models} == {"LGLG"}
    assert [m["kv_bytes"] for m in models] == [(2 * w + 2 * 64) * 2 * 8 * 2 for w in (4, 8, 32)]
    assert models[-1]["ppl_delta"] == 0 and models[-1]["ppl_delta_std"] == 0
    for m in models:
        assert [r["seed"] for r in m["runs"]] == [0, 1]
        deltas = [r["held_out_ppl"] - b["held_out_ppl"] for r, b in zip(m["runs"], models[-1]["runs"])]
        assert m["ppl_delta"] == pytest.approx(sum(deltas) / 2)
    assert result["seed_noise"]["seeds"] == [0, 2]


def test_study_teacher_end_to_end(capsys, tmp_path, text):
    result = _study(capsys, tmp_path, "teacher", "--data", str(text), "--student", "16x2", "--small-teacher", "16x3",
                    "--large-teacher", "32x3", "--teacher-steps", "2", "--budgets", "2,1", "--window", "8")
    small, large = result["teachers"]["small"], result["teachers"]["large"]
    assert small["params"] < large["params"] and result["student"]["params"] < small["params"]
    assert small["steps"] == large["steps"] == 2
    rows = result["budgets"]
    assert [r["steps"] for r in rows] == [1, 2] and [r["tokens"] for r in rows] == [64, 128]
    for r in rows:
        assert set(r) >= {"small", "large", "none"}
        assert r["small"]["steps"] == r["large"]["steps"] == r["steps"]
        assert r["relative_delta"] == pytest.approx(
            (r["large"]["held_out_ppl"] - r["small"]["held_out_ppl"]) / r["small"]["held_out_ppl"])
    # Different teachers give different targets, so different students.
    assert rows[-1]["small"]["held_out_ppl"] != rows[-1]["large"]["held_out_ppl"]
    assert result["seed_noise"]["steps"] == 2


def test_study_errors(capsys, tmp_path, text):
    code, _, err = run_cli(["study", "ratio", "--data", str(tmp_path / "missing.txt")], capsys)
    assert code == 1 and "missing.txt" in err
    code, _, err = run_cli(["study", "ratio", "--data", str(text), "--ratios", "1,3"], capsys)
    assert code == 1 and "global" in err
    code, _, err = run_cli(["study", "teacher", "--data", str(text), "--student", "20x2"], capsys)
    assert code == 1 and "DxL" in err
    code, _, err = run_cli(["study", "window", "--data", str(text), "--windows", "0,4"], capsys)
    assert code == 1 and "positive" in err
