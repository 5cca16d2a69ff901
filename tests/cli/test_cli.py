"""The `gemma3` command: real entry point, JSON output, and one-line errors for bad input."""

import json
import subprocess
import sys

import torch

from gemma3.formats.checkpoint import save_hf_dir
from gemma3.inference.load import embedded_gguf_path
from tests.helpers.cli import one_line_error, run_cli
from tests.helpers.models import random_model, tiny_config


def test_generate_entry_point_json():
    out = subprocess.run([sys.executable, "-m", "gemma3", "generate", "One, two, three, four,", "-n", "8", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"].startswith(" five, six, seven")
    assert result["completion_tokens"] == 8 and result["finish_reason"] == "length"


def test_generate_streams_human_text(capsys):
    code, out, _ = run_cli(["generate", "The quick brown fox jumps over the lazy", "-n", "3"], capsys)
    assert code == 0 and out.startswith(" dog")


def test_tokenize_json_one_list_per_line(capsys, monkeypatch, tmp_path):
    from gemma3.inference.load import load_tokenizer

    tok = load_tokenizer()
    text = "Hello world\n   spaces\tand tabs\n<start_of_turn>user\n"
    (tmp_path / "in.txt").write_text(text)
    code, out, _ = run_cli(["tokenize", str(tmp_path / "in.txt"), "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and rows == [tok.encode(line) for line in text.splitlines()]
    code, out, _ = run_cli(["tokenize", str(tmp_path / "in.txt"), "--json", "--no-bos", "--special"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[2][0] == tok.start_of_turn_id and rows[0][0] != tok.bos_id


def test_info_json(capsys):
    code, out, _ = run_cli(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["format"] == "gguf" and info["config"]["num_layers"] == 18
    assert set(info["tensor_types"]) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    code, out, _ = run_cli(["info", "--model", "27b", "--json"], capsys)
    assert json.loads(out)["config"]["query_pre_attn_scalar"] == 168


def test_truncated_gguf_isone_line_error(tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    one_line_error(*run_cli(["generate", "hi", "--model", str(bad)], capsys), str(bad), "corrupt GGUF")


def test_not_a_gguf_isone_line_error(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"hello, I am not a model" * 10)
    one_line_error(*run_cli(["info", "--model", str(bad)], capsys), "not a GGUF file")


def test_wrong_shape_safetensors_isone_line_error(tmp_path, capsys):
    model = random_model(tiny_config())
    state = dict(model.state_dict())
    state["layers.2.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_hf_dir(tmp_path, model.config, state)
    one_line_error(*run_cli(["generate", "hi", "--model", str(tmp_path)], capsys),
                    "layers.2.mlp.down_proj.weight", "(64, 100)")


def test_unknown_architecture_isone_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(*run_cli(["generate", "hi", "--model", str(tmp_path)], capsys), "unknown architecture")


def test_preset_without_weights_is_explained(capsys):
    one_line_error(*run_cli(["generate", "hi", "--model", "4b"], capsys), "no weights on this machine")


def test_over_long_prompt_isone_line_error(capsys):
    # <bos> + 33,000 words + the trailing space's own token
    one_line_error(*run_cli(["generate", "word " * 33_000, "-n", "1"], capsys),
                    "prompt has 33002 tokens but the context is 32768 tokens")
