"""`gemma3 chat` driven in a pseudo-terminal (pexpect), as a person types into it: history across
sessions, Ctrl-C during a reply, /save and /load, commands that never reach the model."""

import json
import os
import sys

import pytest

from tests.helpers.images import picture
from tests.helpers.training import tiny_model_dir

pexpect = pytest.importorskip("pexpect")

# prompt_toolkit turns bracketed paste on each time it starts reading a line (the editor waits)
# and off when the line is done; what follows is the program's answer.
READY, DONE = "\x1b[?2004h", "\x1b[?2004l"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("chat") / "model")


def spawn(model, history, *args):
    # No cursor-position queries: nothing in a test answers them.
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    return pexpect.spawn(sys.executable, ["-m", "gemma3", "chat", "-m", str(model), "--history", str(history), *args],
                         env=env, encoding="utf-8", timeout=120, dimensions=(24, 200))


def finish(child):
    child.expect_exact(READY)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_history_recall_across_sessions(model, tmp_path):
    history = tmp_path / "history"
    child = spawn(model, history, "-n", "2")
    child.expect_exact(READY)
    child.sendline("remember_this_line")
    child.expect_exact(READY)
    child.sendline("/reset")
    finish(child)

    child = spawn(model, history, "-n", "2")
    child.expect_exact(READY)
    child.send("\x1b[A\x1b[A")  # up twice: past /reset to the message of the last session
    child.expect_exact("remember_this_line")
    child.send("\r")
    child.expect_exact(READY)
    child.sendline(f"/save {tmp_path / 'c.json'}")
    finish(child)
    messages = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["remember_this_line"]


def test_ctrl_c_stops_the_reply_and_keeps_the_session(model, tmp_path):
    child = spawn(model, tmp_path / "history", "-n", "4000")  # a reply far longer than the test waits
    child.expect_exact(READY)
    child.sendline("tell me everything")
    child.expect_exact(DONE)
    child.expect(".")  # the reply has started
    child.sendintr()
    child.expect_exact("(reply stopped)")
    child.expect_exact(READY)
    child.sendline("/set max_tokens 3")
    child.expect_exact("(max_tokens 3)")
    child.expect_exact(READY)
    child.sendline("and now?")
    child.expect_exact(READY)
    child.sendline(f"/save {tmp_path / 'c.json'}")
    finish(child)
    messages = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "model", "user", "model"]
    assert messages[0]["content"] == "tell me everything" and messages[2]["content"] == "and now?"
    assert 0 < len(messages[1]["content"]) < 4000  # the stopped reply, as far as it got


def test_save_then_load_restores_the_conversation(model, tmp_path):
    saved, again = tmp_path / "saved.json", tmp_path / "again.json"
    child = spawn(model, tmp_path / "history", "-n", "3", "--system", "Be brief.")
    for line in ("first question", "second question", f"/save {saved}"):
        child.expect_exact(READY)
        child.sendline(line)
    finish(child)

    child = spawn(model, tmp_path / "history", "-n", "3")
    child.expect_exact(READY)
    child.sendline(f"/load {saved}")
    child.expect_exact("(conversation of 5 messages loaded")
    child.expect_exact(READY)
    child.sendline(f"/save {again}")
    finish(child)
    assert json.loads(again.read_text()) == json.loads(saved.read_text())
    assert json.loads(saved.read_text())["messages"][0] == {"role": "system", "content": "Be brief."}


def test_commands_never_reach_the_model(model, tmp_path):
    saved = tmp_path / "c.json"
    child = spawn(model, tmp_path / "history", "-n", "2")
    child.expect_exact(READY)
    child.sendline("/sve typo.json")
    child.expect_exact("/sve is not a command")
    child.expect_exact("/save FILE")  # the help that follows
    child.expect_exact(READY)
    child.sendline("/help")
    child.expect_exact("/image PATH")
    child.expect_exact(READY)
    child.sendline("/set top_p 0")
    child.expect_exact("top_p: 0 is not a number above 0")
    child.expect_exact(READY)
    picture(32, 32).save(tmp_path / "photo.png")
    child.sendline(f"/image {tmp_path / 'photo.png'}")
    child.expect_exact("a text-only model (config.json has no vision_config)")
    child.expect_exact(READY)
    child.sendline(f"/save {saved}")
    finish(child)
    assert json.loads(saved.read_text())["messages"] == []
    assert not (tmp_path / "typo.json").exists()


def test_multi_line_message(model, tmp_path):
    saved = tmp_path / "c.json"
    child = spawn(model, tmp_path / "history", "-n", "2")
    child.expect_exact(READY)
    child.send("line one\\\r")  # a trailing backslash continues on a new line
    child.send("line two\x1b\r")  # Alt-Enter too
    child.send("line three\r")
    child.expect_exact(READY)
    child.sendline(f"/save {saved}")
    finish(child)
    assert json.loads(saved.read_text())["messages"][0]["content"] == "line one\nline two\nline three"


def test_piped_input_and_base_model_warning(model, tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "gemma3", "chat", "-m", str(model), "-n", "2"],
                         input=f"hello\n/save {tmp_path / 'c.json'}\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "base model (no chat template)" in warnings[0]
    assert json.loads((tmp_path / "c.json").read_text())["messages"][0]["content"] == "hello"


def test_errors_keep_the_conversation(model, tmp_path):
    """A file /load cannot continue, or a message past the context: one line each, the session goes on."""
    import subprocess

    (tmp_path / "odd.json").write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}))
    lines = ["hello", f"/load {tmp_path / 'odd.json'}", "word " * 5000, f"/save {tmp_path / 'c.json'}"]
    out = subprocess.run([sys.executable, "-m", "gemma3", "chat", "-m", str(model), "-n", "2"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("gemma3: error:")]
    assert out.returncode == 0 and len(errors) == 2, out.stderr
    assert "/load: message 1 has role 'user'" in errors[0] and "but the context is 4096 tokens" in errors[1]
    messages = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello"]
