"""Scale-out: the `gemma3` training commands under `torchrun --nproc-per-node 2` on CPU
(gloo) reach the same parameters as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from tests.helpers.training import TEXT, tiny_model_dir


def _run(args, nproc=None, timeout=240):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", "gemma3"] if nproc else [sys.executable, "-m", "gemma3"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + args, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "data.txt").write_text(TEXT)
    model = tiny_model_dir(tmp / "base")
    common = ["finetune", "--model", str(model), "--data", str(tmp / "data.txt"), "--seq-len", "32", "--steps", "5",
              "--batch-size", "4", "--lr", "3e-3", "--warmup", "1", "--quiet", "--threads", "1"]
    _run(common + ["--micro-batch", "2", "--out", str(tmp / "single")])
    return tmp, common, load_file(str(tmp / "single" / "final" / "model.safetensors"))


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(setup, strategy):
    """Global batch 4: one process accumulates 2 micro-batches of 2 sequences; two ranks each run
    one of those micro-batches and DDP all-reduces (FSDP2 reduce-scatters) the gradients. After 5
    AdamW steps (2, a checkpoint, 3 more after resuming) every parameter equals the single-process
    run's to 1e-6. The micro-batches are the same on both sides, so both sum the same two partial
    gradients; with other micro-batch shapes the matmuls round differently and AdamW's
    normalisation blows those ulps up to ~1e-5 on the odd weight whose gradient nearly cancels."""
    tmp, common, single = setup
    # Interrupted after 2 steps and resumed: checkpoints gather (FSDP: full state dicts) and re-shard.
    run = common + ["--micro-batch", "2", "--strategy", strategy, "--out", str(tmp / strategy)]
    _run(run + ["--stop-after", "2"], nproc=2)
    _run(run + ["--resume"], nproc=2)
    state = load_file(str(tmp / strategy / "final" / "model.safetensors"))
    assert state.keys() == single.keys()
    initial = load_file(str(tmp / "base" / "model.safetensors"))
    assert max((single[k] - initial[k]).abs().max().item() for k in state) > 1e-3  # training moved them
    worst = max((state[k] - single[k]).abs().max().item() for k in state)
    assert worst <= 1e-6, f"max |Δ| = {worst:.2e}"


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp_checkpoint_is_sharded_and_resumes_on_another_world_size(setup):
    """FSDP checkpoints are not gathered: each of the 2 ranks writes its own shards of the weights
    and AdamW state (DCP). One process then resumes from them (DCP reshards on load) and ends
    where the uninterrupted single-process run does."""
    tmp, common, single = setup
    out = tmp / "fsdp_to_one"
    run = common + ["--micro-batch", "2", "--strategy", "fsdp", "--out", str(out)]
    _run(run + ["--stop-after", "2"], nproc=2)
    step = out / "checkpoints" / "step-00000002"
    shards = sorted(p.name for p in (step / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and (step / "sharded" / ".metadata").is_file()
    assert not (step / "model.safetensors").exists()  # nothing gathered on rank 0
    _run(run + ["--resume"])  # one process
    state = load_file(str(out / "final" / "model.safetensors"))
    assert state.keys() == single.keys()
    worst = max((state[k] - single[k]).abs().max().item() for k in state)
    assert worst <= 1e-6, f"max |Δ| = {worst:.2e}"
