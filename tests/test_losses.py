"""cai.losses against numbers worked by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from cai.losses import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
    cot_clamp,
    debiased_soft_label,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    preference_probs_from_option_logprobs,
    rewards_with_kl,
    soft_bt_loss,
)


def T(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# --- preference model ---


def test_soft_bt_loss_hard_labels():
    # d = 1 - 0 = 1. -logsigmoid(1) = log(1 + e^-1) = log(1.367879) = 0.313262
    # p = 0 -> -logsigmoid(-1) = log(1 + e) = log(3.718282) = 1.313262
    r_a, r_b = T(1.0), T(0.0)
    close(soft_bt_loss(r_a, r_b, 1.0), 0.313262)
    close(soft_bt_loss(r_a, r_b, 0.0), 1.313262)
    # batch mean of the two rows: (0.313262 + 1.313262) / 2
    close(soft_bt_loss(T(1.0, 1.0), T(0.0, 0.0), T(1.0, 0.0)), 0.813262)


def test_soft_bt_loss_half_is_symmetric():
    # p = 0.5: 0.5 * 0.313262 + 0.5 * 1.313262 = 0.813262, whichever answer is called A
    close(soft_bt_loss(T(1.0), T(0.0), 0.5), 0.813262)
    close(soft_bt_loss(T(0.0), T(1.0), 0.5), 0.813262)


def test_soft_bt_loss_gradient_sign():
    # per row d loss/d r_a = sigmoid(d) - p, then / b = 2 for the mean.
    # row 0: d = 0, p = 1    -> (0.5 - 1) / 2         = -0.25   (descent raises r_a: A is preferred)
    # row 1: d = 2, p = 0.25 -> (0.880797 - 0.25) / 2 =  0.315399
    r_a = T(0.0, 2.0).requires_grad_()
    r_b = T(0.0, 0.0).requires_grad_()
    soft_bt_loss(r_a, r_b, T(1.0, 0.25)).backward()
    close(r_a.grad, [-0.25, 0.315399])
    close(r_b.grad, [0.25, -0.315399])


def test_preference_probs_from_option_logprobs():
    # exp(la) = 0.6, exp(lb) = 0.2 -> 0.6 / 0.8 = 0.75
    assert preference_probs_from_option_logprobs(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert preference_probs_from_option_logprobs(math.log(0.2), math.log(0.6)) == pytest.approx(0.25)
    # exp(-1000) underflows to 0; the ratio is still e^-1000 / (e^-1000 + e^-1001) = sigmoid(1) = 0.731059
    assert preference_probs_from_option_logprobs(-1000.0, -1001.0) == pytest.approx(0.731059, abs=1e-6)
    assert preference_probs_from_option_logprobs(-1001.0, -1000.0) == pytest.approx(0.268941, abs=1e-6)
    close(preference_probs_from_option_logprobs(T(-1000.0, math.log(0.6)), T(-1001.0, math.log(0.2))),
          [0.731059, 0.75])


def test_debiased_soft_label():
    # first order P("(A)") = 0.8; swapped order P("(A)") = 0.3 means P(answer A) = 0.7 there; mean 0.75
    assert debiased_soft_label(0.8, 0.3) == pytest.approx(0.75)
    # a model that always says "(A)" (pure position bias) gets 0.5: (1.0 + 0.0) / 2
    assert debiased_soft_label(1.0, 1.0) == pytest.approx(0.5)
    close(debiased_soft_label(T(0.8, 1.0), T(0.3, 1.0)), [0.75, 0.5])


def test_cot_clamp():
    assert cot_clamp(0.9) == 0.6
    assert cot_clamp(0.1) == 0.4
    assert cot_clamp(0.55) == 0.55
    assert cot_clamp(1.0, lo=0.3, hi=0.7) == 0.7
    close(cot_clamp(T(0.0, 0.45, 1.0)), [0.4, 0.45, 0.6])


# --- masked statistics ---


def test_masked_mean():
    # unmasked 1, 2, 3 -> 2; the 100 is ignored. Per row: (1+2)/2 = 1.5, 3/1 = 3
    x, mask = T([1.0, 2.0], [3.0, 100.0]), T([1, 1], [1, 0])
    close(masked_mean(x, mask), 2.0)
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    close(masked_mean(x, mask.bool()), 2.0)


def test_masked_var():
    # 1, 2, 3 about mean 2: squares 1, 0, 1 -> biased 2/3, unbiased 2/2 = 1
    x, mask = T([1.0, 2.0, 3.0, 100.0]), T([1, 1, 1, 0])
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    close(masked_var(x, mask), 1.0)
    with pytest.raises(ValueError):
        masked_var(x, T([1, 0, 0, 0]))


def test_masked_whiten():
    # 2, 4, 6: mean 4, unbiased var (4+0+4)/2 = 4, std 2 -> -1, 0, 1; masked 1000 ignored and zeroed
    x, mask = T([2.0, 4.0, 6.0, 1000.0]), T([1, 1, 1, 0])
    w = masked_whiten(x, mask)
    close(w, [[-1.0, 0.0, 1.0, 0.0]], atol=1e-5)
    close(masked_mean(w, mask), 0.0, atol=1e-6)
    close(masked_var(w, mask), 1.0, atol=1e-6)
    # shift_mean=False adds the mean 4 back: 3, 4, 5
    close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], atol=1e-5)


# --- log-probs and KL ---


def test_logprobs_and_entropy_from_logits():
    # position 0: logits (0, ln 3) -> probs (1/4, 3/4); position 1: (0, 0) -> (1/2, 1/2)
    logits = T([[0.0, math.log(3)], [0.0, 0.0]])
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.5)]])
    # H0 = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335; H1 = ln 2 = 0.693147
    close(entropy_from_logits(logits), [[0.562335, 0.693147]])


def test_kl_penalty_kinds():
    # lp - ref = (0.5, -0.5)
    lp, ref = T([0.0, -1.0]), T([-0.5, -0.5])
    close(kl_penalty(lp, ref, "k1"), [[0.5, -0.5]])
    close(kl_penalty(lp, ref, "abs"), [[0.5, 0.5]])
    close(kl_penalty(lp, ref, "mse"), [[0.125, 0.125]])
    # ref - lp = (-0.5, 0.5): e^-0.5 - 1 + 0.5 = 0.106531; e^0.5 - 1 - 0.5 = 0.148721
    close(kl_penalty(lp, ref, "k3"), [[0.106531, 0.148721]])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k2")


def test_rewards_with_kl_score_at_last_response_token():
    # k1 kl = lp - ref = [[0.5, -1, 0], [1, 0, (-4 masked -> 0)], [masked row]]; beta = 0.1 -> -0.1 * kl
    # score 10 at index 2 of row 0, 20 at index 1 of row 1, row 2 has no response tokens -> no score
    lp = T([-1.0, -2.0, -1.0], [-1.0, -1.0, -5.0], [-1.0, -1.0, -1.0])
    ref = T([-1.5, -1.0, -1.0], [-2.0, -1.0, -1.0], [-3.0, -3.0, -3.0])
    mask = T([1, 1, 1], [1, 1, 0], [0, 0, 0])
    rewards, kl = rewards_with_kl(T(10.0, 20.0, 30.0), lp, ref, mask, beta=0.1)
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 10.0], [-0.1, 20.0, 0.0], [0.0, 0.0, 0.0]])


def test_rewards_with_kl_other_kind():
    # k3 with ref - lp = -0.5 at one token: 0.106531 -> reward -1 * 0.106531 + score 2
    rewards, kl = rewards_with_kl(T(2.0), T([0.0]), T([-0.5]), T([1]), beta=1.0, kind="k3")
    close(kl, [[0.106531]])
    close(rewards, [[2.0 - 0.106531]])


# --- GAE ---


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # rewards 1, 2, 3 -> reward-to-go 6, 5, 3; minus values 0.5, 1, 1.5 -> 5.5, 4, 1.5
    adv, ret = gae(T([1.0, 2.0, 3.0]), T([0.5, 1.0, 1.5]), T([1, 1, 1]), gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.0, 1.5]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_gae_half_discount():
    # rewards (1, 0, 2), values (1, 2, 1), gamma = lam = 0.5 (gamma * lam = 0.25), V after the end = 0
    # t2: delta = 2 + 0.5*0 - 1 = 1;       A2 = 1
    # t1: delta = 0 + 0.5*1 - 2 = -1.5;    A1 = -1.5 + 0.25*1 = -1.25
    # t0: delta = 1 + 0.5*2 - 1 = 1;       A0 = 1 + 0.25*(-1.25) = 0.6875
    # returns = A + V = 1.6875, 0.75, 2
    adv, ret = gae(T([1.0, 0.0, 2.0]), T([1.0, 2.0, 1.0]), T([1, 1, 1]), gamma=0.5, lam=0.5)
    close(adv, [[0.6875, -1.25, 1.0]])
    close(ret, [[1.6875, 0.75, 2.0]])


def test_gae_masked_rows():
    # row 1 ends after 2 tokens: the padded reward 7 and value 100 must not leak in.
    # A1 = 2 + 0 - 1 = 1; A0 = (1 + 1 - 0.5) + 1 = 2.5 (= reward-to-go 3 - 0.5); padding -> 0
    # row 0 is the full 1x3 example above and must be unaffected by row 1
    rewards = T([1.0, 2.0, 3.0], [1.0, 2.0, 7.0])
    values = T([0.5, 1.0, 1.5], [0.5, 1.0, 100.0])
    adv, ret = gae(rewards, values, T([1, 1, 1], [1, 1, 0]), gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.0, 1.5], [2.5, 1.0, 0.0]])
    close(ret, [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])


# --- PPO ---

LN2 = math.log(2)


def test_ppo_policy_loss_ratio_above_range():
    # ratio = e^ln2 = 2, eps = 0.2 -> clipped 1.2; approx_kl = 0.5 * ln2^2 = 0.240227
    # A = +1: -A*r = -2, -A*clip = -1.2 -> max -1.2, the clip is active (clipfrac 1)
    loss, clipfrac, approx_kl = ppo_policy_loss(T([LN2]), T([0.0]), T([1.0]), T([1]), 0.2)
    close(loss, -1.2)
    close(clipfrac, 1.0)
    close(approx_kl, 0.240227)
    # A = -1: 2 vs 1.2 -> max 2, unclipped term wins (clipfrac 0)
    loss, clipfrac, _ = ppo_policy_loss(T([LN2]), T([0.0]), T([-1.0]), T([1]), 0.2)
    close(loss, 2.0)
    close(clipfrac, 0.0)


def test_ppo_policy_loss_ratio_below_range_and_mask():
    # ratio = 0.5 -> clipped 0.8. A = -1: 0.5 vs 0.8 -> 0.8, clipped (1). A = +1: -0.5 vs -0.8 -> -0.5 (0)
    # third token masked (huge values ignored). mean loss (0.8 - 0.5)/2 = 0.15, clipfrac 1/2
    lp, old = T([-LN2, -LN2, 50.0]), T([0.0, 0.0, 0.0])
    loss, clipfrac, approx_kl = ppo_policy_loss(lp, old, T([-1.0, 1.0, 1e6]), T([1, 1, 0]), 0.2)
    close(loss, 0.15)
    close(clipfrac, 0.5)
    close(approx_kl, 0.240227)


def test_ppo_policy_loss_inside_range_and_gradient():
    # ratio 1 (lp = old): loss = -mean(A) = -(2 + -1)/2 = -0.5; clipfrac 0
    # d loss / d lp = -A * ratio / n = (-1, 0.5)
    lp = T([0.0, 0.0]).requires_grad_()
    loss, clipfrac, approx_kl = ppo_policy_loss(lp, T([0.0, 0.0]), T([2.0, -1.0]), T([1, 1]), 0.2)
    loss.backward()
    close(loss, -0.5)
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)
    close(lp.grad, [[-1.0, 0.5]])


def test_ppo_value_loss_clipping():
    # old = 1, eps = 0.2, return R = 2
    # v = 2:   clip -> 1.2; (2-2)^2 = 0,   (1.2-2)^2 = 0.64 -> 0.64, clipped term active
    # v = 1.1: inside;      both 0.81                       -> 0.81
    # v = 0:   clip -> 0.8; (0-2)^2 = 4,   (0.8-2)^2 = 1.44 -> 4
    # 0.5 * mean(0.64, 0.81, 4) = 0.5 * 5.45 / 3 = 0.908333; clipfrac 1/3; 4th token masked
    values = T([2.0, 1.1, 0.0, 99.0])
    old, ret = T([1.0, 1.0, 1.0, 0.0]), T([2.0, 2.0, 2.0, 0.0])
    loss, clipfrac = ppo_value_loss(values, old, ret, T([1, 1, 1, 0]), 0.2)
    close(loss, 0.908333)
    close(clipfrac, 1 / 3)
    # the first token alone: 0.5 * 0.64 = 0.32
    loss, clipfrac = ppo_value_loss(T([2.0]), T([1.0]), T([2.0]), T([1]), 0.2)
    close(loss, 0.32)
    close(clipfrac, 1.0)


# --- KL controllers ---


def test_adaptive_kl_controller():
    # target 6, horizon 10000, n_steps 1000 -> mult = 1 + err * 0.1
    # kl 9:   9/6 - 1 = 0.5 clipped to 0.2   -> 0.1 * 1.02 = 0.102
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, n_steps=1000)
    assert c.value == pytest.approx(0.102)
    # kl 6.6: 0.1 (inside the clip)            -> 0.1 * 1.01 = 0.101
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.6, n_steps=1000)
    assert c.value == pytest.approx(0.101)
    # kl 5.4: -0.1                             -> 0.1 * 0.99 = 0.099
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(5.4, n_steps=1000)
    assert c.value == pytest.approx(0.099)
    # kl 0: -1 clipped to -0.2                 -> 0.1 * 0.98 = 0.098, then again 0.098 * 0.98 = 0.09604
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(0.0, n_steps=1000)
    assert c.value == pytest.approx(0.098)
    c.update(0.0, n_steps=1000)
    assert c.value == pytest.approx(0.09604)


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, n_steps=1000)
    assert c.value == 0.05


# --- guards ---


def test_check_finite():
    x = T(1.0, 2.0)
    assert check_finite("loss", x) is x
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(FloatingPointError, match="policy_loss is not finite"):
            check_finite("policy_loss", T(1.0, bad))
