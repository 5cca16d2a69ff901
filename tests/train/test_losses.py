"""The fused head loss against autograd references, and the sampled-target estimator."""

import math

import pytest
import torch

from gemma3.train.distill import sample_sparse_targets
from gemma3.train.losses import DenseTarget, SparseTarget, head_cross_entropy


def _reference_sparse(hidden, weight, ids, w):
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    return -(w * logp.gather(1, ids)).sum()


def _leaves(n=37, d=12, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_()
    return g, hidden, weight


def test_sparse_loss_and_gradients_match_autograd():
    g, hidden, weight = _leaves()
    ids = torch.randint(0, 50, (37, 9), generator=g)
    w = torch.rand(37, 9, generator=g, dtype=torch.float64) * (torch.rand(37, 9, generator=g) > 0.3)
    ref = _reference_sparse(hidden, weight, ids, w)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    out = head_cross_entropy(hidden, weight, SparseTarget(ids, w), chunk=8)  # 5 chunks, last one short
    grads = torch.autograd.grad(out * 1.0, (hidden, weight))
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


def test_dense_target_is_kl_with_cross_entropy_gradients():
    g, hidden, weight = _leaves()
    t_hidden, t_weight = torch.randn(37, 7, generator=g), torch.randn(50, 7, generator=g)
    mask = (torch.rand(37, generator=g) > 0.2).float()
    p = torch.softmax(t_hidden @ t_weight.T / 2.0, dim=-1).double() * mask[:, None]
    logq = torch.log_softmax(hidden @ weight.T, dim=-1)
    kl = (p * (torch.log(p.clamp_min(1e-300)) - logq)).sum()
    ref_grads = torch.autograd.grad(kl, (hidden, weight))
    out = head_cross_entropy(hidden, weight, DenseTarget(t_hidden, t_weight, mask, 2.0), chunk=16)
    grads = torch.autograd.grad(out, (hidden, weight))
    assert out.item() == pytest.approx(kl.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


def test_sparse_target_over_every_id_equals_dense_cross_entropy():
    """When every id of a (tiny) vocabulary is in the sampled set, the sparse loss is the dense CE."""
    g, hidden, weight = _leaves(v=16)
    teacher_logits = torch.randn(37, 16, generator=g) * 0.5
    p = torch.softmax(teacher_logits.double(), dim=-1)
    dense = -(p * torch.log_softmax(hidden @ weight.T, dim=-1)).sum()
    explicit = head_cross_entropy(hidden, weight, SparseTarget(torch.arange(16).expand(37, 16), p))
    assert explicit.item() == pytest.approx(dense.item(), rel=1e-12)
    # The sampler in "renorm" mode: 4,096 draws over 16 ids of mass ≥ 1% each cover every id.
    ids, w = sample_sparse_targets(teacher_logits, k=4096, generator=g, mode="renorm")
    assert all(len(set(row.tolist())) == 16 for row in ids)
    sampled = head_cross_entropy(hidden, weight, SparseTarget(ids, w.double()))
    assert sampled.item() == pytest.approx(dense.item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_targets_are_unbiased(temperature):
    """E[w_j · 1{j ∈ S}] = p_j for every id: the mean of 20,000 independent sparse targets is p
    within 4.5 standard errors (the standard error from the estimator's exact variance
    p_j² (1 − π_j) / π_j). k = 8 draws leave most of the tail unsampled, where a biased weight shows."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 40, generator=g) * 2
    p = torch.softmax(logits.double(), -1)[0]
    r = torch.softmax(logits.double() / temperature, -1)[0]
    k, n = 8, 20_000
    ids, w = sample_sparse_targets(logits.expand(n, 40), k=k, temperature=temperature, generator=g,
                                   mode="unbiased")
    mean = torch.zeros(n, 40, dtype=torch.float64).scatter_add_(1, ids, w.double()).mean(0)
    inclusion = 1 - (1 - r) ** k
    stderr = torch.sqrt(p ** 2 * (1 - inclusion) / inclusion / n)
    z = ((mean - p) / stderr).abs()
    assert z.max() < 4.5, f"max z-score {z.max():.2f}"
    # The literal renormalisation is biased on the same draws: the tail is under-weighted.
    ids, w = sample_sparse_targets(logits.expand(n, 40), k=k, temperature=temperature, generator=g, mode="renorm")
    biased = torch.zeros(n, 40, dtype=torch.float64).scatter_add_(1, ids, w.double()).mean(0)
    assert ((biased - p) / stderr).abs().max() > 10


def test_unbiased_loss_estimate_matches_dense_loss():
    """The sparse loss averaged over draws estimates the dense distillation loss H(p, s)."""
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(1, 64, generator=g) * 3
    student = torch.randn(1, 64, generator=g)
    p = torch.softmax(teacher.double(), -1)
    dense = -(p * torch.log_softmax(student.double(), -1)).sum().item()
    n = 4000
    ids, w = sample_sparse_targets(teacher.expand(n, 64), k=16, generator=g, mode="unbiased")
    per_draw = -(w.double() * torch.log_softmax(student.double(), -1).expand(n, 64).gather(1, ids)).sum(-1)
    assert abs(per_draw.mean().item() - dense) < 4.5 * per_draw.std().item() / math.sqrt(n)
