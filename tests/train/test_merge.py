"""WARP's merges (train/merge.py): SLERP, LITI, averaging, the EMA anchor, and LoRA adapters merged
through their dense task vectors."""

import math

import pytest
import torch

from gemma3.train import lora, merge
from gemma3.train.merge import average, ema, liti, slerp
from tests.helpers.cli import run_cli


def _state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g) * scale, "b": torch.randn(5, generator=g) * scale}


def test_slerp_of_identical_task_vectors_is_that_vector():
    init, a = _state(0), _state(1)
    for t in (0.0, 0.3, 0.5, 1.0):
        for k, v in slerp(init, [a, {k: v.clone() for k, v in a.items()}], t).items():
            torch.testing.assert_close(v, a[k])


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_ends_at_each_model():
    init = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    mid = slerp(init, [a, b], 0.5)["w"]
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))  # on the arc, not the chord
    torch.testing.assert_close(slerp(init, [a, b], 0.0)["w"], a["w"])
    torch.testing.assert_close(slerp(init, [a, b], 1.0)["w"], b["w"])
    shifted = {"w": torch.tensor([5.0, -2.0])}  # task vectors are taken relative to the init
    moved = slerp(shifted, [{"w": a["w"] + shifted["w"]}, {"w": b["w"] + shifted["w"]}], 0.5)["w"]
    torch.testing.assert_close(moved, mid + shifted["w"])


def test_liti_ends_and_average():
    init, a, b = _state(0), _state(1), _state(2)
    merged = average(init, [a, b])
    for k in init:
        torch.testing.assert_close(liti(init, merged, 0.0)[k], init[k])
        torch.testing.assert_close(liti(init, merged, 1.0)[k], merged[k])
        torch.testing.assert_close(liti(init, merged, 0.25)[k], init[k] + 0.25 * (merged[k] - init[k]))
        torch.testing.assert_close(merged[k], (a[k] + b[k]) / 2)
        torch.testing.assert_close(average(init, [a, b], [3, 1])[k], 0.75 * a[k] + 0.25 * b[k])
    anchor = {k: v.clone() for k, v in init.items()}
    ema(anchor, a, 0.1)
    torch.testing.assert_close(anchor["w"], 0.9 * init["w"] + 0.1 * a["w"])
    with pytest.raises(ValueError, match="one initialisation"):
        average(init, [{"w": a["w"]}])
    with pytest.raises(ValueError, match="η must be in"):
        liti(init, merged, 1.5)


def _adapter(tmp_path, name, seed, rank=2):
    from tests.helpers.models import random_model, tiny_config

    model = random_model(tiny_config(layers=2, local_per_global=1))
    lora.apply_lora(model, lora.LoRAConfig(rank=rank, alpha=4.0, targets=("q_proj", "down_proj")))
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g)
    lora.save_adapter(tmp_path / name, model.lora_config, lora.lora_state(model))
    return tmp_path / name


def test_adapter_merges_are_exact_on_the_dense_task_vectors(tmp_path, capsys):
    a, b = _adapter(tmp_path, "a", 1), _adapter(tmp_path, "b", 2)
    da, db = merge.adapter_deltas(a), merge.adapter_deltas(b)
    zero = {k: torch.zeros_like(v) for k, v in da.items()}
    for how, want in (("average", average(zero, [da, db])), ("slerp", slerp(zero, [da, db], 0.5))):
        code, out, err = run_cli(["merge", how, str(a), str(b), "--out", str(tmp_path / how)], capsys)
        assert code == 0, err
        got = merge.adapter_deltas(tmp_path / how)
        assert lora.read_adapter_config(tmp_path / how).rank == 4
        for k in want:
            torch.testing.assert_close(got[k].float(), want[k].float(), atol=1e-4, rtol=1e-4)
    code, _, err = run_cli(["merge", "liti", str(tmp_path / "slerp"), "--eta", "0.3", "--out", str(tmp_path / "l")], capsys)
    assert code == 0, err
    got, full = merge.adapter_deltas(tmp_path / "l"), merge.adapter_deltas(tmp_path / "slerp")
    for k in got:
        torch.testing.assert_close(got[k], 0.3 * full[k], atol=1e-4, rtol=1e-4)
    code, _, err = run_cli(["merge", "liti", str(a), str(b), "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and "give one adapter" in err
