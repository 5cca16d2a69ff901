"""`gemma3 chat`: a multi-turn conversation with the chat template, typed on a line editor.

In a terminal the input is prompt_toolkit's editor (the Python REPL's keys): arrows and history
across sessions (--history), Enter sends, Alt-Enter or a line ending in a backslash starts a new
line, pasted text keeps its line breaks. Ctrl-C stops the reply being written and keeps the
conversation; at the prompt it clears the line, and Ctrl-D quits. Piped input is read line by
line. Lines starting with / are commands (COMMANDS); they never reach the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import options

COMMANDS = {
    "/help": "this list",
    "/set [NAME VALUE]": "change a sampling setting for the next replies, e.g. /set temperature 0.7; "
                         "/set alone shows them",
    "/image PATH": "attach a picture to your next message (models that read images)",
    "/result TEXT": "with --tools: the result of the model's (next unanswered) tool call; the model then goes on",
    "/save FILE": "write the conversation to FILE (JSON)",
    "/load FILE": "continue a conversation /save wrote",
    "/reset": "clear the conversation",
    "/exit": "quit (or Ctrl-D)",
}
# What /set changes: the command's own options, checked by the same parsers as on the command line.
SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "max_tokens")
DEFAULT_HISTORY = Path.home() / ".cache" / "gemma3" / "chat_history"


def register(sub):
    p = sub.add_parser("chat", help="interactive multi-turn chat with the chat template (instruction-tuned models)",
                       description="Chat in the terminal. Enter sends, Alt-Enter (or a line ending in \\) starts a "
                                   "new line, Ctrl-C stops a reply, Ctrl-D quits; /help lists the commands.")
    p.add_argument("--system", default=None, help="system prompt (merged into the first user turn)")
    p.add_argument("--history", default=str(DEFAULT_HISTORY), help="file that keeps your input lines across sessions")
    options.add(p, *options.MODEL, *options.SAMPLING, *options.VISION, "adapter", *options.TOOLS)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args):
    model, tok = options.load_model(args)
    options.warn_if_not_chat_model(args, tok)
    session = Session(args, model, tok)
    read = line_editor(args.history) if sys.stdin.isatty() and sys.stdout.isatty() else read_piped
    print("Chat with Gemma 3. /help lists the commands; Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            text = read()
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the conversation
            continue
        except EOFError:
            print(file=sys.stderr)
            return
        if text.strip().startswith("/"):
            if not session.command(text.strip()):
                return
        elif text.strip():
            session.say(text)


def line_editor(history: str):
    """A `read()` on prompt_toolkit, with `history` kept in a file."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")  # Alt-Enter: a new line in the same message
    def _(event):
        event.current_buffer.insert_text("\n")

    @keys.add("enter")
    def _(event):
        buffer = event.current_buffer
        if buffer.document.text_before_cursor.endswith("\\"):  # a trailing backslash continues the message
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    Path(history).parent.mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(history), multiline=True, key_bindings=keys,
                            prompt_continuation="... ")
    return lambda: session.prompt("> ")


def read_piped() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


class Session:
    """One conversation: its messages, the images in it, and the model's prefix cache (each turn
    re-sends the whole conversation; the cache resumes after the previous turns)."""

    def __init__(self, args, model, tok):
        from ..inference.prefix_cache import PrefixCache

        self.args, self.model, self.tok = args, model, tok
        self.calling = options.tool_calling(args, tok)
        self.prefix_cache = PrefixCache(model, kv_dtype=args.kv_dtype)
        self.encoder = None  # (vision model, Pan & Scan), loaded with the first image
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []
        self.images, self.pending = [], []  # (path, soft tokens) in the conversation, for the next message

    def say(self, text: str):
        from ..inference.multimodal import with_placeholders

        self.reply([{"role": "user", "content": with_placeholders(text, len(self.pending)) if self.pending else text}])

    def reply(self, new: list[dict]):
        """The model's reply to the conversation with the `new` messages (kept with the reply)."""
        from ..formats.tokenizer import apply_chat_template
        from ..inference.generate import stream_generate
        from ..inference.multimodal import build_prompt
        from ..inference.tools import chat_messages

        images = self.images + self.pending
        reply, finish = [], None
        try:
            params, extra = options.sampling_params(self.args), {}
            if self.calling is not None and self.calling.native:
                prompt, params, extra = options.tool_prompt(self.tok, self.messages + new, self.calling, params,
                                                            bool(images))
            else:
                prompt = apply_chat_template(chat_messages(self.messages + new, self.calling))
            if images:
                prompt = build_prompt(self.model, self.tok, prompt, [features for _, features in images])
            for chunk in stream_generate(self.model, self.tok, prompt, self.args.max_tokens, params, self.args.stop,
                                         prefix_cache=self.prefix_cache, **extra):
                reply.append(chunk.text)
                finish = chunk.finish_reason
                print(chunk.text, end="", flush=True)
            print()
        except KeyboardInterrupt:  # the reply so far stays in the conversation, as it was shown
            print("\n(reply stopped)", file=sys.stderr)
        except ValueError as e:  # e.g. the conversation outgrew the context: this message is not taken
            print(f"gemma3: error: {e}", file=sys.stderr)
            return
        text = "".join(reply)
        calls = self.calling.parse(text) if self.calling is not None and finish == "stop" else None
        for call in calls or []:
            note(f"tool call {call['function']['name']}({call['function']['arguments']}): answer with /result TEXT")
        self.messages += new + [{"role": "assistant", "content": "", "tool_calls": calls} if calls
                                else {"role": "model", "content": text}]
        self.images, self.pending = images, []

    def result(self, text: str):
        """`text` answers the first tool call of the last reply that has no answer yet; once all
        have one, the model goes on."""
        last = next((i for i in range(len(self.messages) - 1, -1, -1) if self.messages[i]["role"] != "tool"), None)
        calls = self.messages[last].get("tool_calls") if last is not None else None
        answered = {m["tool_call_id"] for m in self.messages[last + 1:]} if calls else set()
        waiting = [c for c in calls or [] if c["id"] not in answered]
        if not waiting:
            raise ValueError("no tool call is waiting for a result")
        message = {"role": "tool", "tool_call_id": waiting[0]["id"], "content": text}
        if len(waiting) > 1:
            self.messages.append(message)
            note(f"result of {waiting[0]['function']['name']} taken; {len(waiting) - 1} call(s) still wait")
        else:
            self.reply([message])

    def command(self, line: str) -> bool:
        """Runs a /command; False when the session ends."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        takes_arg = {"/image": self.attach, "/save": self.save, "/load": self.load, "/result": self.result}
        try:
            if name in ("/exit", "/quit"):
                return False
            if name == "/reset":
                self.reset()
                note("conversation cleared")
            elif name == "/set":
                self.set(arg)
            elif name in takes_arg:
                if not arg:
                    raise ValueError(f"usage: {name} {dict(image='PATH', result='TEXT').get(name[1:], 'FILE')}")
                takes_arg[name](arg)
            else:
                if name != "/help":
                    note(f"{name} is not a command; your message was not sent")
                print("\n".join(f"  {usage:18} {what}" for usage, what in COMMANDS.items()), file=sys.stderr)
        except (OSError, ValueError) as e:  # a bad file, value or image: the conversation goes on
            print(f"gemma3: error: {name}: {e}", file=sys.stderr)
        return True

    def set(self, arg: str):
        if not arg:
            note(", ".join(f"{name} {getattr(self.args, name)}" for name in SETTINGS))
            return
        name, _, value = arg.partition(" ")
        name = name.replace("-", "_")
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; one of {', '.join(SETTINGS)}")
        try:
            setattr(self.args, name, options.OPTIONS[name].kwargs["type"](value.strip()))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{name}: {e}") from None
        note(f"{name} {getattr(self.args, name)}")

    def attach(self, path: str):
        self.pending.append((path, self.encode(path)))
        note(f"image {path} attached to your next message")

    def encode(self, path: str):
        """The soft tokens of the image file at `path`."""
        from ..inference.multimodal import encode_image, load_image

        image = load_image(path)
        self.encoder = self.encoder or options.vision_encoder(self.args)
        return encode_image(self.encoder[0], image, self.encoder[1])

    def save(self, path: str):
        Path(path).write_text(json.dumps({"messages": self.messages, "images": [p for p, _ in self.images]},
                                         indent=1, ensure_ascii=False), encoding="utf-8")
        note(f"conversation saved to {path}")

    def load(self, path: str):
        from ..formats.tokenizer import apply_chat_template
        from ..inference.tools import chat_messages

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        messages, images = (data.get("messages"), data.get("images", [])) if isinstance(data, dict) else (None, None)
        if not (isinstance(messages, list) and isinstance(images, list) and all(isinstance(i, str) for i in images)
                and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
            raise ValueError(f"{path}: not a conversation that /save wrote")
        # roles that a next message continues
        apply_chat_template(chat_messages(messages + [{"role": "user", "content": ""}]))
        images = [(image, self.encode(image)) for image in images]  # from their files again
        self.messages, self.images, self.pending = messages, images, []
        note(f"conversation of {len(messages)} messages loaded from {path}")


def note(text: str):
    print(f"({text})", file=sys.stderr)
