"""QAT's frozen embedding: read exactly as the export holds it, through the sliced head loss, with
the teacher sharing its float table."""

import pytest
import torch

from gemma3.quant.formats import fake_quant
from gemma3.train.losses import DenseTarget, TiedHeadLoss, head_cross_entropy
from gemma3.train.qat import FrozenEmbedding, apply_fake_quant, recipe_for, teacher_of
from tests.helpers.models import random_model, tiny_config


@pytest.mark.parametrize("fmt", ["int4-block32", "int4-channel", "sfp8"])
def test_frozen_embedding_reads_the_fake_quantized_table(fmt):
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    table = fake_quant(weight, fmt)
    emb = FrozenEmbedding(weight, fmt)
    emb.rows_per_slice = 64  # 5 slices, the last one short
    ids = torch.tensor([[0, 299, 64], [5, 5, 128]])
    assert torch.equal(emb(ids), table[ids])
    hidden = torch.randn(3, 64)
    torch.testing.assert_close(emb.attend(hidden), hidden @ table.T)
    assert torch.equal(emb.weight, weight) and not emb.weight.requires_grad
    assert set(emb.state_dict()) == {"weight"}  # a checkpoint holds the latent table only


def test_sliced_head_loss_matches_the_tensor_head():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 64, generator=g)
    emb = FrozenEmbedding(weight, "int4-block32")
    emb.rows_per_slice = 64
    mask = (torch.rand(37, generator=g) > 0.2).float()
    target = DenseTarget(torch.randn(37, 64, generator=g), weight, mask, 1.5)
    hidden = torch.randn(37, 64, generator=g)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    sliced = head_cross_entropy(h1, emb, target, chunk=16)
    dense = head_cross_entropy(h2, fake_quant(weight, "int4-block32"), target, chunk=16)
    sliced.backward()
    dense.backward()
    torch.testing.assert_close(sliced, dense)
    torch.testing.assert_close(h1.grad, h2.grad)


def test_frozen_embedding_model_and_teacher_share_one_table():
    model = random_model(tiny_config(vocab=263))
    reference = random_model(tiny_config(vocab=263))
    teacher = teacher_of(model, share_embedding=True)
    recipe = recipe_for("int4-block32")
    apply_fake_quant(model, recipe, train_embeddings=False)
    apply_fake_quant(reference, recipe)  # the embedding fake-quantized as a trained one would be
    assert model.embed_tokens.weight.data_ptr() == teacher.embed_tokens.weight.data_ptr()
    assert teacher.layers[0].mlp.up_proj.weight.data_ptr() != model.layers[0].mlp.up_proj.weight.data_ptr()
    assert [n for n, p in model.named_parameters() if p.requires_grad and "embed" in n] == []
    # The same model read through the frozen path and through the parametrization: the same loss.
    ids = torch.randint(0, 263, (2, 20))
    target = DenseTarget(teacher.hidden_states(ids).reshape(40, -1).detach(), teacher.embed_tokens.weight.detach(),
                         torch.ones(40))
    with torch.no_grad():
        torch.testing.assert_close(TiedHeadLoss(model)(ids, target), TiedHeadLoss(reference)(ids, target))


def test_teacher_from_a_gguf_reads_its_blocks_exactly(tmp_path):
    """The teacher's projections decoded from the GGUF at each call equal the loaded float model's."""
    from gemma3.formats.checkpoint import read_gguf_model
    from gemma3.inference.convert import convert
    from gemma3.inference.load import load
    from gemma3.train.qat import DecodingLinear
    from tests.helpers.training import tiny_model_dir

    gguf = tmp_path / "tiny.gguf"
    convert(tiny_model_dir(tmp_path / "base", hidden=64, head_dim=32), recipe_for("q8_0"), gguf)
    model = load(gguf)[0]
    teacher = teacher_of(model, share_embedding=True, source=read_gguf_model(gguf)[2])
    assert isinstance(teacher.layers[0].mlp.down_proj, DecodingLinear)
    assert [n for n, _ in teacher.named_parameters() if "proj" in n] == []  # no float copy of a projection
    ids = torch.randint(0, 263, (2, 20))
    with torch.no_grad():
        assert torch.equal(teacher.hidden_states(ids), model.hidden_states(ids))
