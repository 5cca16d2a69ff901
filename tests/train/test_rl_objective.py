"""GRPO / RLOO objectives: advantages, k3 KL, and parity with TRL's GRPOTrainer loss and gradients."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gemma3.train.rl import ObjectiveConfig, completion_logprobs, group_advantages, k3_kl, policy_loss
from tests.helpers.models import random_model, tiny_config


def test_rloo_baseline_is_the_mean_of_the_others():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4, ObjectiveConfig(advantage="rloo"))
    assert torch.allclose(adv[:4], torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that agrees teaches nothing


def test_grpo_advantages_are_group_standardised():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 7.0, 5.0, 7.0])
    adv = group_advantages(r, 4)
    for g in adv.reshape(2, 4):
        assert abs(float(g.mean())) < 1e-6 and abs(float(g.std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_k3_is_nonnegative_and_unbiased_for_the_kl():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(50), 0), torch.softmax(torch.randn(50), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = k3_kl(p.log()[samples], q.log()[samples]).mean()
    exact = (p * (p.log() - q.log())).sum()
    assert (k3_kl(p.log(), q.log()) >= 0).all() and abs(float(estimate - exact)) < 0.01


def _batch(seed=0, prompts=2, group=3, prompt_len=5, completion_len=6, vocab=257):
    """Fixed prompts (equal length), right-padded completions of different lengths, rewards."""
    g = torch.Generator().manual_seed(seed)
    b = prompts * group
    prompt_ids = torch.randint(0, vocab, (prompts, prompt_len), generator=g).repeat_interleave(group, 0)
    completion_ids = torch.randint(0, vocab, (b, completion_len), generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 6, 4])[:b]
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])[:b]
    return prompt_ids, completion_ids, completion_mask, rewards


def _ours(model, batch, cfg, old_shift, ref_shift):
    prompt_ids, completion_ids, completion_mask, rewards = batch
    seqs = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1)
    logp = completion_logprobs(model, seqs, mask)
    old = (logp + old_shift * mask).detach()
    ref = (logp + ref_shift * mask).detach()
    adv = group_advantages(rewards, 3, cfg)
    loss, _ = policy_loss(logp, adv, mask, cfg, old_logp=old, ref_logp=ref)
    return loss, logp[:, prompt_ids.shape[1]:], adv


def _trl_loss(model, batch, cfg, per_token_logps, old, ref, advantages, loss_type):
    """TRL's GRPOTrainer._compute_loss itself, on a stand-in trainer whose log-prob hook returns
    our model's per-token log-probabilities (TRL would compute them with an HF model)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is not installed (the `test` extra)")
    prompt_ids, completion_ids, completion_mask, _ = batch
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                                  sync_gradients=True, num_processes=1)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=cfg.beta, loss_type=loss_type, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), accelerator=accelerator,
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref}
    return trl_grpo.GRPOTrainer._compute_loss(trainer, model, inputs)


@pytest.mark.parametrize("normalise,loss_type", [("sequence", "grpo"), ("token", "bnpo")])
def test_loss_and_gradients_equal_trl_grpo(normalise, loss_type):
    cfg = ObjectiveConfig(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, normalise=normalise)
    model = random_model(tiny_config(layers=2, local_per_global=1), seed=1).train()
    batch = _batch()
    # Old and reference log-probs a little off the current ones, so that ratios clip (both sides) and KL ≠ 0.
    g = torch.Generator().manual_seed(7)
    old_shift = torch.randn(batch[1].shape[0], batch[1].shape[1] + 5, generator=g) * 0.3
    ref_shift = torch.randn(old_shift.shape, generator=g) * 0.3
    params = [p for p in model.parameters()]

    ours, per_token, adv = _ours(model, batch, cfg, old_shift, ref_shift)
    ours_grads = torch.autograd.grad(ours, params, allow_unused=True)

    completion_mask = batch[2]
    shift_c = old_shift[:, 5:] * completion_mask, ref_shift[:, 5:] * completion_mask
    _, per_token, _ = _ours(model, batch, cfg, old_shift, ref_shift)  # a fresh graph for TRL's loss
    old, ref = (per_token + shift_c[0]).detach(), (per_token + shift_c[1]).detach()
    theirs = _trl_loss(model, batch, cfg, per_token, old, ref, adv, loss_type)
    theirs_grads = torch.autograd.grad(theirs, params, allow_unused=True)

    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
    ratio = torch.exp(per_token - old)
    assert ((ratio < 0.8) & (completion_mask > 0)).any() and ((ratio > 1.28) & (completion_mask > 0)).any()
    n = 0
    for a, b in zip(ours_grads, theirs_grads):
        if a is None:
            assert b is None
            continue
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        n += int(a.abs().sum() > 0)
    assert n > 5  # gradients reach most of the model


def test_trl_advantages_match_ours():
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed (the `test` extra)")
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.2, 0.9, 0.3])
    mean = r.view(-1, 3).mean(1).repeat_interleave(3)
    std = trl_utils.nanstd(r.view(-1, 3), dim=1).repeat_interleave(3)
    assert torch.allclose(group_advantages(r, 3), (r - mean) / (std + 1e-4), atol=1e-6)


def test_completion_logprobs_match_a_full_forward():
    model = random_model(tiny_config(layers=2, local_per_global=1), seed=2)
    prompt_ids, completion_ids, completion_mask, _ = _batch()
    seqs = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        logp = completion_logprobs(model, seqs, mask)
        full = torch.log_softmax(model(seqs).float(), -1)
    for b in range(seqs.shape[0]):
        for t in range(seqs.shape[1]):
            want = float(full[b, t - 1, seqs[b, t]]) if mask[b, t] else 0.0
            assert abs(float(logp[b, t]) - want) < 1e-5
