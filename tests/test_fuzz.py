"""Fuzzing with hypothesis: the parsers that read what users and clients hand us give either a
result or our typed one-line error (a ValueError subclass naming the problem), never another
exception, a hang or a memory blow-up. Bounded for CI (GEMMA3_FUZZ_EXAMPLES examples per target,
default 60, about a minute in all); the long run in docs/testing.md sets it to thousands.

Targets: the GGUF reader (the real embedded file's header, metadata and tensor table, mutated),
the HF directory reader (config.json and the safetensors header, mutated), the tokenizer
(arbitrary Unicode and ids), the chat-template renderer, the image decoder, and the server's
request bodies (the real server, bodies built from the schema's fields with arbitrary JSON)."""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import resource
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma3.formats.checkpoint import WeightsError, read_gguf_model, read_hf_dir
from gemma3.formats.gguf import GGUFError, read_gguf
from gemma3.formats.tokenizer import Tokenizer, apply_chat_template
from gemma3.inference.load import embedded_gguf_path
from gemma3.inference.multimodal import ImageError, decode_image
from gemma3.model.config import UnsupportedModelError

MODEL_ERRORS = (GGUFError, WeightsError, UnsupportedModelError)  # what reading a model may raise

EXAMPLES = int(os.environ.get("GEMMA3_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("GEMMA3_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck), database=None)
MEMORY_GROWTH_MB = 512  # a parser that believes a corrupt length must not allocate it
RUNS: collections.Counter = collections.Counter()  # examples run per target


def fuzz(**strategies):
    """FUZZ'd @given(**strategies), counting the examples each target runs (printed at the end of
    the module: the long run's count)."""
    def wrap(f):
        @functools.wraps(f)
        def counted(*args, **kwargs):
            RUNS[f.__qualname__.split(".")[0]] += 1
            return f(*args, **kwargs)
        return FUZZ(given(**strategies)(counted))
    return wrap


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfuzz examples run: {sum(RUNS.values())} ({', '.join(f'{k} {v}' for k, v in RUNS.items())})")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_line(e: Exception):
    message = str(e)
    assert message and "\n" not in message.strip(), repr(message)


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_parts(tmp_path_factory):
    """The real file's bytes up to its tensor data (header, metadata, tensor table), where the
    tensor table starts, and the file's full size (the data is left as a sparse hole)."""
    path = embedded_gguf_path()
    real = read_gguf(path)
    first = next(iter(real.tensors.values()))
    data_start = first.data.storage_offset()
    with open(path, "rb") as f:
        head = f.read(data_start)
    name = first.name.encode()
    table = head.rindex(struct.pack("<Q", len(name)) + name)
    return head, table, os.path.getsize(path), tmp_path_factory.mktemp("gguf")


def _mutations(head_len: int, table: int):
    where = st.one_of(st.integers(0, 63), st.integers(table, head_len - 1), st.integers(0, head_len - 1))
    flip = st.tuples(st.just("byte"), where, st.integers(0, 255))
    wide = st.tuples(st.just("u64"), where, st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
    cut = st.tuples(st.just("cut"), st.integers(0, head_len), st.just(0))
    return st.lists(st.one_of(flip, wide, cut), min_size=1, max_size=4)


def flipped(data: bytes, edits) -> bytes:
    """`data` with byte `at` set to `value` for each (at, value) inside it."""
    out = bytearray(data)
    for at, value in edits:
        if at < len(out):
            out[at] = value
    return bytes(out)


def read_typed(read, path, rss_before: float):
    """read(path) returns or raises one of our typed one-line errors, within the memory bound."""
    try:
        read(path)
    except MODEL_ERRORS as e:
        one_line(e)
    assert peak_rss_mb() - rss_before < MEMORY_GROWTH_MB


def _apply(head: bytes, edits) -> bytes:
    data = bytearray(head)
    for kind, at, value in edits:
        if kind == "cut":
            del data[at:]
        elif kind == "byte" and at < len(data):
            data[at] = value
        elif kind == "u64" and at + 8 <= len(data):
            data[at:at + 8] = struct.pack("<Q", value)
    return bytes(data)


def test_gguf_reader_mutated_header_and_tensor_table(gguf_parts):
    head, table, size, tmp = gguf_parts
    before = peak_rss_mb()

    @fuzz(edits=_mutations(len(head), table))
    def run(edits):
        path = tmp / "model.gguf"
        data = _apply(head, edits)
        with open(path, "wb") as f:
            f.write(data)
            if len(data) == len(head):
                f.truncate(size)  # the tensor data: a sparse hole of zeros
        read_typed(read_gguf_model, path, before)

    run()


# ---------------------------------------------------------------- HF directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers.training import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("hf") / "model")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=10)


def test_hf_reader_mutated_config_and_safetensors_header(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    weights = (hf_dir / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", weights[:8])[0]
    before = peak_rss_mb()

    @fuzz(changes=st.dictionaries(st.sampled_from(sorted(config)) | st.text(max_size=8), JSON, max_size=3),
           raw=st.one_of(st.none(), st.binary(max_size=40)),
           edits=st.lists(st.tuples(st.integers(0, 8 + header_len - 1), st.integers(0, 255)), max_size=4),
           cut=st.one_of(st.none(), st.integers(0, len(weights))))
    def run(changes, raw, edits, cut):
        d = tmp_path / "m"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        if raw is not None:
            (d / "config.json").write_bytes(raw)
        else:
            (d / "config.json").write_text(json.dumps(config | changes, allow_nan=True))
        (d / "model.safetensors").write_bytes(flipped(weights[:cut] if cut is not None else weights, edits))
        read_typed(read_hf_dir, d, before)

    run()


# ---------------------------------------------------------------- tokenizer and chat template


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from gemma3 import cpu

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(embedded_gguf_path()).metadata)
    cpu.accelerate_tokenizer(tokenizer)  # the path the server takes (a no-op without the kernels)
    return tokenizer


def test_tokenizer_arbitrary_text_and_ids(tok):
    @fuzz(text=st.text(max_size=200), special=st.booleans(),
           ids=st.lists(st.integers(-5, tok.vocab_size + 5), max_size=50))
    def run(text, special, ids):
        try:
            out = tok.encode(text, parse_special=special)
        except ValueError as e:  # only for text that is not valid Unicode
            assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
            one_line(e)
        else:
            assert all(0 <= i < tok.vocab_size for i in out)
            if not special and "\u2581" not in text:  # U+2581 stands for a space by design
                assert tok.decode(out) == text
        try:
            assert isinstance(tok.decode(ids, skip_special=False), str)
        except ValueError as e:
            assert any(not 0 <= i < tok.vocab_size for i in ids)
            one_line(e)

    run()


def test_chat_template_arbitrary_messages():
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "model", "tool"])
                                     | st.text(max_size=6), "content": st.text(max_size=40) | JSON})

    @fuzz(messages=st.lists(message, max_size=5), generation=st.booleans())
    def run(messages, generation):
        try:
            assert isinstance(apply_chat_template(messages, add_generation_prompt=generation), str)
        except ValueError as e:
            one_line(e)

    run()


# ---------------------------------------------------------------- images


def _image_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


def test_image_decoder_mutated_and_random_bytes():
    seeds = [_image_bytes(f) for f in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]
    before = peak_rss_mb()

    @fuzz(seed=st.sampled_from(seeds), edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
           cut=st.one_of(st.none(), st.integers(0, 400)), noise=st.binary(max_size=64))
    def run(seed, edits, cut, noise):
        for data in (noise, seed[:cut] if cut is not None else seed):
            try:
                decode_image(flipped(data, edits), "part")
            except ImageError as e:
                one_line(e)
        assert peak_rss_mb() - before < MEMORY_GROWTH_MB

    run()


# ---------------------------------------------------------------- request bodies


@pytest.fixture(scope="module")
def server():
    from tests.helpers.server import ServerProcess

    srv = ServerProcess("--ctx", "256", "--max-tokens", "2", "--max-batch", "4")
    yield srv
    srv.stop()


def test_request_bodies_never_get_a_server_error(server):
    import httpx

    from tests.helpers.server import MODEL_ID

    fields = {"model": st.just(MODEL_ID) | JSON, "prompt": st.text(max_size=30) | JSON,
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                          "content": st.text(max_size=30) | JSON}), max_size=3)
              | JSON, "max_tokens": st.integers(-2, 3) | JSON, "temperature": st.floats() | JSON,
              "top_p": st.floats() | JSON, "stop": st.lists(st.text(max_size=5), max_size=3) | JSON,
              "logit_bias": st.dictionaries(st.text(max_size=6), st.floats(), max_size=3) | JSON,
              "seed": st.integers(-2**70, 2**70) | JSON, "stream": st.booleans(), "logprobs": JSON}
    body = st.fixed_dictionaries({}, optional=fields)
    with httpx.Client(base_url=server.url, timeout=120) as client:

        @fuzz(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=body)
        def run(path, body):
            r = client.post(path, content=json.dumps(body, allow_nan=True).encode(),
                            headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (body, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        run()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
