"""One convention for every command: --version, options checked when parsed (one line naming the
problem, never a traceback), defaults in every --help, prompt files and stdin, quiet broken
pipes, human timings with -v, and the warning for chat on a base model."""

import argparse
import io
import json
import subprocess
import sys

import pytest

from gemma3.cli import build_parser
from tests.helpers.cli import run_cli
from tests.helpers.training import tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("conventions") / "model")


def parsers(parser=None, name="gemma3"):
    """(name, parser) for gemma3 and every subcommand under it."""
    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("gemma3 ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("args, problem", [
    (["generate", "hi", "--max-tokens", "-5"], "argument --max-tokens/-n: -5 is not a positive integer"),
    (["generate", "hi", "--temperature", "-1"], "argument --temperature/-t: -1 is not a number >= 0"),
    (["generate", "hi", "--top-p", "1.5"], "argument --top-p: 1.5 is not a number above 0 and at most 1"),
    (["chat", "--threads", "0"], "argument --threads: 0 is not a positive integer"),
    (["serve", "--port", "70000"], "argument --port: 70000 is not a TCP port"),
    (["perplexity", "x.txt", "--ctx", "nan"], "argument --ctx: 'nan' is not a positive integer"),
    (["bench", "--batch", "1,0"], "argument --batch: 0 is not a positive integer"),
    (["generate"], "one of the arguments prompt --file/-f is required"),
])
def test_bad_option_is_one_line_at_parse_time(args, problem, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and problem in err and "Traceback" not in err, err


def test_every_number_is_checked_when_parsed():
    """A bare int/float type lets -5 or nan through to a traceback or a silent misuse later."""
    unchecked = [f"{name} {a.option_strings[0]}" for name, p in parsers() for a in p._actions
                 if a.type in (int, float)]
    assert unchecked == []


def test_every_default_is_in_the_help():
    missing = []
    for name, p in parsers():
        formatter = p._get_formatter()
        for a in p._actions:
            if (a.option_strings and a.help is not argparse.SUPPRESS and a.default not in (None, False, [])
                    and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
                    and "default" not in formatter._expand_help(a)):
                missing.append(f"{name} {a.option_strings[0]}")
    assert missing == []


def test_no_flag_that_does_nothing():
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in parsers()}
    assert not flags["gemma3 tokenize"] & {"--dtype", "--precision", "--threads", "--backend"}
    assert not flags["gemma3 info"] & {"--dtype", "--precision", "--threads", "--backend"}
    assert "--json" not in flags["gemma3 chat"] and "--json" not in flags["gemma3 serve"]


def test_help_texts(capsys):
    code, out, _ = run_cli(["eval", "--help"], capsys)
    assert code == 0 and "SPEC" not in out and "STUDY" not in out
    _, out, _ = run_cli(["finetune", "--help"], capsys)
    assert "merge: fold --adapter into --model" in out


def test_prompt_from_file_and_stdin(model, tmp_path, capsys, monkeypatch):
    prompt = "First line of the prompt,\nand a second one."
    (tmp_path / "prompt.txt").write_text(prompt)
    base = ["generate", "-m", str(model), "-n", "6", "--json"]
    results = {}
    for how, args in {"text": [prompt], "file": ["-f", str(tmp_path / "prompt.txt")], "stdin": ["--file", "-"]}.items():
        monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
        code, out, err = run_cli(base + args, capsys)
        assert code == 0, err
        results[how] = json.loads(out)
    assert results["text"]["prompt_tokens"] > 20  # the whole file, both lines
    for how in ("file", "stdin"):
        assert (results[how]["text"], results[how]["prompt_tokens"]) == (results["text"]["text"],
                                                                         results["text"]["prompt_tokens"])


def test_a_prompt_that_names_a_file_gets_a_note(model, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("hello")
    code, _, err = run_cli(["generate", str(tmp_path / "prompt.txt"), "-m", str(model), "-n", "1"], capsys)
    assert code == 0 and f"to read that file, use -f {tmp_path / 'prompt.txt'}" in err


def test_broken_pipe_ends_quietly(model):
    proc = subprocess.Popen([sys.executable, "-m", "gemma3", "generate", "Once upon a time", "-m", str(model),
                             "-n", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(10)  # `| head -c 10`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert len(head) == 10 and proc.wait(timeout=120) == 141
    assert err == "", err


def test_verbose_prints_human_timings(model, capsys):
    code, out, err = run_cli(["generate", "hello", "-m", str(model), "-n", "4", "-v", "--threads", "1"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 0 and "{" not in line
    assert line.startswith("load ") and " s, first token after " in line and "tok/s" in line
    assert line.endswith("1 threads")


def test_chat_on_a_base_model_warns_once(model, tmp_path, capsys):
    code, _, err = run_cli(["generate", "hi", "-m", str(model), "-n", "1", "--chat"], capsys)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 1 and "looks like a base model (no chat template)" in warnings[0]
    assert "--model, e.g. gemma-3-1b-it-Q4_K_M.gguf" in warnings[0]
    _, _, err = run_cli(["generate", "hi", "-m", str(model), "-n", "1"], capsys)  # plain completion: no warning
    assert "warning" not in err

    tuned = tiny_model_dir(tmp_path / "tiny-it")
    (tuned / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}…{% endfor %}")
    _, _, err = run_cli(["generate", "hi", "-m", str(tuned), "-n", "1", "--chat"], capsys)
    assert "warning" not in err
    pretrained = tiny_model_dir(tmp_path / "gemma-3-tiny-pt")
    (pretrained / "chat_template.jinja").write_text("{{ bos_token }}")
    _, _, err = run_cli(["generate", "hi", "-m", str(pretrained), "-n", "1", "--chat"], capsys)
    assert "looks like a base model (named -pt)" in err


def test_the_embedded_model_is_a_base_model():
    from gemma3.inference.load import load_tokenizer

    assert load_tokenizer().chat_template is None


def test_memory_prints_only_the_line_asked_for(capsys):
    code, out, _ = run_cli(["memory", "--model", "27b", "--ctx", "131072", "--dry-run", "--kv-dtype", "int8"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1 and "planned (dry run)" in out
    _, out, _ = run_cli(["memory"], capsys)
    assert "Paper Table 3" in out


def test_serve_prints_a_banner(model):
    from tests.helpers.server import ServerProcess

    srv = ServerProcess("-m", str(model), "--ctx", "512", "--max-batch", "3", "--threads", "1", "--api-key", "k")
    assert srv.stop() == 0
    banner = [line for line in srv.proc.stderr.read().splitlines() if line.startswith("gemma3 serve:")]
    assert banner == ["gemma3 serve: model, context 512, batch 3, 1 threads",
                      f"gemma3 serve: {srv.url}/ (chat page; OpenAI API under /v1), API key required "
                      "(Authorization: Bearer …)"]
