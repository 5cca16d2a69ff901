"""`gemma3 quantize` and `gemma3 eval quant`: GGUF and directory round trips, metadata copied with
its types, one-line errors; llama.cpp loading our file when llama-cpp-python is around."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from gemma3.formats.gguf import read_gguf
from gemma3.formats.tokenizer import Tokenizer
from gemma3.inference.load import load
from gemma3.quant import parse_recipe, quantize_model
from gemma3.quant.apply import QuantizedLinear, float_state
from gemma3.quant.gguf_writer import metadata_from_config, write_gguf
from tests.helpers import DATA
from tests.helpers.cli import run_cli
from tests.helpers.models import random_model, tiny_config

TEXT = DATA / "gpl-3.0.txt"
REFVENV_PYTHON = Path(os.environ.get("GEMMA3_REFVENV_PYTHON", "/work/refvenv/bin/python"))


def tiny_tokenizer(vocab: int) -> Tokenizer:
    """A byte-fallback SPM vocabulary: 4 specials, 256 byte pieces, the turn markers, plain pieces."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["<start_of_turn>", "<end_of_turn>"] + [f"▁w{i}" for i in range(vocab - len(pieces) - 2)]
    types = [3, 3, 3, 2] + [6] * 256 + [3, 3] + [1] * (vocab - 262)
    return Tokenizer(pieces, [0.0] * vocab, types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 as an F32 GGUF with a real (tiny) tokenizer: our stand-in for a checkpoint."""
    cfg = tiny_config(vocab=264)
    path = tmp_path_factory.mktemp("src") / "tiny-f32.gguf"
    write_gguf(path, random_model(cfg), metadata_from_config(cfg, tiny_tokenizer(cfg.vocab_size)))
    return path


def test_source_gguf_loads_as_written(source):
    model, tok = load(source)
    assert tok.encode("hi", add_bos=True) == [2, 4 + ord("h"), 4 + ord("i")]
    assert model.config.vocab_size == 264


@pytest.mark.parametrize("recipe", ["q8_0", "int4-block32", "q5_1", "q4_0-embed-q8"])
def test_gguf_round_trip(source, tmp_path, capsys, recipe):
    out = tmp_path / "q.gguf"
    args = ["--recipe", recipe] if "embed" in recipe else ["--to", recipe]
    code, stdout, _ = run_cli(["quantize", "--model", str(source), "--out", str(out), "--json"] + args, capsys)
    assert code == 0
    assert json.loads(stdout)["bytes"] == out.stat().st_size
    # our GGUF → our loader → the very tensors the quantized model holds
    model, _ = load(source)
    r = parse_recipe(recipe) if "embed" in recipe else parse_recipe(default=recipe)
    expected = float_state(quantize_model(model, r))
    loaded, _ = load(out)
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    gg = read_gguf(out)
    assert gg.tensors["token_embd.weight"].ggml_type.name == ("Q8_0" if "embed" in recipe else
                                                               ("Q4_0" if recipe == "int4-block32" else recipe.upper()))
    assert gg.tensors["blk.0.attn_norm.weight"].ggml_type.name == "F32"
    assert gg.metadata["quantize.recipe"] == r.spec


def test_gguf_metadata_is_copied_with_its_types(source, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    assert run_cli(["quantize", "--model", str(source), "--to", "q8_0", "--out", str(out)], capsys)[0] == 0
    src, dst = read_gguf(source), read_gguf(out)
    for key in src.metadata:
        if key not in ("general.file_type", "general.quantization_version"):
            assert dst.metadata[key] == src.metadata[key], key
            assert dst.value_types[key] == src.value_types[key], key
    assert dst.metadata["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0


@pytest.mark.parametrize("fmt", ["sfp8", "int4-channel", "int8-channel"])
def test_directory_round_trip(source, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    code, stdout, _ = run_cli(["quantize", "--model", str(source), "--to", fmt, "--out", str(out)], capsys)
    assert code == 0 and "bits/param" in stdout
    assert (out / "quantization.json").is_file()
    loaded, tok = load(out)
    assert isinstance(loaded.embed_tokens, QuantizedLinear) and loaded.embed_tokens.fmt == fmt
    model, _ = load(source)
    quantize_model(model, parse_recipe(default=fmt))
    got = float_state(loaded)
    for name, t in float_state(model).items():
        assert torch.equal(got[name], t), name
    ids = torch.tensor([tok.encode("round trip", add_bos=True)])
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
    code, stdout, _ = run_cli(["generate", "round trip", "-n", "3", "--model", str(out), "--json"], capsys)
    assert code == 0 and 1 <= json.loads(stdout)["completion_tokens"] <= 3
    # and back from the directory to a GGUF (decoded, requantized)
    again = tmp_path / "again.gguf"
    assert run_cli(["quantize", "--model", str(out), "--to", "q8_0", "--out", str(again)], capsys)[0] == 0
    assert read_gguf(again).metadata["tokenizer.ggml.tokens"] == read_gguf(source).metadata["tokenizer.ggml.tokens"]


def test_one_bar_over_the_job_and_a_warning_for_the_reference_path(source, tmp_path, capsys):
    import re

    out = tmp_path / "sfp8"
    code, _, err = run_cli(["quantize", "--model", str(source), "--to", "sfp8", "--out", str(out)], capsys)
    states = [s.strip() for s in re.split(r"[\r\n]", err) if "tensor" in s]
    stages = list(dict.fromkeys(s.split(":")[0] for s in states))
    assert code == 0 and stages == ["reading", "converting", "writing"], states
    done = re.search(r"100%\|\S+\| (\d+)/(\d+) ", states[-1])
    assert done and done[1] == done[2], states[-1]  # one total, met exactly at the end
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "slow reference path" in warnings[0] and "sfp8 has no GGUF type" in warnings[0]
    code, _, err = run_cli(["generate", "x", "-n", "1", "--model", str(out)], capsys)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 1 and "slow reference path" in warnings[0]
    code, _, err = run_cli(["quantize", "--model", str(source), "--to", "q8_0", "--out", str(tmp_path / "q.gguf")],
                           capsys)
    assert code == 0 and "warning" not in err


def one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma3: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--to", "sfp8", "--out", "x.gguf"], ["sfp8 has no GGUF type", "directory"]),
    (["--to", "int4-channel", "--recipe", "embed=q8_0", "--out", "x.gguf"], ["int4-channel has no GGUF type"]),
    (["--to", "q3_k", "--out", "x.gguf"], ["unknown format 'q3_k'"]),
    (["--to", "q8_0", "--recipe", "lm_head=q8_0", "--out", "x.gguf"], ["unknown recipe key 'lm_head'"]),
    (["--recipe", "embed=q8_0", "--out", "x.gguf"], ["no default format"]),
])
def test_unsupported_combinations_are_one_line_errors(source, tmp_path, capsys, args, needles):
    args = [a.replace("x.gguf", str(tmp_path / "x.gguf")) for a in args]
    one_line_error(*run_cli(["quantize", "--model", str(source)] + args, capsys)[::2], *needles)
    assert not (tmp_path / "x.gguf").exists()


def test_corrupt_inputs_are_one_line_errors(source, tmp_path, capsys):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(source.read_bytes()[:5000])
    one_line_error(*run_cli(["quantize", "--model", str(truncated), "--to", "q8_0", "--out", str(tmp_path / "o.gguf")],
                        capsys)[::2], "corrupt GGUF")
    out = tmp_path / "dir"
    assert run_cli(["quantize", "--model", str(source), "--to", "sfp8", "--out", str(out)], capsys)[0] == 0
    spec = json.loads((out / "quantization.json").read_text())
    spec["weights"]["layers.0.mlp.up_proj.weight"]["shape"] = [128, 32]
    (out / "quantization.json").write_text(json.dumps(spec))
    one_line_error(*run_cli(["generate", "x", "-n", "1", "--model", str(out)], capsys)[::2], "up_proj")
    (out / "quantization.json").write_text("{not json")
    one_line_error(*run_cli(["generate", "x", "-n", "1", "--model", str(out)], capsys)[::2], "corrupt quantization config")


def test_eval_quant_table_json_and_plot(source, tmp_path, capsys):
    from gemma3.eval.quant import table

    plot, text = tmp_path / "q.png", tmp_path / "gpl-head.txt"
    text.write_text(TEXT.read_text()[:600])  # the tiny vocabulary spells text byte by byte
    code, out, _ = run_cli(["eval", "quant", "--model", str(source), "--formats", "q8_0,q4_0-embed-q8,sfp8",
                        "--text", str(text), "--ctx", "64", "--chunks", "1", "--decode-tokens", "1",
                        "--plot", str(plot), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    rows = {r["format"]: r for r in result["formats"]}
    assert list(rows) == ["q8_0", "q4_0-embed-q8", "sfp8"]
    assert rows["q8_0"]["file"] == "gguf" and rows["sfp8"]["file"] == "dir"
    assert rows["q8_0"]["bits_per_param"] < result["reference"]["bits_per_param"] / 3
    assert rows["q4_0-embed-q8"]["recipe"] == "default=int4-block32,embed=q8_0"
    for r in rows.values():
        assert r["delta_ppl"] == pytest.approx(r["ppl"] - result["reference"]["ppl"])
        assert r["decode_tok_s"] > 0
    assert plot.stat().st_size > 1000
    lines = table(result).splitlines()
    assert len(lines) == 2 + 4 and "float32 (reference)" in lines[2] and lines[3].startswith("| `q8_0` |")


@pytest.mark.skipif(not REFVENV_PYTHON.exists(), reason="no llama-cpp-python venv (GEMMA3_REFVENV_PYTHON)")
def test_llama_cpp_runs_our_tiny_ggufs_with_our_logits(source, tmp_path, capsys):
    """llama.cpp loads our files of the tiny model and computes our logits (teacher forced).

    F32: the same numbers to ~1e-3 (names, metadata, norms stored as 1 + w, architecture all read as
    we meant them). Q8_0: llama.cpp also rounds the activations to Q8_0 before each product; this
    random tiny model is sensitive to that (emulating it on our side moves our own logits by ~3%),
    so the check is loose, but a misplaced byte or scale would be far outside it."""
    ids = [2, 100, 7, 200, 263, 5, 42, 9, 11, 180, 3, 77]
    script = ("import sys, json, numpy as np\nfrom llama_cpp import Llama\n"
              # one token per micro-batch: this llama-cpp-python build segfaults on multi-token batches
              "llm = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=1, n_ubatch=1, logits_all=True, type_k=0, "
              "type_v=0, verbose=False)\n"
              "ids = json.loads(sys.argv[2]); llm.eval(ids)\n"
              "print(json.dumps(np.asarray(llm.scores[:len(ids)]).tolist()))\n")
    for fmt, max_rel_rms in (("f32", 0.005), ("q8_0", 0.08)):
        out = tmp_path / f"{fmt}.gguf"
        assert run_cli(["quantize", "--model", str(source), "--to", fmt, "--out", str(out)], capsys)[0] == 0
        model, _ = load(out)
        with torch.inference_mode():
            ours = model(torch.tensor([ids]))[0]
        proc = subprocess.run([str(REFVENV_PYTHON), "-c", script, str(out), json.dumps(ids)], capture_output=True,
                              text=True, timeout=120)
        if "No module named 'llama_cpp'" in proc.stderr:
            pytest.skip("llama-cpp-python is not installed in the reference venv")
        assert proc.returncode == 0, proc.stderr[-2000:]
        theirs = torch.tensor(json.loads(proc.stdout))
        assert float((theirs - ours).norm() / ours.norm()) < max_rel_rms, fmt
        if fmt == "f32":
            torch.testing.assert_close(theirs, ours, atol=5e-3, rtol=0)
            assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
