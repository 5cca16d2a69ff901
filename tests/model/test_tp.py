"""Tensor-parallel inference (gemma3.tp) against the unsharded model, under `torchrun
--nproc-per-node 2` with gloo on CPU; and the `--device` switch (CUDA parts skip without a GPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gemma3.model import tp
from gemma3.model.config import PRESETS
from tests.helpers import DATA
from tests.helpers.cli import run_cli
from tests.helpers.models import random_model, tiny_config
from tests.helpers.training import tiny_model_dir

WORKER = Path(__file__).parents[1] / "helpers" / "tp_worker.py"
needs_gloo = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def torchrun(args, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_shard_plan_splits_or_replicates_kv_heads():
    assert tp.Shard.plan(PRESETS["27b"], 4) == tp.Shard(8, 4, False, 5376, 65552)  # 16 KV heads split
    assert tp.Shard.plan(PRESETS["27b"], 8).kv_heads == 2
    assert tp.Shard.plan(PRESETS["270m"], 2) == tp.Shard(2, 1, True, 1024, 131072)  # 1 KV head replicated
    assert tp.Shard.plan(PRESETS["4b"], 8).kv_replicated  # 4 KV heads over 8 ranks: two copies of each
    with pytest.raises(ValueError, match="4 query heads"):
        tp.Shard.plan(PRESETS["270m"], 3)
    with pytest.raises(ValueError, match="KV heads"):
        tp.Shard.plan(tiny_config(heads=12, kv_heads=4, hidden=96), 6)


def test_memory_plan_splits_weights_and_kv_across_ranks():
    from gemma3.model.memory import kv_bytes_windowed, tp_plan

    cfg = PRESETS["27b"]
    plan = tp_plan(cfg, 4, 131072)
    # Everything is split four ways except the norms, which every rank keeps.
    norms = cfg.num_layers * (4 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
    assert 4 * plan["weights_bytes_per_rank"] == 2 * (cfg.num_params() + 3 * norms)
    assert 4 * plan["kv_bytes_per_rank"] == kv_bytes_windowed(cfg, 131072)
    small = PRESETS["270m"]  # one KV head: every rank holds the whole cache
    assert tp_plan(small, 2, 32768)["kv_bytes_per_rank"] == kv_bytes_windowed(small, 32768)


def test_memory_cli_says_whether_a_tp_plan_fits(capsys):
    args = ["memory", "--model", "27b", "--tp", "4", "--ctx", "131072", "--json", "--device-gb"]
    code, out, _ = run_cli(args + ["80"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["kv_heads_per_rank"] == 4
    assert 15 < plan["total_bytes_per_rank"] / 2**30 < 16  # 12.6 GiB of weights + 2.6 GiB of KV
    code, out, _ = run_cli(args + ["12"], capsys)
    assert code == 0 and not json.loads(out)["fits"]
    code, out, _ = run_cli(["memory", "--model", "27b", "--tp", "4", "--ctx", "131072", "--device-gb", "80"], capsys)
    assert "fits a 80 GiB device" in out and "15.18 GiB per rank" in out
    code, _, err = run_cli(["memory", "--model", "27b", "--tp", "3"], capsys)
    assert code == 1 and "32 query heads" in err


def test_apply_refuses_a_swapped_fast_path_module():
    model = random_model(tiny_config())

    class FastLinear(nn.Linear):  # stands in for the quantized kernels' module swap
        pass

    model.layers[1].mlp.up_proj = FastLinear(64, 128, bias=False)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj \(FastLinear\)"):
        tp.apply(model, 0, 2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tiny.pt"
    torchrun([str(WORKER), "tiny", str(out)])
    return torch.load(out)


@needs_gloo
def test_tiny_two_kv_heads_logits_match_single_process(tiny_run):
    r = tiny_run
    for key in ("logits", "batched"):  # chunked prefill (window 8, 20 tokens) and batched decode
        worst = (r[f"tp_{key}"] - r[f"single_{key}"]).abs().max().item()
        assert worst <= 1e-5, f"{key}: max |Δ| = {worst:.2e}"
    assert r["tp_logits"].shape == r["single_logits"].shape == (20, 257)  # padded vocab slice trimmed
    assert int(r["tp_kv_bytes"]) * 2 == int(r["single_kv_bytes"])  # each rank caches 1 of the 2 KV heads


@needs_gloo
def test_tiny_generation_is_identical(tiny_run):
    r = tiny_run
    assert r["tp_tokens"].tolist() == r["single_tokens"].tolist()
    assert len(set(r["single_tokens"].tolist())) > 3  # not a degenerate repeat
    everyone = r["tp_sampled_all_ranks"]
    assert (everyone == everyone[0]).all()  # the shared seed keeps the ranks in step
    assert everyone[0].tolist() == r["single_sampled"].tolist()


@needs_gloo
def test_real_270m_one_kv_head_matches_single_process(tmp_path):
    """The 270M model has one KV head: both ranks keep a copy of it. The sharded sums (o/down
    projections, all-reduced) round differently from the unsharded ones, so equality is held to
    the fp32 noise floor, measured against the same model in float64: TP must be no further from
    it than single-process fp32 is, and within 1e-5 of the logits' scale of the single process."""
    out = tmp_path / "270m.pt"
    torchrun([str(WORKER), "270m", str(out)])
    r = torch.load(out)
    single, sharded, exact = r["single_logits"], r["tp_logits"], r["fp64_logits"]
    worst = (sharded - single).abs().max().item()
    scale = single.abs().max().item()
    floor = (single.double() - exact).abs().max().item()
    print(f"270M TP vs single: max |Δ| {worst:.2e} (logits up to {scale:.1f}); single fp32 vs fp64 {floor:.2e}")
    assert worst <= 1e-5 * scale
    assert (sharded.double() - exact).abs().max().item() <= 2 * floor
    assert int(r["tp_kv_bytes"]) == int(r["single_kv_bytes"])  # replicated KV head: same cache per rank
    assert r["tp_tokens"].tolist() == r["single_tokens"].tolist()
    assert len(r["tp_tokens"]) == 64


@needs_gloo
def test_torchrun_generate_cli_matches_single_process(tmp_path):
    model = tiny_model_dir(tmp_path / "m")
    args = ["generate", "Once upon a time", "-m", str(model), "-n", "64", "--json", "--backend", "torch"]
    single = subprocess.run([sys.executable, "-m", "gemma3", *args], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    sharded = torchrun(["-m", "gemma3", *args]).stdout.strip().splitlines()
    assert len(sharded) == 1  # rank 1's output is silenced
    expected = json.loads(single.stdout)
    got = json.loads(sharded[0])
    assert got["completion_tokens"] == expected["completion_tokens"] == 64
    assert got["text"] == expected["text"]


def test_commands_that_cannot_shard_refuse_under_torchrun(tmp_path, capsys, monkeypatch):
    model = tiny_model_dir(tmp_path / "m")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(["chat", "-m", str(model)], capsys)
    assert code == 1 and "does not run under torchrun" in err


@needs_gloo
def test_serve_tp_two_ranks_batches_and_matches_single_process():
    """`gemma3 serve --tp 2` starts its second rank itself. Two concurrent greedy requests share
    decode steps on the sharded real 270M model and each equals single-process fp32 generation;
    on SIGTERM both ranks exit cleanly (rank 0 reports any other rank that fails or hangs)."""
    import openai

    from gemma3 import generate, load
    from tests.helpers.server import MODEL_ID, ServerProcess

    prompts, n = ["The capital of France is", "def fibonacci(n):"], 24
    srv = ServerProcess("--tp", "2", "--max-batch", "4", "--ctx", "256")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda p: client.completions.create(
                model=MODEL_ID, prompt=p, max_tokens=n, temperature=0).choices[0].text, prompts))
        batched = srv.metric("gemma3_decode_batch_size_count") - srv.metric('gemma3_decode_batch_size_bucket{le="1"}')
        # A cache the leader dropped is dropped by the follower too: a third request still works.
        again = client.completions.create(model=MODEL_ID, prompt=prompts[0], max_tokens=n, temperature=0)
    finally:
        code = srv.stop()
    err = srv.proc.stderr.read() if srv.proc.stderr else ""  # None with GEMMA3_SERVER_LOG set
    assert code == 0 and "exited with status" not in err and "failed" not in err, err[-2000:]
    assert batched > 0
    model, tok = load(None, backend="torch")
    for prompt, out in zip(prompts, outs):
        assert out == generate(model, tok, prompt, max_tokens=n), prompt
    assert again.choices[0].text == outs[0]


def test_serve_tp_refuses_what_it_cannot_shard(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m")
    code, _, err = run_cli(["serve", "-m", str(model), "--tp", "2", "--mmproj", str(tmp_path / "x.gguf")], capsys)
    assert code == 1 and "serves text only" in err
    code, _, err = run_cli(["serve", "-m", str(model), "--tp", "0"], capsys)
    assert code == 2 and "argument --tp: 0 is not a positive integer" in err


def test_device_auto_on_cpu_is_the_cpu_path(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m")
    args = ["generate", "abc", "-m", str(model), "-n", "8", "--json"]
    outs = [json.loads(run_cli(args + extra, capsys)[1])["text"] for extra in ([], ["--device", "auto"])]
    if not torch.cuda.is_available():
        assert outs[0] == outs[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    code, _, err = run_cli(["generate", "abc", "--device", "cuda"], capsys)
    assert code == 1 and "no CUDA GPU" in err


@needs_cuda
def test_270m_on_cuda_bf16_matches_cpu_fp32():
    """bf16 weights and activations on CUDA against the fp32 CPU reference: bf16 keeps 8 bits of
    mantissa (relative error ~4e-3 per rounding), so logits are held to 3% of their range and the
    greedy choice to 97% agreement over 256 positions."""
    from gemma3.inference.load import load

    cpu, tok = load(backend="torch")
    gpu, _ = load(dtype=torch.bfloat16, backend="torch")
    gpu = gpu.to("cuda")
    ids = torch.tensor([tok.encode((DATA / "gpl-3.0.txt").read_text())[:256]])
    with torch.inference_mode():
        ref = cpu(ids)[0]
        got = gpu(ids.cuda())[0].float().cpu()
    rel = (got - ref).abs().max().item() / (ref.max() - ref.min()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"CUDA bf16 vs CPU fp32: max|Δ|/range {rel:.2e}, argmax agreement {agree:.2%}")
    assert rel <= 0.03
    assert agree >= 0.97


@needs_gloo
def test_torchrun_two_launchers_serve_matches_single_process(tmp_path):
    """Two "nodes" on this machine: two torchrun launchers (--nnodes 2, one process each) meet at a
    c10d rendezvous on 127.0.0.1, and `serve --tp 2` serves from whichever rank is 0 (2 KV heads:
    one per rank). Greedy completions equal single-process generation; SIGTERM to both launchers
    stops both ranks."""
    import openai

    from gemma3 import generate, load
    from tests.helpers.server import free_port

    model_dir = tiny_model_dir(tmp_path / "tiny", seed=2)  # a seed whose greedy text is not one repeated byte
    port, rdzv = free_port(), free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "-m", "gemma3", "serve", "--tp", "2",
           "-m", str(model_dir), "--port", str(port), "--threads", "1", "--log-level", "warning"]
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in range(2)]
    nodes = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    prompts = ["Once upon a time", "It is a truth"]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        outs = [client.completions.create(model="tiny", prompt=p, max_tokens=32, temperature=0).choices[0].text
                for p in prompts]
    finally:
        for n in nodes:
            n.send_signal(signal.SIGTERM)  # each launcher passes it on to its worker
        for n in nodes:
            n.wait(60)
        text = "".join(log.seek(0) or log.read() for log in logs)
    assert text.count("tensor parallel over 2 ranks") == 1, text[-3000:]  # rank 0 only, on one of the nodes
    model, tok = load(model_dir)
    for prompt, out in zip(prompts, outs):
        assert out == generate(model, tok, prompt, max_tokens=32), prompt
    assert len(set(outs[0])) > 3  # not a degenerate repeat
