"""Training: data pipeline, LoRA, exact resume, and the distill / finetune / qat commands end to end
on tiny models."""

import json

import numpy as np
import pytest
import torch

from gemma3.cli import main
from gemma3.inference.load import load
from gemma3.train import lora
from gemma3.train.data import PackedDataset, batch_indices, chat_document, text_document
from gemma3.train.metrics import read_metrics
from tests.helpers.models import random_model, tiny_config
from tests.helpers.training import TEXT, byte_tokenizer, tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------- data


def test_chat_mask_covers_model_turns_only():
    tok = byte_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    doc = chat_document(tok, messages)
    from gemma3.formats.tokenizer import apply_chat_template

    whole = tok.encode(apply_chat_template(messages, add_generation_prompt=False), add_bos=False, parse_special=True)
    assert doc.ids.tolist() == whole  # piecewise encoding = encoding of the whole conversation
    targets = tok.decode([i for i, m in zip(doc.ids.tolist(), doc.mask) if m], skip_special=False)
    assert targets == "Hello!<end_of_turn>4<end_of_turn>"


def test_packing_and_deterministic_order():
    tok = byte_tokenizer()
    data = PackedDataset([text_document(tok, TEXT), text_document(tok, "short")], seq_len=32)
    inputs, targets, mask = data.sequences([0, 3])
    assert inputs.shape == targets.shape == mask.shape == (2, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    everything = data.sequences(range(data.n))
    assert not everything[2][everything[1] == tok.bos_id].any()  # a BOS is never a target
    assert everything[2][everything[1] != tok.bos_id].all()  # every other text token is
    first_epoch = np.concatenate([batch_indices(data.n, s, 4, seed=3) for s in range(data.n // 4)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no repeats within an epoch
    assert np.array_equal(batch_indices(data.n, 5, 4, seed=3), batch_indices(data.n, 5, 4, seed=3))
    assert not np.array_equal(batch_indices(data.n, 0, 8, seed=3), batch_indices(data.n, 0, 8, seed=4))


# ---------------------------------------------------------------- LoRA


def test_lora_merged_equals_unmerged_and_adapter_round_trip(tmp_path):
    model = random_model(tiny_config())
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)  # B starts at zero; make the adapters do something
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        unmerged = model(ids)
        lora.save_adapter(tmp_path, model.lora_config, lora.lora_state(model))
        merged_state = lora.merge_state({k: v.detach() for k, v in model.state_dict().items()}, model.lora_config)
        base = random_model(tiny_config())  # same seed: the same base weights
        lora.load_adapter(base, tmp_path)
        reloaded = base(ids)
        merged = lora.merge_lora(model)(ids)
    assert not torch.equal(unmerged, random_model(tiny_config())(ids))
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded, unmerged, rtol=0, atol=0)
    assert all(torch.equal(merged_state[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- resume


def _write_data(tmp_path):
    (tmp_path / "data.txt").write_text(TEXT)
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                             {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n")
    return ["--data", str(tmp_path / "data.txt"), "--data", str(tmp_path / "chat.jsonl")]


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "base")
    common = ["finetune", "--model", str(model_dir), *_write_data(tmp_path), "--seq-len", "48", "--steps", "6",
              "--batch-size", "4", "--micro-batch", "2", "--lr", "3e-3", "--warmup", "2", "--weight-decay", "0.1",
              "--quiet", "--threads", "1"]
    main(common + ["--out", str(tmp_path / "a")])
    main(common + ["--out", str(tmp_path / "b"), "--stop-after", "3"])
    assert not (tmp_path / "b" / "final").exists()
    main(common + ["--out", str(tmp_path / "b"), "--resume"])
    keys = ("step", "loss", "lr", "grad_norm")
    a, b = ([{k: r[k] for k in keys} for r in read_metrics(tmp_path / run / "metrics.jsonl")] for run in "ab")
    assert len(a) == 6 and a == b
    sa, sb = _state(tmp_path / "a" / "final"), _state(tmp_path / "b" / "final")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Activation checkpointing recomputes the same fp32 arithmetic: the same run, bit for bit.
    main(common + ["--out", str(tmp_path / "c"), "--checkpointing"])
    c = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "c" / "metrics.jsonl")]
    assert c == a
    with pytest.raises(SystemExit):  # the trajectory settings are checked on resume
        main(common[:-8] + ["--out", str(tmp_path / "b"), "--resume", "--steps", "6", "--batch-size", "2",
                            "--lr", "3e-3", "--quiet"])


def test_kill_during_a_save_leaves_the_last_checkpoint_and_resume_finishes(tmp_path):
    """kill -9 while a checkpoint is being written (its step-N.partial directory exists): the
    previous checkpoint is complete and loadable, and --resume carries the run to its end with the
    same losses as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from gemma3.train import checkpoint

    model_dir = tiny_model_dir(tmp_path / "base")
    common = ["finetune", "--model", str(model_dir), *_write_data(tmp_path), "--seq-len", "48", "--steps", "60",
              "--batch-size", "4", "--micro-batch", "2", "--lr", "3e-3", "--quiet", "--threads", "1"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gemma3", *common, "--out", str(out), "--save-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, killed_in = out / "checkpoints", None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        partial = [p for p in root.glob("*.partial")] if (root / "latest").exists() else []
        if partial:
            os.kill(proc.pid, signal.SIGKILL)
            killed_in = partial[0].name
            break
    proc.wait()
    assert killed_in is not None, f"no save was caught in progress: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    last = checkpoint.latest(out)
    assert last is not None and last.name < killed_in  # the save in flight never became `latest`
    state = checkpoint.load_trainer_state(last)
    assert f"step-{state['step']:08d}" == last.name
    assert load(last)[0] is not None  # the model files load
    main(common + ["--out", str(out), "--resume"])
    assert not list(root.glob("*.partial"))
    main(common + ["--out", str(tmp_path / "whole")])
    keys = ("step", "loss")
    a, b = ([{k: r[k] for k in keys} for r in read_metrics(d / "metrics.jsonl")] for d in (out, tmp_path / "whole"))
    assert a == b and len(a) == 60


# ---------------------------------------------------------------- commands


def test_distill_precompute_store_and_on_the_fly(tmp_path):
    teacher = tiny_model_dir(tmp_path / "teacher", layers=6, hidden=64)
    data = _write_data(tmp_path)
    (tmp_path / "student.json").write_text(json.dumps({
        "hidden_size": 32, "num_layers": 6, "local_per_global": 5, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "intermediate_size": 64, "sliding_window": 16, "max_context": 4096}))
    store = tmp_path / "targets"
    main(["distill", "precompute", "--teacher", str(teacher), *data, "--seq-len", "48", "--out", str(store),
          "--k", "32", "--quiet"])
    meta = json.loads((store / "meta.json").read_text())
    assert meta["k"] == 32 and 1 < meta["ids_per_target_token"] <= 32
    train = ["--student", str(tmp_path / "student.json"), *data, "--seq-len", "48", "--steps", "3",
             "--batch-size", "2", "--quiet", "--eval-data", str(tmp_path / "data.txt")]
    main(["distill", "--targets", str(store), "--out", str(tmp_path / "s1"), "--onehot-weight", "0.2", *train])
    main(["distill", "--teacher", str(teacher), "--k", "32", "--out", str(tmp_path / "s2"), *train])
    for run in ("s1", "s2"):
        student, tok = load(tmp_path / run / "final")
        assert student.config.num_layers == 6 and student.config.layer_types[5] == "global"
        assert tok.vocab_size == 263
        assert "eval_loss" in read_metrics(tmp_path / run / "metrics.jsonl")[-1]
    assert (tmp_path / "s1" / "loss.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # a store made for other packing is refused
        main(["distill", "--targets", str(store), "--out", str(tmp_path / "s3"), *train[:-8], "--seq-len", "32"])


def test_bf16_autocast_trains(tmp_path):
    main(["finetune", "--model", str(tiny_model_dir(tmp_path / "base")), *_write_data(tmp_path), "--seq-len", "48",
          "--steps", "4", "--batch-size", "2", "--lr", "3e-3", "--bf16", "--out", str(tmp_path / "run"), "--quiet"])
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert _state(tmp_path / "run" / "final")["model.norm.weight"].dtype == torch.float32  # master weights


def test_lora_finetune_saves_adapter_and_merges(tmp_path):
    base = tiny_model_dir(tmp_path / "base")
    main(["finetune", "--model", str(base), *_write_data(tmp_path), "--seq-len", "48", "--steps", "3",
          "--batch-size", "2", "--lr", "1e-2", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,down_proj",
          "--out", str(tmp_path / "run"), "--quiet"])
    adapter = tmp_path / "run" / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    main(["finetune", "merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    merged, _ = load(tmp_path / "merged")
    adapted, _ = load(base)
    lora.load_adapter(adapted, adapter)
    ids = torch.randint(0, 263, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids), load(base)[0](ids))


def test_qat_trains_latent_weights_towards_the_float_model(tmp_path):
    base = tiny_model_dir(tmp_path / "base", hidden=64, head_dim=32)
    main(["qat", "--model", str(base), "--format", "int4-channel", *_write_data(tmp_path), "--seq-len", "48",
          "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--out", str(tmp_path / "run"), "--quiet"])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["loss"] > 0  # KL of the fake-quantized model to the float one
    trained, _ = load(tmp_path / "run" / "final")  # latent weights under the plain names
    assert trained.config == load(base)[0].config
    # Exported with `gemma3 quantize`'s recipe: the real int4 weights are the ones QAT trained through.
    from gemma3.quant.apply import quantize_model
    from gemma3.train.qat import recipe_for

    exported, _ = load(tmp_path / "run" / "quantized")
    reference = quantize_model(trained, recipe_for("int4-channel"))
    ids = torch.randint(0, 263, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), reference(ids))


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_qat_trains_the_embedding_only_with_train_embeddings(tmp_path, train_embeddings):
    base = tiny_model_dir(tmp_path / "base", hidden=64, head_dim=32)
    main(["qat", "--model", str(base), *_write_data(tmp_path), "--seq-len", "48", "--steps", "2",
          "--batch-size", "2", "--lr", "1e-2", "--out", str(tmp_path / "run"), "--quiet",
          *(["--train-embeddings"] if train_embeddings else [])])
    before, after = load(base)[0].state_dict(), load(tmp_path / "run" / "final")[0].state_dict()
    assert torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"]) is not train_embeddings
    assert not torch.equal(after["layers.0.mlp.up_proj.weight"], before["layers.0.mlp.up_proj.weight"])


def test_checkpoints_carry_the_real_tokenizer(tmp_path):
    """`Tokenizer.save` (tokenizer.model in every checkpoint) reads back as the same tokenizer."""
    from gemma3.formats.tokenizer import Tokenizer
    from gemma3.inference.load import load_tokenizer

    tok = load_tokenizer()
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in ["Hello world, how are you?", "  leading spaces\n\n\ttabs", "emoji 🤗 and 日本語",
                 "<start_of_turn>user\nHi<end_of_turn>\n"]:
        for special in (False, True):
            assert again.encode(text, parse_special=special) == tok.encode(text, parse_special=special)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (2, 1, 0, 262144)


def test_qat_exports_a_gguf_by_default(tmp_path):
    """A format with a GGUF type lands in OUT/quantized.gguf, which runs on the C++ kernels."""
    from gemma3.formats.gguf import read_gguf
    from gemma3.quant.apply import quantize_model
    from gemma3.train.qat import recipe_for

    base = tiny_model_dir(tmp_path / "base")
    main(["qat", "--model", str(base), *_write_data(tmp_path), "--seq-len", "48", "--steps", "2",
          "--batch-size", "2", "--out", str(tmp_path / "run"), "--quiet"])
    exported = tmp_path / "run" / "quantized.gguf"
    assert "Q4_0" in {t.ggml_type.name for t in read_gguf(exported).tensors.values()}
    reference = quantize_model(load(tmp_path / "run" / "final")[0], recipe_for("int4-block32"))
    ids = torch.randint(0, 263, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(load(exported)[0](ids), reference(ids))


def test_finetuned_adapter_unmerged_equals_merged_and_loads_by_directory(tmp_path, capsys):
    """`gemma3 finetune --lora-rank` writes an adapter: applied unmerged (`generate --adapter`, or
    `--model` on the adapter directory) it gives the merged model's logits and greedy text."""
    from gemma3.inference.load import load_adapter

    base = tiny_model_dir(tmp_path / "base")
    main(["finetune", "--model", str(base), *_write_data(tmp_path), "--seq-len", "48", "--steps", "3",
          "--batch-size", "2", "--lr", "1e-2", "--lora-rank", "4", "--out", str(tmp_path / "run"), "--quiet"])
    adapter = tmp_path / "run" / "final"
    main(["finetune", "merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    merged, _ = load(tmp_path / "merged")
    unmerged, _ = load(base)
    load_adapter(unmerged, adapter, default=True)
    by_dir, _ = load(adapter)  # the adapter names its base (finetune --model's path)
    ids = torch.randint(0, 263, (1, 30))
    with torch.no_grad():
        want = merged(ids)
        torch.testing.assert_close(unmerged(ids), want, rtol=0, atol=1e-3)
        torch.testing.assert_close(by_dir(ids), want, rtol=0, atol=1e-3)
        assert not torch.allclose(load(base)[0](ids), want, atol=1e-3)
    texts = []
    for extra in (["--model", str(tmp_path / "merged")], ["--model", str(base), "--adapter", str(adapter)],
                  ["--model", str(adapter)]):
        main(["generate", "It is a truth", "-n", "12", "--backend", "torch", "--json", *extra])
        texts.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert texts[0] == texts[1] == texts[2]
