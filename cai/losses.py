"""Losses and estimators for RL-CAI: preference-model loss, KL-shaped rewards, GAE, PPO, KL controllers.

Pure functions over tensors; shapes are in each docstring. Response-token tensors are (b, t) with a
right-padded mask (1s then 0s per row). Where a formula comes from a paper or post, the link is next to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Number = float | int


# --- preference model ------------------------------------------------------------------------------------


def soft_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor | Number) -> torch.Tensor:
    """Soft-label Bradley-Terry loss, mean over the batch. Shape: r_a, r_b, p (b,) (p may be a float) -> ().

    p is the probability that answer A is better. With p in {0, 1} this is the usual reward-model loss
    -log sigmoid(r_chosen - r_rejected); CAI trains on the feedback model's soft probabilities instead.
    d loss / d r_a (per row, before the mean) = sigmoid(r_a - r_b) - p.
    """
    # soft preference labels: Bai et al. 2022, "Constitutional AI", section 4.1 https://arxiv.org/abs/2212.08073
    p = torch.as_tensor(p, dtype=r_a.dtype, device=r_a.device)
    diff = r_a - r_b
    return -(p * F.logsigmoid(diff) + (1 - p) * F.logsigmoid(-diff)).mean()


def preference_probs_from_option_logprobs(logp_a, logp_b):
    """P(option A) = exp(la) / (exp(la) + exp(lb)), a softmax over the two options. Shape: floats or (n,).

    The feedback model's log-probs of "(A)" and "(B)" are tiny and do not sum to 1; normalizing over the two
    options gives the label. sigmoid(la - lb) is the same quantity without exp underflowing to 0/0.
    """
    if isinstance(logp_a, torch.Tensor) or isinstance(logp_b, torch.Tensor):
        return torch.sigmoid(torch.as_tensor(logp_a) - torch.as_tensor(logp_b))
    x = float(logp_a) - float(logp_b)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def debiased_soft_label(p_a_given_ab, p_a_given_ba):
    """P(answer A is better), averaged over both presentation orders. Shape: floats or (n,).

    p_a_given_ab: probability of option "(A)" when shown in order (A, B), i.e. answer A is labelled (A).
    p_a_given_ba: probability of option "(A)" when shown in order (B, A), i.e. answer B is labelled (A);
    so in that order P(answer A better) = 1 - p_a_given_ba. Averaging the two cancels position bias.
    """
    return (p_a_given_ab + (1 - p_a_given_ba)) / 2


def cot_clamp(p, lo: float = 0.4, hi: float = 0.6):
    """Clamp a preference probability into [lo, hi]. Shape: float or any tensor.

    Chain-of-thought labels are nearly always 0 or 1 (the model has already argued its answer), which makes
    over-confident targets; the CAI paper clamps them to 40-60% (Bai et al. 2022, section 4.1).
    """
    if isinstance(p, torch.Tensor):
        return p.clamp(lo, hi)
    return min(max(p, lo), hi)


# --- masked statistics -----------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1. Shape: x, mask (b, t) -> () or reduced along dim.

    An all-zero mask gives NaN (0/0), as in TRL: loud, and check_finite stops the run.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1. Shape: x, mask (b, t) -> ().

    Bessel's correction n / (n - 1) when unbiased (as in TRL); it needs at least two unmasked entries.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 unmasked entries, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with masked statistics. Shape: x, mask (b, t) -> (b, t).

    shift_mean=False adds the mean back (scale-only normalization, as TRL does for rewards). Masked
    positions do not enter the statistics and are set to 0 in the output, so padding never carries garbage.
    """
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --- log-probs and KL ------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position. Shape: logits (b, t, v), labels (b, t) -> (b, t).

    Gathering the label logit and subtracting logsumexp avoids materializing a second (b, t, v) tensor.
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. Shape: logits (b, t, v) -> (b, t).

    H = logsumexp(z) - sum softmax(z) * z, which stays finite when some probabilities underflow to 0.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs. Shape: (b, t) -> (b, t).

    k1 is unbiased but can be negative per token; k3 is unbiased and always >= 0; mse ("k2") is biased
    but low-variance; abs is a heuristic from TRL.
    """
    # k1 / k2 / k3 estimators http://joschu.net/blog/kl-approx.html
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff**2
    if kind == "k3":
        log_ratio = ref_logprobs - logprobs
        return (torch.exp(log_ratio) - 1) - log_ratio
    raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of k1, abs, mse, k3")


def rewards_with_kl(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL on response tokens, plus the sequence score at the last one.

    Shape: score (b,), logprobs, ref_logprobs, mask (b, t) -> rewards (b, t), kl (b, t) (0 where masked).
    The KL term keeps the policy near the SFT model; the preference-model score is one number per answer, so
    it arrives at the final token. A row with no response tokens gets no score.
    """
    # KL-shaped reward: Ziegler et al. 2019 https://arxiv.org/abs/1909.08593, Ouyang et al. 2022 (InstructGPT)
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, kind) * mask
    rewards = -beta * kl
    t = mask.shape[1]
    # the last index where mask == 1: position weights 1..t make the last unmasked one the largest
    positions = torch.arange(1, t + 1, device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(dim=1)
    has_tokens = (mask.sum(dim=1) > 0).to(rewards.dtype)
    bonus = (score.to(rewards.dtype) * has_tokens).unsqueeze(1)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus)
    return rewards, kl


# --- advantages ------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens. Shape: (b, t) each -> advantages, returns (b, t).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}, computed backwards.
    The episode ends at the last response token, so V and A beyond it count as 0; masked positions get 0
    advantage and 0 return. returns = advantages + values (the value-function target).
    """
    # GAE: Schulman et al. 2016 https://arxiv.org/abs/1506.02438, eq. 16
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    b, t = values.shape
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros(b, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(b, dtype=values.dtype, device=values.device)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, i]
        advantages[:, i] = next_adv
        next_value = values[:, i]
    returns = (advantages + values) * mask
    return advantages, returns


# --- PPO -------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss. Shape: (b, t) each -> loss (), clipfrac (), approx_kl ().

    Taking the max of the two negated objectives is the pessimistic bound: a ratio outside [1-eps, 1+eps]
    stops earning credit in the direction the advantage pushes it. clipfrac is the share of tokens where
    the clipped term was the active one.
    """
    # PPO-clip: Schulman et al. 2017 https://arxiv.org/abs/1707.06347, eq. 7
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    # approx_kl (k2) http://joschu.net/blog/kl-approx.html
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2). Shape: (b, t) -> (), ().

    Like the policy clip, the value head gets no credit for moving further than eps from its old
    prediction in one update. clipfrac is the share of tokens where the clipped error was larger.
    """
    # value clipping: OpenAI baselines ppo2, discussed in Engstrom et al. 2020 https://arxiv.org/abs/2005.12729
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clipfrac.detach()


# --- KL coefficient controllers --------------------------------------------------------------------------


class AdaptiveKLController:
    """Moves the KL coefficient so the measured KL tracks a target.

    Ziegler et al. 2019, section 2.2 https://arxiv.org/abs/1909.08593: the error is clipped to +-20% so one
    noisy batch cannot swing beta, and scaled by n_steps / horizon so beta changes slowly.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


# --- guards ----------------------------------------------------------------------------------------------


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return tensor unchanged, or raise FloatingPointError if it holds any NaN or inf.

    A NaN loss silently poisons every weight on the next step; stopping at once keeps the last checkpoint
    good and names the quantity that went bad.
    """
    t = torch.as_tensor(tensor)
    if not torch.isfinite(t).all():
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise FloatingPointError(f"{name} is not finite ({n_nan} NaN, {n_inf} inf of {t.numel()} values)")
    return tensor
