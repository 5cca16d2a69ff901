"""Reward models and WARM (train/reward_model.py, `gemma3 rm`) on tiny random models."""

import json

import pytest
import torch

from gemma3.train import reward_model as rmod
from tests.helpers.cli import run_cli
from tests.helpers.models import random_model, tiny_config
from tests.helpers.training import byte_tokenizer, tiny_model_dir


def _rm(seed=0, layers=1):
    backbone = random_model(tiny_config(vocab=263, layers=3, local_per_global=2, window=16), seed=seed)
    return rmod.RewardModel(backbone, trainable_layers=layers, head_seed=seed)


def _pairs(n, seed=0):
    """A learnable preference: the chosen answer ends in 'a', the rejected in 'z'."""
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": f"q{int(torch.randint(0, 99, (1,), generator=g))}:", "chosen": "xa", "rejected": "xz"}
            for _ in range(n)]


def test_scores_ignore_right_padding_and_only_the_top_trains():
    rm = _rm()
    tok = byte_tokenizer()
    ids, lengths = rmod.encode_pairs(tok, [{"prompt": "a much longer prompt", "chosen": "!", "rejected": "?"},
                                           {"prompt": "hi", "chosen": "!", "rejected": "?"}])
    with torch.no_grad():
        batch = rm(ids, lengths)
        alone = rm(ids[1:2, :lengths[1]], lengths[1:2])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    trained = rm.trained_parameters()
    assert all(k.startswith(("backbone.layers.2.", "backbone.norm.", "head.")) for k in trained)
    assert {n for n, p in rm.named_parameters() if p.requires_grad} == set(trained)


def test_bradley_terry_learns_and_flipped_labels_reverse_it():
    tok = byte_tokenizer()
    rm = _rm()
    feats = rmod.PairFeatures(rm, *rmod.encode_pairs(tok, _pairs(32)))
    init = rmod.trained_state(rm)
    cfg = rmod.RMConfig(trainable_layers=1, lr=3e-3, epochs=3, batch=8)
    rmod.train_rm(rm, feats, cfg)
    assert rmod.accuracy(rm, feats) == 1.0
    rmod.load_trained_state(rm, init)
    rmod.train_rm(rm, feats, cfg, flipped=torch.ones(32, dtype=torch.bool))
    assert rmod.accuracy(rm, feats) == 0.0


def test_warm_averages_members_from_one_init():
    tok = byte_tokenizer()
    rm = _rm()
    feats = rmod.PairFeatures(rm, *rmod.encode_pairs(tok, _pairs(16)))
    members, averaged = rmod.train_warm(rm, feats, rmod.RMConfig(lr=1e-3, epochs=1), models=3, lr_spread=2.0)
    assert [c.lr for c, _ in members] == pytest.approx([5e-4, 1e-3, 2e-3])
    assert len({c.seed for c, _ in members}) == 3
    for k, v in averaged.items():
        torch.testing.assert_close(v, sum(s[k] for _, s in members) / 3)
    assert all(not torch.equal(members[0][1][k], members[1][1][k]) for k in averaged)  # they did differ
    with pytest.raises(ValueError, match="one shared initialisation"):
        rmod.warm_average([averaged, {"head.weight": averaged["head.weight"]}])


def test_bootstrap_member_never_sees_the_pairs_left_out_of_its_resample():
    tok = byte_tokenizer()
    rm = _rm()
    feats = rmod.PairFeatures(rm, *rmod.encode_pairs(tok, _pairs(16)))
    init = rmod.trained_state(rm)
    cfg = rmod.RMConfig(lr=1e-3, epochs=2, batch=4, seed=3, bootstrap=True)
    rows = rmod.training_rows(16, cfg)
    unseen = torch.tensor([i not in rows for i in range(16)])
    assert len(rows) == 16 and 0 < int(unseen.sum()) < 16

    def trained(c, flipped):
        rmod.load_trained_state(rm, init)
        rmod.train_rm(rm, feats, c, flipped)
        return rmod.trained_state(rm)

    clean = trained(cfg, None)
    for k, v in trained(cfg, unseen).items():  # flipping pairs it never draws changes nothing
        torch.testing.assert_close(v, clean[k], rtol=0, atol=0)
    full = rmod.RMConfig(lr=1e-3, epochs=2, batch=4, seed=3)
    assert rmod.training_rows(16, full) == list(range(16))
    flipped_full = trained(full, unseen)  # without the resample the same flips do change the model
    assert any(not torch.equal(flipped_full[k], trained(full, None)[k]) for k in clean)


def test_bad_pairs_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*chosen, rejected"):
        rmod.read_pairs(path)


def test_cli_pairs_train_warm_eval(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m")
    pairs = tmp_path / "pairs.jsonl"
    assert run_cli(["rm", "pairs", "--pairs", str(pairs), "--count", "12"], capsys)[0] == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == 12 and all(r["chosen"] != r["rejected"] for r in rows)
    base = ["--model", str(model), "--pairs", str(pairs), "--eval-pairs", str(pairs), "--epochs", "1", "--json"]
    code, out, err = run_cli(["rm", "warm", *base, "--models", "2", "--bootstrap", "--out", str(tmp_path / "warm")],
                             capsys)
    assert code == 0, err
    result = json.loads(out)
    assert json.loads((tmp_path / "warm" / "member1" / "rm_config.json").read_text())["bootstrap"] is True
    assert len(result["member_eval_accuracy"]) == 2 and 0 <= result["eval_accuracy"] <= 1
    code, out, err = run_cli(["rm", "eval", "--model", str(model), "--rm", str(tmp_path / "warm"), "--pairs",
                              str(pairs), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == result["eval_accuracy"]
    code, _, err = run_cli(["rm", "train", "--model", str(model), "--pairs", str(pairs)], capsys)
    assert code == 1 and "rm train needs --out" in err
