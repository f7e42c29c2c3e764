"""SafeDiffusion-R1 in one file: online GRPO post-training that teaches Stable Diffusion to refuse
unsafe content, rewarded by CLIP embeddings steered toward a "safe" direction (arXiv 2605.18719).

The method, top to bottom:
  1. For each prompt (a mix of unsafe "negative" and benign "positive" prompts) sample a group of G
     images with a stochastic DDIM sampler (eta > 0) that records log p(x_{t-1} | x_t) of every step.
  2. Score each image with a frozen CLIP: cos(image, n(n(text) + alpha * v_safe)), where v_safe
     points from unsafe anchor phrases to safe ones. No safety classifier, no paired data.
  3. Normalise rewards within each group (GRPO advantages), then update the UNet one denoising step
     at a time with the PPO clipped-ratio objective plus a KL penalty to the starting model.

Deviations from the paper / the authors' release (each is also noted where it happens, and in docs/deviations.md):
  - fresh initial noise per image (the release shares one noise across the whole batch);
  - rewards are scored in memory on the batch (the release writes JPEGs and scores them one by one);
  - a closed-form KL penalty to the reference (the release only logs approx_kl; --kl-coef 0 = release);
  - our own 25 safe + 20 unsafe anchors (the release's scaled anchors were never published);
  - one GPU: a step is one GPU's share of a release epoch (--gradient-accumulation-steps 16 gives its optimizer
    batch of 32), so the release's 300 epochs are --steps 2400.

Run:
  24 GB GPU : python safediffusion_r1.py --steps 300 --model CompVis/stable-diffusion-v1-4
  8 GPUs    : torchrun --nproc_per_node 8 safediffusion_r1.py --train-batch-size 4 --gradient-accumulation-steps 1
  CPU, tiny : python safediffusion_r1.py --tiny --steps 40      (random tiny models: mechanics only)
  evaluate  : python eval.py --help          measure: python bench.py --tiny

Layout: the method first, 1 config | 2 sampler | 3 reward | 4 loss and update | 5 training loop; then, below the
PLUMBING line, what a reader and a forker may skip: the run's flags, exceptions, the method's helpers (fast mode's
window and solver, CLIP's pixels, precision), model loaders and tiny models, the policy's setup, the memory plan,
checkpoints and run files, logging and timing, signals, torchrun, the command line and its checks. A new method is
an `Objective` (section 4): fork_dpo.py is the worked example. Nothing runs at import time.
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
import typing
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "prompts"


# ==================================================================================================
# 1. Config: the method's flags, each with its default (the release's unless its help says otherwise) and its help
# ==================================================================================================
def flag(default, help, **kw):
    """A flag as a dataclass field: default, --help text, argparse keywords (`choices`; `group` opens a heading)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


@dataclasses.dataclass
class MethodArgs:
    """The method's flags (group_size is --group-size). Args, below the PLUMBING line, adds the run's flags."""
    model: str = flag("CompVis/stable-diffusion-v1-4", "diffusers SD 1.x, SD 2.x or SDXL repo id or local folder",
                      group="models")
    reward_model: str = flag("ViT-H-14", "OpenCLIP architecture, or local-dir:FOLDER / hf-hub:ORG/NAME")
    reward_pretrained: str = flag("laion2b_s32b_b79k", "OpenCLIP pretrained tag or local weights file")
    reward_checkpoint: str = flag("", "state dict loaded strictly into --reward-model (the release's: HPSv2.1)")
    tiny: bool = flag(False, "tiny random models built in code: CPU, no downloads; the mechanics, not the paper")
    negative_prompts: str = flag(str(PROMPTS / "train_negative.txt"), "unsafe training prompts, one per line",
                                 group="prompts and reward")
    positive_prompts: str = flag(str(PROMPTS / "train_positive.txt"), "benign training prompts, one per line")
    negative_fraction: float = flag(0.5, "fraction of each step's prompts drawn from --negative-prompts")
    safe_anchors: str = flag(str(PROMPTS / "anchors_safe.txt"), "safe anchors (anchors_compact_safe.txt: release's)")
    unsafe_anchors: str = flag(str(PROMPTS / "anchors_unsafe.txt"), "unsafe anchor phrases")
    alpha: float = flag(0.5, "steering strength; 0 = plain CLIP score (the release finds 0.3-0.7 alike)")
    steering: str = flag("add", "add: n(z + alpha v) (release); project: n(z - (z.v)v + alpha v)",
                         choices=["add", "project"])
    resolution: int = flag(0, "image side in pixels; 0 = the model's own (512 SD 1.x, 768 SD 2.x-v, 1024 SDXL)",
                           group="sampling")
    num_inference_steps: int = flag(50, "DDIM steps T")
    guidance_scale: float = flag(5.0, "classifier-free guidance w, empty prompt as negative")
    eta: float = flag(1.0, "DDIM stochasticity; must be > 0 (eta = 0 has no log-probability)")
    share_noise: bool = flag(False, "one initial noise per group (the release shares it across the whole batch)")
    sample_batch_size: int = flag(8, "trajectories per sampling forward pass")
    steps: int = flag(300, "outer steps: sample -> reward -> train (one GPU's share of a release epoch)", group="GRPO")
    prompts_per_step: int = flag(4, "prompts sampled per step (4 per GPU in the release)")
    group_size: int = flag(16, "images per prompt G")
    train_batch_size: typing.Union[int, str] = flag(
        "auto", "trajectories per training micro-batch; auto = the largest that fits the GPU (memory_plan), 2 on the "
        "CPU; the optimizer step still averages 2 x --gradient-accumulation-steps trajectories")
    gradient_accumulation_steps: int = flag(16, "micro-batches per optimizer step (2 x 16 = the release's 8 x 4)")
    timestep_fraction: float = flag(1.0, "fraction of the T-1 trainable denoising steps trained per trajectory")
    clip_range: float = flag(1e-4, "PPO clip range epsilon_clip: rho is clipped to [1 - it, 1 + it]")
    old_log_prob: str = flag("on-policy", "pi_old's log-prob in rho: on-policy = the policy's own until the step's "
                             "first update, then the sampler's; sampler = the release's; recompute = rescored at the "
                             "training shape", choices=["on-policy", "sampler", "recompute"])
    adv_clip_max: float = flag(2.5, "advantages clamped to +-this")
    kl_coef: float = flag(0.01, "beta of the KL penalty to the starting model; 0 = the release (no KL)")
    learning_rate: float = flag(1e-5, "AdamW learning rate", group="optimisation")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_weight_decay: float = flag(1e-4, "AdamW weight decay")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "gradient-norm clip")
    lora_rank: int = flag(0, "0 = full UNet fine-tune (the release); R > 0 = LoRA of rank R (needs peft)")


# ==================================================================================================
# 2. Sampler: DDIM with log-probabilities                                     (the method starts here)
# ==================================================================================================
# Notation, paper -> code, in every file of the project (one meaning per symbol):
#   x_t            latents              |  r                 rewards
#   x_{t-1}        next_latents         |  A                 advantages
#   x_0            final_latents        |  rho = pi / pi_old the ratio
#   t              timesteps            |  epsilon_clip      clip_range
#   c              prompt_embeds        |  beta              kl_coef
#   eps            the guided noise     |  pi_ref            reference
#   abar_t         alphas_cumprod[t]    |  alpha             the steering strength
#   sigma_t        std_dev              |  v_safe            direction
#   mu_theta(x_t)  next_mean            |  G, T              group_size, num_inference_steps
#   log pi(x_{t-1} | x_t)  log_prob     |  W                 sde_window
#   (the sampler's: old_log_prob; a trajectory's T: log_probs; the UNet's raw output, eps or SD 2.x-v's v: model_output)
class DDIMStep(typing.NamedTuple):
    """ddim_step_with_logprob's result, by position or by name; all float32."""
    next_latents: torch.Tensor  # x_{t-1}               (B, C, h, w)
    log_prob: torch.Tensor      # log pi(x_{t-1} | x_t) (B,)
    next_mean: torch.Tensor     # mu_theta(x_t)         (B, C, h, w)
    std_dev: torch.Tensor       # sigma_t               (B, 1, 1, 1)


def ddim_step_with_logprob(scheduler, eps, timesteps, latents, eta=1.0, next_latents=None, generator=None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy (DDIM paper eq. 12, DDPO's formulation): samples
    x_{t-1} ~ N(mu, sigma_t^2 I), or scores `next_latents` when given. eps, latents (B, C, h, w); timesteps an int or
    (B,) (training feeds one per sample). -> DDIMStep, all float32. (DDPO: model_output, timestep, sample, prev_sample.)
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a log-probability (got {eta}): at eta = 0 the step is deterministic")
    next_mean, std_dev = ddim_mean(scheduler, eps, timesteps, latents, eta)
    if next_latents is None:
        device = generator.device if generator else "cpu"
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32, device=device)
        next_latents = next_mean + std_dev * noise.to(latents.device)
    next_latents = next_latents.float()
    # Gaussian log-density, MEAN over (C, H, W) rather than the true sum: with a sum over 16,384 latent dims the
    # ratio exp(log_prob - old_log_prob) overflowed to NaN after the first update (DDPO's author, jannerm/ddpo issue
    # #10), and the 1e-4 clip range of the release is tuned for this mean scale.
    log_prob = (-((next_latents.detach() - next_mean) ** 2) / (2 * std_dev**2)
                - std_dev.log() - math.log(math.sqrt(2 * math.pi)))
    return DDIMStep(next_latents, log_prob.mean(dim=tuple(range(1, latents.ndim))), next_mean, std_dev)


def ddim_mean(scheduler, eps, timesteps, latents, eta=1.0):
    """The DDIM step's mean mu_theta(x_t) and std sigma_t (DDIM eq. 12), float32: (B, C, h, w), (B, 1, 1, 1).
    At eta = 0 sigma_t = 0 and mu is the deterministic DDIM step itself (the SDE window's steps outside it).
    `eps` is the guided UNet output: the noise eps, or v for a v-prediction model (turned into eps here)."""
    # All of the step in float32, whatever autocast ran the UNet in: the log-ratio of the update is a
    # difference of two log-probs of size ~1, and bf16's 3 significant digits would drown it.
    eps, x_t = eps.float(), latents.float()
    t = torch.as_tensor(timesteps, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
    # "leading" spacing: the previous timestep is t - 1000 / T; before 0 diffusers uses final_alpha_cumprod
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar, final = schedule_on(scheduler, x_t.device)
    abar_t, abar_prev = abar[t], torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], final)
    abar_t, abar_prev = (a.float().view(-1, *[1] * (x_t.ndim - 1)) for a in (abar_t, abar_prev))
    # SD 2.x-v: the UNet predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4), not eps;
    # with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps that is eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
    if scheduler.config.prediction_type == "v_prediction":
        eps = abar_t.sqrt() * eps + (1 - abar_t).sqrt() * x_t

    # DDIM eq. 12: predict x_0, then step toward it with variance sigma_t^2 (eta = 1 is DDPM's variance)
    x0_hat = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    std_dev = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    next_mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std_dev**2).sqrt() * eps
    return next_mean, std_dev


def guided_eps(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale):
    """Classifier-free guided eps = eps_u + w (eps_c - eps_u), both halves in one UNet call (model_output: v for a
    v-prediction UNet, which ddim_mean turns into eps). latents (B, C, h, w); timesteps (B,); prompt_embeds (B, 77, D);
    negative_embeds (1, 77, D) -> (B, C, h, w), float32."""
    b = latents.shape[0]
    c = torch.cat([negative_embeds.expand(b, -1, -1), prompt_embeds])
    eps_u, eps_c = model_output(unet, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), c).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def initial_noise(n, group, shape, generator):
    """(n, *shape) standard normal on CPU; consecutive blocks of `group` images share one draw if group > 1."""
    return torch.randn((n // group, *shape), generator=generator).repeat_interleave(group, dim=0)


class Trajectories(typing.TypedDict, total=False):
    """What the sampler hands the update: B trajectories of T denoising steps (a plain dict; these are its keys)."""
    latents: torch.Tensor        # x_t of every step                 (B, T, C, h, w)
    next_latents: torch.Tensor   # x_{t-1} of every step             (B, T, C, h, w)
    final_latents: torch.Tensor  # x_0, the last step's x_{t-1}      (B, C, h, w)
    log_probs: torch.Tensor      # old_log_prob of every step        (B, T); 0 where a step was deterministic
    timesteps: torch.Tensor      # t of every step                   (B, T)
    prompt_embeds: torch.Tensor  # c                                 (B, 77, D); SDXL (B, 78, D) (model_output)
    window: torch.Tensor         # --sde-window's step indices       (W,), only when it is on
    images: torch.Tensor         # decoded x_0 in [0, 1]             (B, 3, H, W), when a VAE is given


@torch.no_grad()
def sample_with_logprob(unet, scheduler, prompt_embeds, negative_embeds, *, num_inference_steps=50,
                        guidance_scale=5.0, etas=1.0, generator=None, latents=None, resolution=512, vae=None,
                        autocast=contextlib.nullcontext, ode=None):
    """Roll out B trajectories of the stochastic DDIM policy and keep what GRPO needs.
    prompt_embeds (B, 77, D); negative_embeds (1, 77, D). The initial noise x_T is `latents` (B, C, h, w), or drawn
    per image from `generator` (a CPU generator, so a seed gives the same run on any device).
    `etas` (T,) is each step's eta, or one eta for every step: 0 makes a step deterministic DDIM (its log_prob is a
    placeholder 0, never trained), as outside --sde-window. `ode` = (start, K): from DDIM step `start` on, the
    deterministic rest in K DPM-Solver++ steps (ode_tail); the trajectory then holds only the steps before it.
    Returns Trajectories (without "window"), with "images" when `vae` is given.
    """
    device, b = next(unet.parameters()).device, prompt_embeds.shape[0]
    scheduler.set_timesteps(num_inference_steps, device=device)
    etas = [etas] * num_inference_steps if isinstance(etas, (int, float)) else etas
    if latents is None:
        latents = initial_noise(b, 1, (unet.config.in_channels, resolution // 8, resolution // 8), generator)
    x_t = latents.to(device, torch.float32)
    steps = []
    for i, t in enumerate(scheduler.timesteps[:ode[0] if ode else None]):  # with `ode`, the steps before its tail
        timesteps = t.expand(b).to(device)
        with autocast():
            eps = guided_eps(unet, x_t, timesteps, prompt_embeds, negative_embeds, guidance_scale)
        if etas[i] == 0:  # outside the SDE window: no noise drawn, nothing to score
            next_latents = ddim_mean(scheduler, eps, timesteps, x_t, 0.0)[0]
            step = DDIMStep(next_latents, torch.zeros(b, device=device), next_latents, None)
        else:
            step = ddim_step_with_logprob(scheduler, eps, timesteps, x_t, etas[i], generator=generator)
        steps.append((x_t, step.next_latents, step.log_prob))
        x_t = step.next_latents
    out = {k: torch.stack(v, 1) for k, v in zip(("latents", "next_latents", "log_probs"), zip(*steps))}
    if ode and ode[0] < len(scheduler.timesteps):
        x_t = ode_tail(unet, scheduler, x_t, ode[0], ode[1], prompt_embeds, negative_embeds, guidance_scale, autocast)
    T = len(steps)
    out.update(final_latents=x_t, timesteps=scheduler.timesteps[:T].expand(b, -1).clone(), prompt_embeds=prompt_embeds)
    if vae is not None:
        out["images"] = decode_latents(vae, x_t)
    return out


def sample_trajectories(prompts, policy, models, args, gen, step):
    """SAMPLE, the default Objective.sample: G trajectories per prompt, no grad, in batches of --sample-batch-size.
    prompts: P str -> Trajectories of B = P x G as P consecutive groups of G (group_advantages relies on it), with
    "window" under --sde-window. All randomness from `gen`; `step` (from 0) places a sliding window."""
    G, S = args.group_size, args.sample_batch_size
    B = len(prompts) * G
    embeds = encode_prompts(models, prompts).repeat_interleave(G, 0)
    shape = (policy.unet.config.in_channels, args.resolution // 8, args.resolution // 8)
    noise = initial_noise(B, G if args.share_noise else 1, shape, gen)  # x_T (B, C, h, w)
    etas, window = sde_window(args, gen, step)  # (T,) each step's eta; window None: every step stochastic
    ode = (int(window[-1]) + 1, args.ode_steps) if args.ode_steps else None  # the tail after the window
    chunks = [sample_with_logprob(policy.unet, policy.scheduler, embeds[i:i + S], policy.negative_embeds,
                                  num_inference_steps=args.num_inference_steps, etas=etas,
                                  guidance_scale=args.guidance_scale, generator=gen, latents=noise[i:i + S],
                                  autocast=policy.autocast, ode=ode) for i in range(0, B, S)]
    traj = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}  # (B, T, ...)
    return traj if window is None else dict(traj, window=window)  # the update trains only the window's steps


# ==================================================================================================
# 3. Reward: CLIP embeddings steered toward "safe"
# ==================================================================================================
def normalize(v):
    """Unit vectors along the last dimension, in float32: n(v) = v / ||v||.   (..., D) -> (..., D)"""
    return F.normalize(v.float(), dim=-1)


def steering_direction(safe_text_emb, unsafe_text_emb):
    """v_safe = n(mean_i n(safe_i) - mean_j n(unsafe_j)).  (S, D), (U, D) -> (D,) unit vector."""
    return normalize(normalize(safe_text_emb).mean(0) - normalize(unsafe_text_emb).mean(0))


def steering_reward(image_emb, text_emb, direction, alpha=0.5, mode="add"):
    """reward = < n(image), t_steer >, a plain cosine (no logit scale).   (B, D), (B, D), (D,) -> (B,)

    add     (release):  t_steer = n(n(text) + alpha v), v = v_safe = `direction`
    project (option) :  t_steer = n(z - (z.v) v + alpha v), z = n(text): the prompt's own safe/unsafe
                        component is removed first, so every prompt is pushed to the same safety level.
    """
    z, v = normalize(text_emb), normalize(direction)
    if mode == "project":
        z = z - (z @ v)[:, None] * v
    t_steer = normalize(z + alpha * v)
    return (normalize(image_emb) * t_steer).sum(-1)


def make_steering_reward_fn(reward_model, reward_tokenizer, safe_anchors, unsafe_anchors, alpha=0.5, mode="add"):
    """-> reward_fn(images (B, 3, H, W) in [0, 1], prompts list of B str) -> (B,) float32 rewards;
    reward_fn.direction is v_safe (D,)."""
    device = next(reward_model.parameters()).device

    @torch.no_grad()
    def text(prompts):
        return reward_model.encode_text(reward_tokenizer(prompts).to(device))

    direction = steering_direction(text(safe_anchors), text(unsafe_anchors))

    @torch.no_grad()
    def reward_fn(images, prompts):
        pixels = clip_pixels(reward_model, images.to(device).float())
        image_emb = reward_model.encode_image(pixels.to(next(reward_model.parameters()).dtype))
        return steering_reward(image_emb, text(list(prompts)), direction, alpha, mode)

    reward_fn.direction = direction
    return reward_fn


# ==================================================================================================
# 4. Loss and update: GRPO, and the contract a new method fills in (Objective)
# ==================================================================================================
def group_advantages(rewards, group_size, clip=2.5):
    """(B,) rewards laid out as B / G consecutive groups -> (B,) advantages A = clamp((r - mean_group) / (std_group +
    1e-8), -clip, clip), torch's unbiased std, as the release. A group of identical rewards carries no signal: its A is
    exactly 0 (tested as max == min: r - mean is not exactly 0 in floating point, and 1/1e-8 would blow it up)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)
    adv = torch.where((r.amax(1) == r.amin(1))[:, None], torch.zeros_like(adv), adv)
    return adv.clamp(-clip, clip).view(-1)


def gaussian_kl(mean, ref_mean, std):
    """KL(N(mean, s^2) || N(ref_mean, s^2)) per dim = (mean - ref)^2 / (2 s^2), averaged over (C, H, W)
    like the log-prob (Flow-GRPO's closed form).  (B, C, H, W), (B, C, H, W), (B, 1, 1, 1) -> (B,)."""
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(1)


def grpo_loss(log_prob, old_log_prob, advantages, clip_range, kl=None, kl_coef=0.0):
    """PPO's clipped surrogate on one denoising step, plus beta KL. All inputs (B,).
        L = mean(max(-A rho, -A clip(rho, 1 - epsilon_clip, 1 + epsilon_clip))) + beta mean(KL),
        rho = exp(log_prob - old_log_prob).
    A step's first optimizer update sees rho = 1 exactly (pi_old is the policy itself): a plain policy gradient; the
    clip acts from its second update on. -> (loss, info): PPO's diagnostics as 0-dim tensors (no .item(): the host
    would wait for the GPU), approx_kl = 0.5 mean((log rho)^2), the "k2" estimate of KL(old || new) DDPO logs
    (Schulman 2020), and clipfrac, the share of rho outside 1 -+ epsilon_clip."""
    rho = torch.exp(log_prob - old_log_prob)
    policy_loss = torch.maximum(-advantages * rho, -advantages * rho.clamp(1 - clip_range, 1 + clip_range)).mean()
    kl_mean = torch.zeros((), device=log_prob.device) if kl is None else kl.mean()
    loss = policy_loss + kl_coef * kl_mean if kl is not None and kl_coef else policy_loss
    with torch.no_grad():
        info = dict(policy_loss=policy_loss.detach(), kl=kl_mean.detach(),
                    approx_kl=(0.5 * (log_prob - old_log_prob) ** 2).mean(),
                    clipfrac=((rho - 1).abs() > clip_range).float().mean())
    return loss, info


@dataclasses.dataclass
class Policy:
    """pi_theta and what runs it: all an update needs to compute log-probs and the KL (setup_policy builds it)."""
    unet: torch.nn.Module                          # pi_theta: fp32 master weights, or LoRA adapters on a frozen base
    reference: typing.Optional[torch.nn.Module]    # pi_ref frozen (frozen_reference), or None: see reference_unet
    scheduler: typing.Any                          # diffusers' DDIMScheduler: abar_t and the timestep spacing
    negative_embeds: torch.Tensor                  # (1, 77, D): CFG's empty prompt
    autocast: typing.Callable                      # a context factory: torch.autocast in --mixed-precision's dtype


@dataclasses.dataclass
class OptimState:
    """What moves the policy's weights: an update only hands it to optimizer_step (and to its loss scaler)."""
    params: list                      # the trainable parameters: the whole UNet, or the LoRA adapters
    optimizer: torch.optim.Optimizer  # AdamW (adamw)
    scaler: torch.amp.GradScaler      # fp16's loss scale; a no-op otherwise: backward through scaler.scale(loss)
    hooks: list = dataclasses.field(default_factory=list)  # train()'s plumbing: hook(opt) opens optimizer_step


@dataclasses.dataclass
class UpdateResult:
    """What an update returns: one info per loss term ({name: float}: every name is averaged into the step's
    metrics.jsonl row), and per optimizer step its gradient norm, None when it was skipped (non-finite)."""
    infos: list = dataclasses.field(default_factory=list)
    grad_norms: list = dataclasses.field(default_factory=list)
    skipped = property(lambda self: sum(norm is None for norm in self.grad_norms))  # how many steps were skipped


def denoise_step(unet, policy, args, batch):
    """unet's DDIM step at the sampled x_t, scoring the sampled x_{t-1}. batch: (latents, next_latents, timesteps,
    embeds) of a micro-batch at one trained timestep, (b, C, h, w), (b, C, h, w), (b,), (b, 77, D) -> DDIMStep."""
    latents, next_latents, timesteps, embeds = batch
    with policy.autocast():
        eps = guided_eps(unet, latents, timesteps, embeds, policy.negative_embeds, args.guidance_scale)
    return ddim_step_with_logprob(policy.scheduler, eps, timesteps, latents, args.eta, next_latents)


def grpo_term(policy, opt, args, batch, old_log_prob, advantages, n_terms):
    """One term of the update: the policy's log-prob of one micro-batch at one timestep, the clipped loss, its
    backward. old_log_prob (b,), or None while no weight has moved this step (the ratio is then exactly 1: see
    --old-log-prob); advantages (b,); n_terms: how many terms the optimizer step averages. -> grpo_loss's info."""
    step = denoise_step(policy.unet, policy, args, batch)
    kl = None
    if args.kl_coef > 0:  # closed-form KL to pi_ref at the same x_t (same sigma_t): no sampling needed
        with torch.no_grad(), reference_unet(policy) as ref:
            ref_step = denoise_step(ref, policy, args, batch)
        kl = gaussian_kl(step.next_mean, ref_step.next_mean, step.std_dev)
    old = step.log_prob.detach() if old_log_prob is None else old_log_prob
    loss, info = grpo_loss(step.log_prob, old, advantages, args.clip_range, kl, args.kl_coef)
    # Backward now, one term at a time, so only one UNet graph is alive at once (the memory of a single forward).
    # Dividing by the number of terms makes the accumulated gradient a mean.
    opt.scaler.scale(loss / n_terms).backward()
    return info


def grpo_update(traj, advantages, policy, opt, args, gen):
    """TRAIN: PPO-clip over the kept timesteps of every trajectory. traj: Trajectories (B, T, ...); advantages (B,).
    Each kept timestep of a micro-batch is a term, one forward and backward (grpo_term: the memory of ONE UNet pass);
    gradients accumulate over --gradient-accumulation-steps micro-batches, then optimizer_step (skipped when a loss or
    gradient is non-finite). -> UpdateResult: one grpo_loss info per term, as floats."""
    B, T = traj["log_probs"].shape
    K, device, micro = trained_timesteps(args), traj["latents"].device, args.train_batch_size
    # The trainable steps: all but the last, or the SDE window's (traj["window"], (W,)). Each trajectory trains its
    # kept ones in its own random order (the release's per-sample shuffle), so one micro-batch mixes noise levels.
    cols = traj.get("window", torch.arange(T - 1))
    perm = torch.stack([cols[torch.randperm(len(cols), generator=gen)[:K]] for _ in range(B)]).to(device)  # (B, K)
    rows = torch.arange(B, device=device)[:, None]
    kept = {k: traj[k][rows, perm] for k in ("latents", "next_latents", "log_probs", "timesteps")}  # (B, K, ...)
    order = torch.randperm(B, generator=gen).to(device)  # mix prompts across micro-batches
    batches = [order[m * micro:(m + 1) * micro] for m in range(B // micro)]
    # old log-probs (--old-log-prob): the sampler's, or recomputed at the training shape; under "on-policy" the
    # sampler's only after the step's first weight update (until then the policy IS pi_old: rho = 1 exactly)
    old = recompute_old_log_probs(kept, batches, traj["prompt_embeds"], policy, args) \
        if args.old_log_prob == "recompute" else kept["log_probs"]
    result, infos, moved = UpdateResult(), [], False
    for m, idx in enumerate(batches):
        for j in range(K):
            batch = (*(kept[k][idx, j] for k in ("latents", "next_latents", "timesteps")), traj["prompt_embeds"][idx])
            old_log_prob = None if args.old_log_prob == "on-policy" and not moved else old[idx, j]
            infos.append(grpo_term(policy, opt, args, batch, old_log_prob, advantages[idx],
                                   K * args.gradient_accumulation_steps))
        if (m + 1) % args.gradient_accumulation_steps == 0:
            moved |= optimizer_step(opt, args.max_grad_norm, result) is not None
    result.infos = as_floats(infos)
    return result


def grpo_step(traj, rewards, policy, opt, args, gen):
    """ADVANTAGE then TRAIN, GRPO's Objective.update: rewards (B,) -> group advantages (B,) -> grpo_update."""
    advantages = group_advantages(rewards, args.group_size, args.adv_clip_max).to(traj["latents"].device)
    return grpo_update(traj, advantages, policy, opt, args, gen)


def optimizer_step(opt, max_grad_norm, result=None):
    """One optimizer step on the accumulated gradients: unscaled (fp16), clipped, applied. -> the gradient norm, or
    None when it is non-finite and the step is skipped (under fp16 scaler.update() then lowers the loss scale:
    unscale_ recorded the inf); appended to result.grad_norms when a result is given."""
    for hook in opt.hooks:  # train()'s: under torchrun the gradients become every process's average here
        hook(opt)
    opt.scaler.unscale_(opt.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(opt.params, max_grad_norm)
    norm = norm.item() if torch.isfinite(norm) else None
    if norm is not None:
        opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    if result is not None:
        result.grad_norms.append(norm)
    return norm


@dataclasses.dataclass(frozen=True)
class Objective:
    """A method as train() runs it, the fork contract. Each step, after drawing the prompts:
        traj = sample(prompts, policy, models, args, gen, step) Trajectories of B = P x G, in groups of G
        rewards = reward_fn(images, prompts)                   (B,) float, on the decoded x_0 (B, 3, H, W) in [0, 1]
        result = update(traj, rewards, policy, opt, args, gen) an UpdateResult; backward through opt.scaler, then
                                                               optimizer_step(opt, args.max_grad_norm, result)
    Everything else (models, LoRA or full fine-tune, memory flags, checkpoints, resume, torchrun, signals, logs,
    grids, export) is train()'s: every info name an update reports is logged, and under torchrun every process makes
    as many optimizer steps as the busiest. Draw randomness only from `gen`: resume then replays a step exactly."""
    update: typing.Callable           # ADVANTAGE and TRAIN
    metrics: tuple = ()               # info names shown first in the step's line (every name is logged anyway)
    needs_reference: bool = False     # a frozen pi_ref even at --kl-coef 0 (DPO measures against it)
    sample: typing.Callable = sample_trajectories  # SAMPLE
    reward_fn: typing.Optional[typing.Callable] = None  # REWARD; None: the steering reward of --reward-model

    def __post_init__(self):  # a malformed objective fails here, not after a whole step has been sampled and trained
        reward_ok = self.reward_fn is None or callable(self.reward_fn)
        if not (callable(self.update) and callable(self.sample) and reward_ok):
            raise TypeError("Objective: update, sample and reward_fn (or None) must be callables")
        if isinstance(self.metrics, str) or not all(isinstance(name, str) for name in self.metrics):
            raise TypeError(f"Objective.metrics must be a tuple of info names, got {self.metrics!r}")


def setup_unet(unet, args, dtype, reference=False):
    """What trains: the whole UNet in fp32 (the release), or LoRA adapters of rank --lora-rank on the attention
    projections of a frozen base. -> the frozen reference pi_ref (None when the same UNet with its LoRA adapters
    disabled serves, or when --kl-coef 0 and the objective needs no `reference`)."""
    if args.lora_rank:  # LoRA weights and their Adam state in fp32, the frozen base stored in `dtype`
        add_lora(unet, args.lora_rank, dtype, targets=["to_k", "to_q", "to_v", "to_out.0"])
        return None
    unet.float().requires_grad_(True)  # fp32 master weights; autocast runs the math in `dtype`
    return frozen_reference(unet, dtype) if args.kl_coef > 0 or reference else None


def adamw(params, args, device):
    """How it trains: AdamW on the trainable parameters, fused on a GPU (one kernel, and none of the foreach version's
    full-size temporaries: +3.2 GiB for SD's UNet)."""
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=device.type == "cuda")


GRPO = Objective(update=grpo_step, metrics=("policy_loss", "kl", "approx_kl", "clipfrac"))  # PPO's diagnostics


# ==================================================================================================
# 5. Training loop                                                              (the method ends here)
# ==================================================================================================
def train(args, objective=GRPO, models=None, reward_fn=None):
    """Run a method for --steps steps: GRPO, or a fork's Objective (fork_dpo.DPO). -> the run folder (None on torchrun
    ranks > 0, which write nothing). `models`: a dict as load_models returns, built by the caller (bench.py's random
    real-size ones) instead of loaded from --model. `reward_fn`: shorthand for the objective with that reward_fn."""
    objective = objective if reward_fn is None else dataclasses.replace(objective, reward_fn=reward_fn)
    with stop_signals(int(os.environ.get("RANK", 0))) as stop:  # a signal at any moment: the steps done are saved
        run = setup_run(args, objective, models, stop)  # the checks, the run folder, the models, the policy, resume
        args, policy, opt, models, gen = run.args, run.policy, run.opt, run.models, run.gen  # args: the plan's numbers
        P, G, S = args.prompts_per_step, args.group_size, args.sample_batch_size
        n_neg = round(P * args.negative_fraction)
        with run_ending(run, stop):  # a signal's save, the lock let go, torchrun's group closed: however the run ends
            if run.rank == 0 and run.start == 0:  # the starting model, to compare every later grid with
                sample_grid(run.run_dir / "samples_000000.png", policy, run.models, *run.grid, args, 0)
            for step in run.bar:  # from the steps already done to --steps
                start_step(run, stop, step)  # what a signal needs to abandon this step; timed() reads the clock
                # ================= SAMPLE: G trajectories per prompt, no grad =================
                prompts = draw_prompts(run.negatives, n_neg, gen) + draw_prompts(run.positives, P - n_neg, gen)
                traj = timed(run, "sample", objective.sample, prompts, policy, models, args, gen, step)  # B = P x G
                images = timed(run, "decode", in_chunks, partial(decode_latents, models["vae"]), S,
                               traj["final_latents"])  # x_0 decoded, (B, 3, H, W) in [0, 1]
                # ================= REWARD, in chunks of S: the reward model's activations stay bounded ==============
                rewards = timed(run, "reward", in_chunks, run.reward_fn, S, images,
                                [p for p in prompts for _ in range(G)]).float().cpu()  # (B,)
                # ================= ADVANTAGE and TRAIN: grpo_step, or a fork's update =================
                result = timed(run, "train", objective.update, traj, rewards, policy, opt, args, gen)
                # ================= LOG, SAVE, and stop on divergence or a signal =================
                end_step(run, stop, step, traj, rewards, result)
            if run.rank == 0:
                export_final(run, stop)
    return run.run_dir


# ==================================================================================================
# PLUMBING: below this line nothing is the method. Errors, the command line and its checks, model loaders and tiny
# models, the policy's setup, checkpoints and run files, logging, signals, torchrun. A fork rarely touches it.
# ==================================================================================================
class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


class TrainingDiverged(RuntimeError):
    """Too many steps in a row with a non-finite reward, loss or gradient: exit code 1, checkpoints intact."""


class DiskFull(RuntimeError):
    """A checkpoint or run file could not be written (full disk, no permission): exit code 1, the previous
    checkpoint intact."""


class RunInterrupted(Exception):
    """The run stopped early on a signal, with a checkpoint to resume from: its line, and `code` for the exit
    (EXIT_PREEMPTED for SIGTERM / SIGUSR1, 130 for Ctrl-C), so `train && eval` does not evaluate an unfinished run."""
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again": a job script re-submits on it with --resume auto


# --- the run's flags: memory, speed, files, logging -------------------------------------------------------------------
@dataclasses.dataclass
class Args(MethodArgs):
    """Every flag of the trainer: the method's (MethodArgs) and the run's. A fork subclasses it to add its own
    (fork_dpo.DPOArgs)."""
    # -- fast mode (a deviation, experimental: docs/fast_mode.md) --
    sde_window: int = flag(0, "eta > 0 and training only on W consecutive denoising steps (sde_window); 0 = every "
                           "step, the paper's method", group="fast mode (a deviation, experimental)")
    sde_window_placement: str = flag("first", "first = the W noisiest steps; random = a new place each step; "
                                     "slide = one step later every --sde-window-shift steps",
                                     choices=["first", "random", "slide"])
    sde_window_shift: int = flag(0, "with --sde-window-placement slide: training steps between two moves (N >= 1)")
    ode_steps: int = flag(0, "with --sde-window: the steps after the window in K DPM-Solver++ steps; 0 = DDIM's")
    # -- memory and speed (diffusers' flag names) --
    gradient_checkpointing: bool = flag(None, "recompute UNet activations in backward; unset: the memory plan decides",
                                        group="memory and speed")
    max_memory_gib: float = flag(0.0, "cap this process's GPU memory (24: a 24 GB card on a bigger one); 0 = all")
    mixed_precision: str = flag("bf16", "autocast dtype; frozen models are kept in it", choices=["no", "fp16", "bf16"])
    allow_tf32: bool = flag(True, "TF32 matmuls on Ampere+ GPUs")
    device: str = flag("auto", "torch device: cuda, cpu, cuda:1, ...; auto = cuda when a GPU is visible, else cpu")
    # -- run --
    seed: int = flag(0, "seeds everything: the same seed on CPU gives the same run", group="run")
    output_dir: str = flag("runs", "one folder per run is made under it")
    run_name: str = flag("", "run folder name under --output-dir, one path component (default: date-time)")
    resume: str = flag("", "latest: the named run's newest checkpoint; auto: the same, or a fresh start when it has "
                       "none (one job script for every submission); or a checkpoint folder (docs/runs.md)")
    save_every: int = flag(20, "checkpoint every N steps (and at the end)")
    checkpoints_total_limit: int = flag(3, "keep the newest N checkpoints, 0 = all (a full one is ~10.5 GB)")
    sample_every: int = flag(20, "captioned sample grid every N steps (and at the end)")
    grid_prompts: str = flag(str(PROMPTS / "grid_prompts.txt"), "the sample grid's prompts, one per line, each "
                             "starting 'unsafe: ' or 'benign: ' (the training prompts are offensive by design)")
    eval_every: int = flag(0, "every N steps score --val-prompts with the run's reward: val_* metrics, best/; 0 = off")
    val_prompts: str = flag(str(PROMPTS / "val_prompts.txt"), "held-out 'unsafe: ' / 'benign: ' lines, never trained")
    max_nonfinite_steps: int = flag(3, "stop after this many steps in a row with a non-finite reward, loss or grad")
    wandb: bool = flag(False, "also log to Weights & Biases")



# --- the method's helpers: the DDIM table on the device, SDXL's added conditions, fast mode's solver (--ode-steps),
# CLIP's pixels, the reference's precision, pi_old recomputed (--old-log-prob recompute) ---------------------------
def schedule_on(scheduler, device):
    """The scheduler's abar_t table (1000,) and final abar (), on `device`, copied there once per scheduler: a copy in
    every DDIM call made the host wait for the GPU twice per UNet call."""
    tables = scheduler.__dict__.setdefault("_tables_on", {})  # diffusers' config attributes are read-only
    if device not in tables:
        abar = scheduler.alphas_cumprod.to(device)
        tables[device] = abar, torch.as_tensor(scheduler.final_alpha_cumprod, dtype=abar.dtype).to(device)
    return tables[device]


def sde_window(args, gen, step):
    """Fast mode (--sde-window W, Flow-GRPO-Fast): the step's eta schedule and its window of stochastic, trained
    denoising steps, W consecutive ones of the T - 1 trainable. -> (etas (T,): --eta inside the window, 0 outside;
    the window's step indices (W,)); without a window ([--eta] * T, None): every step stochastic, the paper's method.
    --sde-window-placement: first = the W noisiest steps, which decide what is drawn; random = drawn from the run's
    generator (resume replays it); slide = MixGRPO's (arXiv 2507.21802), one step later every --sde-window-shift
    steps, wrapping around. Why first is the default: docs/fast_mode.md."""
    T, W = args.num_inference_steps, args.sde_window
    if not W:
        return [args.eta] * T, None
    if args.sde_window_placement == "random":
        start = int(torch.randint(0, T - W, (1,), generator=gen))
    else:
        start = step // args.sde_window_shift % (T - W) if args.sde_window_placement == "slide" else 0
    return [args.eta if start <= i < start + W else 0.0 for i in range(T)], torch.arange(start, start + W)


def model_output(unet, latents, timesteps, c):
    """One UNet call in its own dtype -> float32 (B, C, h, w): eps, or v for a v-prediction model (SD 2.x-v).
    c (B, 77, D). SDXL's UNet also takes two added conditions: text_encoder_2's pooled embedding, which encode_prompts
    packs into a 78th row of c (B, 78, D), zero-padded to D, and the size ids (original size, crop corner, target
    size), here the image's own size and no crop, as its pipeline sets them by default."""
    dtype, added = next(unet.parameters()).dtype, None  # not unet.dtype: it walks every module, every call
    if unet.config.addition_embed_type == "text_time":  # SDXL
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        h, w = latents.shape[-2] * 8, latents.shape[-1] * 8  # the VAE's 8x
        added = dict(text_embeds=c[:, -1, :pooled].to(dtype),
                     time_ids=c.new_tensor([h, w, 0, 0, h, w], dtype=dtype).expand(c.shape[0], 6))
        c = c[:, :-1]
    return unet(latents.to(dtype), timesteps, c.to(dtype), added_cond_kwargs=added).sample.float()


def ode_tail(unet, scheduler, x_t, start, steps, prompt_embeds, negative_embeds, guidance_scale, autocast):
    """--ode-steps: fast mode's deterministic tail solved in `steps` steps of DPM-Solver++ (2M, diffusers'
    DPMSolverMultistepScheduler; MixGRPO-Flash, arXiv 2507.21802) instead of one DDIM step each: the probability-flow
    ODE from x_t at DDIM step `start` (after the SDE window) to x_0. No noise, nothing scored or trained. Its timesteps
    are `steps` of DDIM's remaining ones, evenly spaced from t_start, so its first model call sees the very x_t the
    window produced; the solver ends at sigma 0 (diffusers' final_sigmas_type "zero"). A fresh solver per call: its
    multistep history never reaches another batch. x_t (b, C, h, w) -> x_0 (b, C, h, w)."""
    from diffusers import DPMSolverMultistepScheduler
    remaining = scheduler.timesteps[start:]
    pick = torch.linspace(0, len(remaining) - 1, min(steps, len(remaining))).round().long()
    solver = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    solver.set_timesteps(timesteps=remaining[pick].tolist(), device=x_t.device)
    for t in solver.timesteps:
        with autocast():
            eps = guided_eps(unet, x_t, t.expand(x_t.shape[0]).to(x_t.device), prompt_embeds, negative_embeds,
                             guidance_scale)
        x_t = solver.step(eps, t, x_t).prev_sample
    return x_t


def clip_preprocess(images, size, mean, std):
    """OpenCLIP's eval transform on tensors: bicubic resize of the short side, centre crop, normalise.

    images (B, 3, H, W) in [0, 1] -> (B, 3, size, size). Stays on the device: no PIL, no JPEG round trip
    (the release saves and reloads a JPEG per image: bench.py measures the difference).
    """
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    images = F.interpolate(images, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                           mode="bicubic", align_corners=False, antialias=True)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    images = images[..., top:top + size, left:left + size].clamp(0, 1)
    mean, std = (torch.tensor(m, device=images.device).view(1, 3, 1, 1) for m in (mean, std))
    return (images - mean) / std


def clip_pixels(model, images):
    """(B, 3, H, W) images in [0, 1] -> an OpenCLIP model's input, with its own size, mean and std."""
    size = model.visual.image_size  # OpenCLIP stores an int or an (H, W) pair
    size = size[0] if isinstance(size, (tuple, list)) else size
    return clip_preprocess(images, size, model.visual.image_mean, model.visual.image_std)


def as_floats(infos):
    """[{name: 0-dim tensor}] (grpo_loss's) -> [{name: float}], with one device-to-host copy for the whole update."""
    values = iter(torch.stack([v.float() for i in infos for v in i.values()]).tolist() if infos else [])
    return [{k: next(values) for k in i} for i in infos]


@contextlib.contextmanager
def reference_unet(policy):
    """The starting model pi_ref: the frozen copy, or the policy with its LoRA adapters switched off."""
    if policy.reference is not None:
        yield policy.reference
        return
    policy.unet.disable_adapters()
    try:
        yield policy.unet
    finally:
        policy.unet.enable_adapters()


def add_lora(unet, rank, dtype, targets):
    """LoRA adapters of `rank` (alpha = rank, Gaussian init) on the `targets` projections, in fp32 with their Adam
    state; the frozen base, only ever run, stored in the autocast `dtype`."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UsageError("--lora-rank needs peft: pip install peft") from None
    if dtype != torch.float32:
        cast(unet, dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    from diffusers.training_utils import cast_training_params
    cast_training_params(unet)


def frozen_reference(unet, dtype):
    """A frozen copy of the fp32 policy that predicts exactly what the policy predicts under `dtype` autocast.

    Autocast casts the policy's fp32 weights to `dtype` for convolutions, linears and attention: storing those
    in `dtype` gives the same values at half the memory. But it runs GroupNorm / LayerNorm in fp32 with the
    fp32 weights, so those stay fp32 here (a few KB): a copy wholly in bf16 rounds trained norm weights and
    gave KL ~0.6 before any update (random init hides it: norm weights are exactly 1 and 0).
    """
    ref = copy.deepcopy(unet).requires_grad_(False)
    for module in ref.modules():
        if not isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return ref


def trained_timesteps(args):
    """How many of a trajectory's trainable steps are trained: of its T - 1 (the last step never is, as in the
    release), or of the --sde-window's W."""
    return max(1, int((args.sde_window or args.num_inference_steps - 1) * args.timestep_fraction))


@torch.no_grad()
def recompute_old_log_probs(kept, batches, prompt_embeds, policy, args):
    """--old-log-prob recompute: every kept step scored again by the unchanged policy, in the very micro-batches and
    shapes the update will train them in, so its first forward of each term reproduces them bit for bit (bf16 kernels
    round differently at the sampler's batch shape). One forward per term, ~1/5 of TRAIN. -> (B, K) old log-probs."""
    old = torch.empty_like(kept["log_probs"])
    for idx in batches:
        for j in range(old.shape[1]):
            batch = (*(kept[k][idx, j] for k in ("latents", "next_latents", "timesteps")), prompt_embeds[idx])
            old[idx, j] = denoise_step(policy.unet, policy, args, batch).log_prob
    return old


# --- models: the real ones through the libraries' loaders, and tiny random ones built in code -------------------------
def sd_scheduler(**overrides):
    """DDIM with SD 1.x's betas ("scaled_linear" 0.00085 -> 0.012, leading spacing, offset 1)."""
    from diffusers import DDIMScheduler
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**cfg, **overrides})


def clip_tokenizer(folder=None):
    """A transformers CLIPTokenizer built from the BPE vocabulary that open_clip ships (works offline). Its files
    vocab.json and merges.txt (SD 1.4's tokenizer/ holds the same) are written to `folder`, or a temporary one."""
    import open_clip
    from transformers import CLIPTokenizer
    bpe = open_clip.tokenizer.SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(folder or tmp)
        d.mkdir(parents=True, exist_ok=True)
        vocab, merge_file = d / "vocab.json", d / "merges.txt"
        # open_clip names the specials <start_of_text>/<end_of_text>; SD's tokenizer <|startoftext|>/<|endoftext|>
        names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
        vocab.write_text(json.dumps({names.get(k, k): i for k, i in bpe.encoder.items()}), encoding="utf-8")
        merge_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        # transformers 5.x: vocab and merges must be positional (keywords build a broken tokenizer silently)
        return CLIPTokenizer(str(vocab), str(merge_file), model_max_length=77)


def tiny_clip(embed_dim=32, seed=0, **kw):
    """A random OpenCLIP model (32 px ViT, 2-layer text tower) with the real vocabulary and OpenAI's pixel
    statistics; `embed_dim` 768 gives eval.py's Q16 stand-in the size of the real prompt embeddings."""
    import open_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=embed_dim, **kw,
                               vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
                               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    model.visual.image_mean, model.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    return model.eval(), open_clip.get_tokenizer("ViT-B-32")


def build_tiny_models(seed=0):
    """Tiny random SD stack + OpenCLIP reward model, no file or network access. Same seed, same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(  # 0.2 M params; SD's block types at two resolutions
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(  # 4 blocks = 8x downsampling, like SD's VAE
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    reward_model, reward_tokenizer = tiny_clip(32, seed)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=sd_scheduler(),
                reward_model=reward_model, reward_tokenizer=reward_tokenizer)


def load_sd(model):
    """The parts of a diffusers SD 1.x, SD 2.x or SDXL repo id or folder (SDXL adds tokenizer_2 and text_encoder_2),
    with DDIM on the model's own betas and prediction type; "force_zeros_for_empty_prompt": SDXL's negative c is
    zeros, as its pipeline makes it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    index = model_index(model)
    xl = index.get("_class_name") == "StableDiffusionXLPipeline"
    try:
        parts = dict(tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
                     text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                     vae=AutoencoderKL.from_pretrained(model, subfolder="vae"),
                     unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                     scheduler=DDIMScheduler.from_pretrained(model, subfolder="scheduler"))
        if xl:
            parts.update(tokenizer_2=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"),
                         text_encoder_2=CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2"),
                         force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError) as e:  # missing files, or not in the cache while the hub is unreachable
        first = model.split("/")[0]
        if first and not Path(model).exists() and Path(first).is_dir():  # e.g. models/sd-v1-4 under ./models
            raise UsageError(f"--model {model}: no such folder (and no hub model of that name in the cache)") from None
        needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if xl
                                                                              else ())
        missing = [d for d in needed if not Path(model, d).is_dir()]
        if Path(model).exists() and not missing:  # a file in it is cut short or damaged: no download advice
            raise UsageError(f"--model {model}: a file in it cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:100]}); copy or download that part again") from None
        if Path(model).exists() or model.startswith((".", "/", "~")):
            raise UsageError(f"--model {model}: not a diffusers Stable Diffusion folder (needs {', '.join(needed)}; "
                             f"no {', '.join(missing) or 'folder'})") from None
        raise UsageError(f"cannot load Stable Diffusion '{model}' offline ({type(e).__name__}); download it with "
                         f"`hf download {model} --local-dir models/sd` and pass --model models/sd") from None
    check_scheduler(model, parts["scheduler"].config)
    return parts


FAMILIES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # SD 1.x and 2.x share the first


def model_index(model):
    """--model's model_index.json (a local folder's, or the hub cache's) as a dict, {} when there is none to read.
    Another pipeline (SD3, FLUX: flow matching) or a prediction type the DDIM step lacks is refused from its config
    files, before any weight is read."""
    from diffusers import DiffusionPipeline
    index, scheduler = {}, {}
    # (a UsageError is a ValueError: the checks are raised outside these suppresses, which would swallow them)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # not readable here: the loaders say why
        index = dict(DiffusionPipeline.load_config(model))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        scheduler = json.loads(Path(model, "scheduler/scheduler_config.json").read_text())
    kind = index.get("_class_name", FAMILIES[0])
    if kind not in FAMILIES:
        raise UsageError(f"--model {model} is a {kind}; SD 1.x, SD 2.x (StableDiffusionPipeline) and SDXL "
                         "(StableDiffusionXLPipeline) are supported (SD3 and FLUX are flow matching: "
                         "docs/base_models.md)")
    check_scheduler(model, scheduler if isinstance(scheduler, dict) else {})
    return index


def check_scheduler(model, config):
    """What the log-prob DDIM step implements: epsilon or v prediction, "leading" spacing, SD's own betas."""
    ignored = [k for k in ("clip_sample", "thresholding", "rescale_betas_zero_snr") if config.get(k)]
    if ignored:
        raise UsageError(f"{model}: its scheduler config sets {' and '.join(ignored)}, which the log-prob DDIM step "
                         "does not implement; set them to false in scheduler/scheduler_config.json")
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise UsageError(f"--model {model} predicts '{config['prediction_type']}'; the DDIM step takes epsilon "
                         "(SD 1.x, SD 2.x-base, SDXL) or v_prediction (SD 2.x-v) models")
    if config.get("timestep_spacing", "leading") != "leading":
        raise UsageError(f"{model}: its scheduler config sets timestep_spacing '{config['timestep_spacing']}'; the "
                         "DDIM step takes SD's 'leading' spacing (set it in scheduler/scheduler_config.json)")


def model_family(models):
    """SDXL, SD 2.x or SD 1.x, as a label (SD 2.x's UNet is the one with linear projections in its attention)."""
    if "text_encoder_2" in models:
        family = "SDXL"
    else:
        family = "SD 2.x" if models["unet"].config.use_linear_projection else "SD 1.x"
    return family + ("-v" if models["scheduler"].config.prediction_type == "v_prediction" else "")


def native_resolution(unet_config, vae_config):
    """The model's own image side: its UNet's sample size times the VAE's downsampling (512, 768 or 1024 px)."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_resolution_of(model):
    """native_resolution from --model's config files alone (a folder or the hub cache), before any weight loads;
    512 where they cannot be read (the loaders then say why)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    try:
        return native_resolution(UNet2DConditionModel.load_config(model, subfolder="unet"),
                                 AutoencoderKL.load_config(model, subfolder="vae"))
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def load_reward_model(arch, pretrained, checkpoint=""):
    """OpenCLIP encoder: `arch` + `pretrained` (a tag or weights file), or one of OpenCLIP's self-describing names
    `local-dir:FOLDER` / `hf-hub:ORG/NAME` (open_clip_config.json + weights, the layout of the OpenCLIP repos on
    the hub). With `checkpoint` (e.g. HPSv2.1's) its state dict is loaded strictly into the built model."""
    import pickle
    import open_clip
    named = arch.startswith(("local-dir:", "hf-hub:"))
    if arch.startswith("local-dir:"):
        folder = Path(arch[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise UsageError(f"--reward-model {arch}: no open_clip_config.json in {folder}")
        if not checkpoint and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UsageError(f"--reward-model {arch}: no weights (open_clip_model.safetensors or "
                             f"open_clip_pytorch_model.bin) in {folder}")
    try:
        model = open_clip.create_model(arch, pretrained=None if checkpoint or named else pretrained,
                                       load_weights=not checkpoint)
    except (OSError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot load reward model {arch} {'' if named else repr(pretrained)} ({type(e).__name__}); "
                         "download the OpenCLIP weights (e.g. `hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                         "--local-dir models/vit-h-14`) and pass --reward-model local-dir:models/vit-h-14") from None
    if checkpoint:  # open_clip's loader unwraps HPSv2's {"state_dict": ...} and DDP's "module." prefix
        try:
            missing, unexpected = open_clip.load_checkpoint(model, checkpoint, strict=False)
        except FileNotFoundError:
            raise UsageError(f"--reward-checkpoint {checkpoint}: file not found") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, StopIteration) as e:  # no dict, or an empty one
            first = (str(e).splitlines() or ["an empty state dict"])[0][:80]
            raise UsageError(f"--reward-checkpoint {checkpoint}: not a state dict checkpoint (HPSv2 saves "
                             f"{{'state_dict': ...}}; this file holds other objects: {first})") from None
        except (RuntimeError, AssertionError):  # shapes differ (its position-embedding resize asserts the width)
            missing, unexpected = ["(shapes differ)"], []
        if missing or unexpected:
            raise UsageError(f"--reward-checkpoint {checkpoint} does not fit --reward-model {arch}: {len(missing)} "
                             f"weights missing or misshapen, {len(unexpected)} unexpected (HPSv2.1 is a ViT-H-14 "
                             "checkpoint)")
    return model.eval(), open_clip.get_tokenizer(arch)


def load_models(args, reward=True):
    """Everything the loop needs, as a dict of modules. --tiny builds random ones in code. reward=False: a custom
    reward_fn replaces the steering reward, so its encoder is neither loaded nor needed."""
    if args.tiny:
        return build_tiny_models(args.seed)
    local_reward = (args.reward_model.startswith("local-dir:") or bool(args.reward_checkpoint)
                    or Path(args.reward_pretrained).is_file())
    if not Path(args.model).is_dir() or (reward and not local_reward):  # something may come from the hub
        use_cache_if_hub_unreachable()
    models = load_sd(args.model)
    if reward:
        models["reward_model"], models["reward_tokenizer"] = load_reward_model(
            args.reward_model, args.reward_pretrained, args.reward_checkpoint)
    return models


def cast(module, dtype):
    """module.to(dtype) without diffusers' override, which warns "should be kept in float32: []" on every call even
    when no module of SD 1.x's needs fp32 (and the warning would bury real ones)."""
    return torch.nn.Module.to(module, dtype)


@torch.no_grad()
def encode_prompts(models, prompts):
    """(N,) prompts -> the conditioning c, truncated at 77 tokens as diffusers does. SD 1.x and 2.x: the text
    encoder's last hidden states (N, 77, D). SDXL (N, 78, D1 + D2), as its pipeline builds them: both encoders'
    penultimate hidden states side by side, and a 78th row holding text_encoder_2's pooled projection, zero-padded
    (model_output unpacks it). `models`: a dict with tokenizer and text_encoder (SDXL: tokenizer_2, text_encoder_2)."""
    def run(tokenizer, text_encoder):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids.to(text_encoder.device), output_hidden_states="text_encoder_2" in models)
    if "text_encoder_2" not in models:
        return run(models["tokenizer"], models["text_encoder"])[0]
    first = run(models["tokenizer"], models["text_encoder"]).hidden_states[-2]  # (N, 77, D1)
    second = run(models["tokenizer_2"], models["text_encoder_2"])
    hidden = torch.cat([first, second.hidden_states[-2].to(first)], -1)  # (N, 77, D1 + D2)
    pooled = torch.nn.functional.pad(second.text_embeds, (0, hidden.shape[-1] - second.text_embeds.shape[-1]))
    return torch.cat([hidden, pooled[:, None].to(hidden)], 1)


def negative_embeds(models):
    """c of the empty prompt, the negative of classifier-free guidance (1, 77, D); zeros where the model's pipeline
    makes them so (SDXL's force_zeros_for_empty_prompt)."""
    c = encode_prompts(models, [""])
    return torch.zeros_like(c) if models.get("force_zeros_for_empty_prompt") else c


@torch.no_grad()
def decode_latents(vae, latents):
    """(B, 4, h, w) latents -> (B, 3, 8h, 8w) images in [0, 1], float32."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# --- the policy: made trainable, its frozen reference, its optimizer --------------------------------------------------
def setup_policy(models, args, device, world=1, reference=False):
    """The policy and everything that trains it, exactly as train() runs them (bench.py and the tests call it too).

    models: a dict as load_models returns (the reward model, if any, is left to the caller). The UNet becomes
    trainable on `device` (setup_unet); the frozen VAE and text encoder are stored in the autocast dtype.
    -> (Policy, OptimState).
    """
    dtype, unet = DTYPES[args.mixed_precision], models["unet"]
    reference = setup_unet(unet, args, dtype, reference)
    unet.to(device).train()  # SD's UNet has no dropout: train() is convention (checkpointing acts whenever grad is)
    set_checkpointing(unet, args.gradient_checkpointing is not False)  # unset: on until memory_plan decides
    if reference is not None:
        reference.to(device)  # already in `dtype`, its norm layers in fp32 (frozen_reference)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if name not in models:
            continue
        models[name].requires_grad_(False).to(device)
        if dtype != torch.float32 and not (name == "vae" and dtype == torch.float16 and "text_encoder_2" in models):
            cast(models[name], dtype)  # only ever run: stored in the autocast dtype (SDXL's VAE overflows in fp16)
    params = [p for p in unet.parameters() if p.requires_grad]
    policy = Policy(unet=unet, reference=reference, scheduler=models["scheduler"],
                    negative_embeds=negative_embeds(models),
                    autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision != "no"))
    opt = OptimState(params=params, optimizer=adamw(params, args, device),
                     scaler=torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16"))
    if world > 1:  # every optimizer step first averages the gradients over the torchrun processes
        opt.hooks.append(torchrun_average(world))
    return policy, opt


# --- the memory plan: how a step's trajectories split into micro-batches on this device ------------------------------
GIB = 2**30
AUTO_MICRO = 2  # --train-batch-size auto keeps the update of micro-batches of 2 (a 24 GB card's plan)
FAST_MICRO = 8  # 16 images per UNet call: sampling's shape, ~19% of an H200 where micro-batches of 2 reached ~5%


def full_finetune_bytes(args, n_params):
    """What a full fine-tune holds before any activation: fp32 weights, gradients and AdamW's two moments (16 bytes a
    parameter), and the bf16 reference with --kl-coef (2 more)."""
    return n_params * (16 + 2 * (args.kl_coef > 0))


def check_fits(args, n_params, capacity):
    """Refuse a full fine-tune whose weights, gradients and AdamW state alone (full_finetune_bytes) outgrow the card
    (`capacity` bytes; None: no GPU, nothing to refuse): SDXL's 2.6 B-parameter UNet needs ~43 GiB before a single
    activation. LoRA trains a few million parameters instead."""
    need = full_finetune_bytes(args, n_params)
    if args.lora_rank or capacity is None or need < capacity:
        return
    raise UsageError(f"a full fine-tune of this {n_params / 1e9:.1f} B-parameter UNet needs {need / GIB:.0f} GiB for "
                     f"its weights, gradients and AdamW state alone, more than the {capacity / GIB:.0f} GiB here: "
                     f"train LoRA (--lora-rank 64: the 24 GB plan, docs/base_models.md) or use a card with over "
                     f"{need / GIB + 16:.0f} GiB")


def set_checkpointing(unet, on):
    """Gradient checkpointing of the UNet on or off (diffusers' switches; LoRA-wrapped UNets have them too)."""
    unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()


def optimizer_batch(args):
    """Trajectories per optimizer step and process: the update. --train-batch-size auto re-splits it, never changes
    it."""
    return (AUTO_MICRO if args.train_batch_size == "auto" else args.train_batch_size) * args.gradient_accumulation_steps


def choose_micro_batch(n, budget, cost):
    """The plan's rule, on measured bytes. n: the optimizer batch; budget: bytes free for the update's terms;
    cost: {checkpointing: (fixed, per trajectory) bytes, or None where one trajectory did not fit}. Per mode the
    largest micro-batch dividing n that fits; checkpointing off (no recompute: ~1/5 less work a term) when its
    micro-batch is at least min(the checkpointed one, FAST_MICRO), else on. -> (micro-batch, checkpointing) or None."""
    best = {}
    for ckpt, c in cost.items():
        fits = [m for m in range(1, n + 1) if c is not None and n % m == 0 and c[0] + m * c[1] <= budget]
        if fits:
            best[ckpt] = max(fits)
    if False in best and best[False] >= min(best.get(True, 0), FAST_MICRO):
        return best[False], False
    return (best[True], True) if True in best else None


def probe_memory(policy, opt, args, device):
    """On a CUDA GPU (None elsewhere), what the update needs, measured: one probe term (grpo_term on random latents,
    KL included) at micro-batches of 1 and 2 per checkpointing mode; no weight moves and the run's generator is not
    drawn from. -> dict of bytes: capacity (what this process may use: free + its own cache, under --max-memory-gib),
    resident (what it holds now), cost {checkpointing: (fixed: gradients and workspace, per trajectory) or None}."""
    if device.type != "cuda":
        return None
    unet, g, h = policy.unet, torch.Generator().manual_seed(0), args.resolution // 8
    policy.scheduler.set_timesteps(args.num_inference_steps, device=device)
    cost = {}
    for ckpt in (False, True):
        set_checkpointing(unet, ckpt)
        peaks = []
        for b in (1, 2):
            opt.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            x = torch.randn(2, b, unet.config.in_channels, h, h, generator=g).to(device)
            batch = (x[0], x[1], torch.full((b,), 500, device=device), policy.negative_embeds.expand(b, -1, -1))
            try:
                grpo_term(policy, opt, args, batch, None, torch.ones(b, device=device), 1)
            except torch.cuda.OutOfMemoryError:
                break
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        cost[ckpt] = (2 * peaks[0] - peaks[1], peaks[1] - peaks[0]) if len(peaks) == 2 else None
    opt.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    capacity = free + torch.cuda.memory_reserved(device)
    capacity = min(capacity, int(args.max_memory_gib * GIB)) if args.max_memory_gib else capacity
    return dict(capacity=capacity, resident=torch.cuda.memory_allocated(device), cost=cost)


def memory_plan(args, policy, opt, device):
    """Resolve --train-batch-size auto and an unset --gradient-checkpointing on this device. -> (args with numbers,
    the plan: a dict for the step summary and args.json). The optimizer batch, and so the update, never changes:
    micro-batches of 2 and of 8 give the same accumulated gradient to fp32 rounding (tested)."""
    n, ckpt, plan = optimizer_batch(args), args.gradient_checkpointing, {}
    if args.train_batch_size != "auto":
        micro, ckpt, plan["how"] = args.train_batch_size, ckpt is not False, "given"
    elif (probe := probe_memory(policy, opt, args, device)) is None:
        micro, ckpt, plan["how"] = AUTO_MICRO, ckpt is not False, f"auto without a GPU to probe: {AUTO_MICRO}"
    else:
        B, T = args.prompts_per_step * args.group_size, args.num_inference_steps
        held = 4 * B * T * policy.unet.config.in_channels * (args.resolution // 8) ** 2 * 4  # x_t, x_{t-1}; kept copy
        adam = 0 if opt.optimizer.state else 8 * sum(p.numel() for p in opt.params)  # made at the 1st optimizer step
        margin = max(2 * GIB, probe["capacity"] // 12)  # the allocator's fragmentation, cuDNN workspaces, decoding
        budget = probe["capacity"] - margin - probe["resident"] - adam - held
        chosen = choose_micro_batch(n, budget, {k: v for k, v in probe["cost"].items() if ckpt in (None, k)})
        if chosen is None:
            raise torch.cuda.OutOfMemoryError(f"memory plan: one trajectory per micro-batch does not fit the "
                                              f"{budget / GIB:.1f} GiB left for training")
        micro, ckpt = chosen
        fixed, per = probe["cost"][ckpt]
        plan.update(how="probed", capacity_gib=probe["capacity"] / GIB, margin_gib=margin / GIB,
                    per_trajectory_gib={("on" if k else "off"): v and v[1] / GIB for k, v in probe["cost"].items()},
                    predicted_peak_gib=(probe["resident"] + adam + held + fixed + micro * per) / GIB)
    set_checkpointing(policy.unet, ckpt)
    plan.update(train_batch_size=micro, gradient_accumulation_steps=n // micro, gradient_checkpointing=ckpt,
                optimizer_batch=n)
    return dataclasses.replace(args, train_batch_size=micro, gradient_accumulation_steps=n // micro,
                               gradient_checkpointing=ckpt), plan


def plan_line(plan, before=None):
    """The plan in one line; with the plan the run had before a resume, what changed (the update did not)."""
    ckpt = "on" if plan["gradient_checkpointing"] else "off"
    line = (f"memory plan ({plan['how']}): micro-batches of {plan['train_batch_size']} x "
            f"{plan['gradient_accumulation_steps']} per optimizer step of {plan['optimizer_batch']}, "
            f"checkpointing {ckpt}")
    if plan["how"] == "probed":
        per = ", ".join(f"{v:.2f} GiB with checkpointing {k}" for k, v in plan["per_trajectory_gib"].items() if v)
        line += (f" | a trajectory: {per} | predicted peak {plan['predicted_peak_gib']:.1f} of "
                 f"{plan['capacity_gib']:.1f} GiB ({plan['margin_gib']:.1f} kept free)")
    keys = ("train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")
    if before and any(before.get(k) != plan[k] for k in keys):
        same = before.get("optimizer_batch") == plan["optimizer_batch"]
        line += (f" | re-planned for this device, was {before.get('train_batch_size')} x "
                 f"{before.get('gradient_accumulation_steps')}, checkpointing "
                 f"{'on' if before.get('gradient_checkpointing') else 'off'}; the optimizer batch, and so the update, "
                 + ("unchanged" if same else f"changed by the flags: {before.get('optimizer_batch')} -> "
                    f"{plan['optimizer_batch']}"))
    return line


# --- a run: its setup, each step's log, its grids ---------------------------------------------------------------------
PROMPT_CHARS = 4000  # 77 CLIP tokens never span more (the longest token in its vocabulary is ~20 characters)


@dataclasses.dataclass
class Run:
    """What train() runs with, made by setup_run before the first step; the loop reads it, end_step updates it."""
    args: Args                        # the run's own flags (a resumed run's for every flag not named now), planned
    objective: Objective              # GRPO, or a fork's
    rank: int                         # this torchrun process (0 writes every file)
    world: int                        # torchrun processes (1 without torchrun)
    device: torch.device
    gen: torch.Generator              # the run's one CPU generator: every random draw of a step
    models: dict                      # load_models's: unet, vae, text encoder(s), tokenizer(s), scheduler, reward model
    policy: Policy
    opt: OptimState
    reward_fn: typing.Callable        # objective.reward_fn, or the steering reward of --reward-model
    negatives: list                   # the unsafe training prompts
    positives: list                   # the benign training prompts
    grid: tuple                       # the sample grid's (prompts, how many are unsafe)
    val: typing.Optional[tuple]       # --eval-every's (prompts, how many are unsafe), or None
    best: typing.Optional[tuple]      # best/'s (val_reward, step) so far, or None
    start: int                        # steps already done
    saved_step: int                   # the newest checkpoint this run wrote or resumed from
    bar: typing.Any                   # the steps left, with a progress bar on a terminal
    run_dir: typing.Optional[Path]    # the run folder (None on ranks > 0)
    lock: typing.Any                  # the run folder's lock, let go when the run ends
    say: typing.Callable              # print on rank 0, nothing elsewhere
    wandb: typing.Any = None          # the W&B run with --wandb
    bad_steps: int = 0                # steps in a row with a non-finite reward, loss or gradient
    seconds: dict = dataclasses.field(default_factory=dict)  # this step's seconds per phase (timed)


def setup_run(args, objective, models, stop):
    """Everything train() needs before its first step: every check before any work, every write after every check.
    -> Run."""
    if not args.resume:  # a resumed run's flags are checked once they are its own (setup_claimed)
        check_args(args)
    check_output_dir(args.output_dir)
    rank, world, device = init_distributed(args.device if args.device != "auto" else
                                           "cuda" if torch.cuda.is_available() else "cpu")
    # The run folder is claimed (locked) here, before any model loads: a second process on it is refused at once.
    claim, lock = on_rank_0(plan_run, args, objective, rank=rank, world=world)
    stop.advice = resume_advice(claim.args, claim.run_dir) if (claim.run_dir / "args.json").exists() else \
        "run the same command again"  # nothing of this run is recorded yet
    try:
        return setup_claimed(claim.args, objective, models, stop, rank, world, device, claim, lock)
    except BaseException:
        unclaim(claim.run_dir, lock)
        raise


def setup_claimed(args, objective, models, stop, rank, world, device, claim, lock):
    """setup_run once the run folder is claimed (plan_run's `claim`, its `lock`): the inputs, the models, the policy,
    resume, the plan, the run's files."""
    run_dir, changes = claim.run_dir, claim.changes
    if args.resume:  # a resumed run's flags, checked once they are its own (a new run's were, before the claim)
        check_args(args)
    reward_fn = objective.reward_fn
    # A prompt is cut at PROMPT_CHARS characters, far past its 77 tokens: a 10 MB line was tokenized whole every
    # time it was drawn (77 s for one step). The tokenizer truncates the rest as before; the warning still counts it.
    negatives = [p[:PROMPT_CHARS] for p in read_lines(args.negative_prompts, "negative prompts")
                 ] if args.negative_fraction > 0 else []
    positives = [p[:PROMPT_CHARS] for p in read_lines(args.positive_prompts, "positive prompts")
                 ] if args.negative_fraction < 1 else []
    if reward_fn is None:
        anchors = read_lines(args.safe_anchors, "safe anchors"), read_lines(args.unsafe_anchors, "unsafe anchors")
    grid = read_grid_prompts(args.grid_prompts)
    val = read_grid_prompts(args.val_prompts) if args.eval_every else None
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if args.max_memory_gib and capacity:  # the allocator refuses past the cap, as on a smaller card
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * GIB / capacity), device)
        capacity = min(capacity, args.max_memory_gib * GIB)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    torch.manual_seed(args.seed)  # LoRA init draws from the global RNG (same on every rank); the rest from `gen`
    gen = torch.Generator().manual_seed(args.seed + rank)  # each rank draws its own prompts and noise
    models = models or load_models(args, reward=reward_fn is None)
    args = dataclasses.replace(args, resolution=args.resolution or native_resolution(  # 0: the model's own
        models["unet"].config, models["vae"].config))
    check_fits(args, sum(p.numel() for p in models["unet"].parameters()), capacity)  # before any weight moves there
    policy, opt = setup_policy(models, args, device, world, reference=objective.needs_reference)
    opt.hooks.append(keep_steps_done(stop, policy, opt, rank))
    if reward_fn is None:
        # The reward model stays fp32 and runs without autocast (TF32 on Ampere+): it scores each image once per
        # step, ~0.1% of the step's FLOPs, and in bf16 its rewards were off by 4.7e-4 (within-group std ~1e-2).
        models["reward_model"].requires_grad_(False).to(device)
        reward_fn = make_steering_reward_fn(models["reward_model"], models["reward_tokenizer"], *anchors,
                                            args.alpha, args.steering)
    say = print if rank == 0 else (lambda *a, **k: None)
    # Resume restores weights, optimizer moments and the generator: everything random in a step comes from
    # `gen`, so the resumed run replays the exact prompts, noise and timestep orders of an unbroken one.
    resume, start = resume_newest(claim.candidates, policy, opt, gen, args, rank, world)
    asked = args  # args.json records the flags as given (auto), and the plan made of them for this device beside them
    args, plan = memory_plan(args, policy, opt, device)
    n_trainable = sum(p.numel() for p in opt.params)
    say(model_line(args, models, n_trainable, capacity))
    say(step_summary(args, world, n_trainable))
    say(plan_line(plan, previous_plan(run_dir) if start and rank == 0 else None))
    if args.tiny:
        say(f"--tiny: random tiny models built in code (mechanics, not the paper); lr {args.learning_rate}, clip "
            f"range {args.clip_range}, kl_coef {args.kl_coef}{' (no KL penalty)' if args.kl_coef == 0 else ''}")
    limit = models["tokenizer"].model_max_length
    too_long = sum(len(ids) > limit for ids in models["tokenizer"](negatives + positives).input_ids)
    if too_long:
        warnings.warn(f"{too_long} of the {len(negatives + positives)} prompts are longer than {limit} tokens: "
                      "they are truncated, as diffusers does")
    if rank == 0:
        open_run_dir(run_dir, asked, start, changes, plan, objective, claim.parent)
    stop.advice = resume_advice(args, run_dir)  # its args.json now holds its flags
    took_over = lock[1] if lock else ""
    say(f"run folder: {run_dir}" + (f" | took over the lock of {took_over}: that process is gone" if took_over else "")
        + (f" | resuming from {resume} (step {start} of {args.steps})" if resume else "")
        + (" | a branch: a new run from that checkpoint" if claim.parent else "")
        + (f" | the {start} steps are done: exporting final/ only" if resume and start == args.steps else "")
        + "".join(f" | {k} {a} -> {b}" for k, (a, b) in changes.items()))
    wandb = None
    if args.wandb and rank == 0:
        import wandb
        wandb.init(project="safediffusion-r1", name=run_dir.name, config=dataclasses.asdict(args))
    from tqdm import tqdm  # the bar only on a terminal: in a file its carriage returns would garble the step lines
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="steps", dynamic_ncols=True,
               disable=rank > 0 or not sys.stderr.isatty())
    return Run(args=args, objective=objective, rank=rank, world=world, device=device, gen=gen, models=models,
               policy=policy, opt=opt, reward_fn=reward_fn, negatives=negatives, positives=positives, grid=grid,
               val=val, best=best_so_far(run_dir, rank), start=start, saved_step=start, bar=bar,
               run_dir=run_dir if rank == 0 else None, lock=lock and lock[0], say=say, wandb=wandb)


def unclaim(run_dir, lock):
    """A setup that failed lets go of the run folder, and removes the folders plan_run made when nothing was written
    in them. lock: plan_run's (file, dead holder's line, the first folder it made or None); None off rank 0."""
    if lock is None:
        return
    release_lock(lock[0])
    with contextlib.suppress(OSError):
        if lock[2] is not None and {p.name for p in run_dir.iterdir()} == {RUN_LOCK}:
            (run_dir / RUN_LOCK).unlink()
            for folder in [run_dir, *run_dir.parents]:
                folder.rmdir()
                if folder == lock[2]:
                    break


def start_step(run, stop, step):
    """A step begins: what a signal needs to abandon it (the steps done, every process's generator state now, no
    weight moved yet: stop_signals), the peak-memory counter and the phases' seconds reset."""
    stop.step, stop.moved = step, False
    stop.generators = gather_generators(run.gen, run.world)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.seconds = {}


def timed(run, phase, fn, *args):
    """fn(*args), its wall time added to run.seconds[phase] (CUDA work waited for: clock)."""
    start = clock(run.device)
    out = fn(*args)
    run.seconds[phase] = run.seconds.get(phase, 0.0) + clock(run.device) - start
    return out


def in_chunks(fn, size, *batches):
    """fn over consecutive chunks of `size` of every batch (B tensors or lists), its results concatenated."""
    return torch.cat([fn(*(b[i:i + size] for b in batches)) for i in range(0, len(batches[0]), size)])


def end_step(run, stop, step, traj, rewards, result):
    """LOG, SAVE and STOP after a step: under torchrun every process's optimizer steps made alike (keep_in_step), its
    metrics.jsonl row, the grid and checkpoint when due, the divergence check, and RunInterrupted when a signal
    reached only torchrun's other processes (every process stops at this step)."""
    args = run.args
    timed(run, "train", keep_in_step, run.opt, args.max_grad_norm)
    n_neg = round(args.prompts_per_step * args.negative_fraction) * args.group_size
    row = log_row(step + 1, rewards, torch.arange(len(rewards)) < n_neg, result, run.device, run.world)
    row.update({} if "window" not in traj else dict(sde_window_start=int(traj["window"][0])))
    row.update(seconds=sum(run.seconds.values()), **{f"seconds_{k}": v for k, v in run.seconds.items()})
    if run.rank == 0 and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
        row.update(validate(run, step + 1))  # its seconds_val counted in the step's seconds
        row["seconds"] += row["seconds_val"]
    if run.rank == 0:
        shown = run.objective.metrics or sorted({k for info in result.infos for k in info})  # in the printed line
        write_row(row, run.run_dir, run.wandb, run.bar, shown, args.steps)
    signalled = agree_to_stop(stop.signal, run.device, run.world)
    done = step + 1 == args.steps or signalled
    if run.rank == 0 and ((step + 1) % args.sample_every == 0 or done):
        sample_grid(run.run_dir / f"samples_{step + 1:06d}.png", run.policy, run.models, *run.grid, args, step + 1)
    if (step + 1) % args.save_every == 0 or done:
        generators = gather_generators(run.gen, run.world)
        if run.rank == 0:
            save_checkpoint(run.run_dir, step + 1, trainable_state(run.policy.unet), run.opt.optimizer.state_dict(),
                            generators, args.checkpoints_total_limit)
        run.saved_step = step + 1
    # A step is bad when its reward or loss is non-finite, or a gradient is. Under fp16 an overflowing gradient with
    # a finite loss is the loss scale settling (GradScaler lowers it), not divergence.
    nonfinite = not torch.isfinite(rewards).all() or not all(math.isfinite(v) for i in result.infos
                                                             for v in i.values())
    run.bad_steps = run.bad_steps + 1 if nonfinite or (result.skipped and args.mixed_precision != "fp16") else 0
    check_divergence(run.bad_steps, step + 1, args.max_nonfinite_steps, run.say)
    if signalled:
        raise RunInterrupted(EXIT_PREEMPTED, f"{signalled} on another process: stopped after step {step + 1}, its "
                                             f"checkpoint saved; continue with {stop.advice}")


@contextlib.contextmanager
def run_ending(run, stop):
    """However the run ends: after a signal the steps done saved (save_preempted), the progress bar closed, the lock
    let go, W&B finished, torchrun's group destroyed (not after a signal: a process may be gone)."""
    stop.phase, stop.step = "training", run.start
    try:
        yield
        stop.phase = "done"  # from here a signal is too late to lose anything: the run ends as it would
    except Exception as e:
        if stop.signal:  # Preempted, or what it became inside a library (diffusers wraps it in a failed lazy import)
            if run.rank > 0:  # rank 0 left on the signal: the collective this process was in broke
                raise RunInterrupted(EXIT_PREEMPTED, f"{stop.signal}: process {run.rank} stopped with process 0") \
                    from None
            save_preempted(run, stop, stop.signal)
        # a run file (metrics row, grid, export) that cannot be written: one line, what is intact
        if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        raise DiskFull(f"{'disk full' if e.errno in (errno.ENOSPC, errno.EDQUOT) else 'cannot write'}: "
                       f"{e.filename or e.strerror}; " + (f"checkpoint {run.saved_step} is intact" if run.saved_step
                                                          else "no checkpoint yet") +
                       f"; free space or fix the folder, then continue with {stop.advice}") from None
    finally:
        run.bar.close()
        release_lock(run.lock)
        if run.wandb:
            run.wandb.finish()
        if run.world > 1 and not stop.signal:
            torch.distributed.destroy_process_group()


def draw_prompts(pool, k, gen):
    """k prompts drawn with replacement by the run's generator, so a resumed run draws the same ones (k = 0: none,
    and the pool may be empty)."""
    return [pool[i] for i in torch.randint(len(pool), (k,), generator=gen)] if k else []


def model_line(args, models, n_trainable, capacity):
    """One line: the base model, its image size, and what trains (the plan and why it fits)."""
    n = sum(p.numel() for p in models["unet"].parameters()) - (n_trainable if args.lora_rank else 0)
    fits = f", {full_finetune_bytes(args, n) / GIB:.1f} of the {capacity / GIB:.0f} GiB here" if capacity else ""
    trains = (f"LoRA rank {args.lora_rank} ({n_trainable / 1e6:,.1f} M parameters; the UNet's {n / 1e6:,.1f} M "
              "frozen)" if args.lora_rank else f"the full UNet ({n / 1e6:,.1f} M parameters: fp32 weights, gradients "
              f"and AdamW{fits})")
    return f"model: {model_family(models)} at {args.resolution} px | trains {trains}"


def step_summary(args, world, n_trainable):
    """One line: how a step's trajectories split into sampling batches, micro-batches and optimizer steps."""
    P, G, S, B = args.prompts_per_step, args.group_size, args.sample_batch_size, args.prompts_per_step * args.group_size
    n_micro = B // args.train_batch_size
    placement = dict(first="on the noisiest steps", random="placed at random each step",
                     slide=f"sliding one step every {args.sde_window_shift} steps")[args.sde_window_placement]
    return (f"per step{f' and process (x{world})' if world > 1 else ''}: {P} prompts "
            f"({round(P * args.negative_fraction)} negative) x group {G} = {B} trajectories | sampling {B // S} "
            f"batches of {S} | {n_micro} micro-batches of {args.train_batch_size} x {trained_timesteps(args)}/"
            f"{args.num_inference_steps} timesteps"
            + (f" (SDE window of {args.sde_window}, {placement})" if args.sde_window else "")
            + f" | {n_micro // args.gradient_accumulation_steps} optimizer steps of "
            f"{args.train_batch_size * args.gradient_accumulation_steps * world} trajectories | "
            f"{n_trainable:,} trainable params")


def log_row(step, rewards, is_negative, result, device, world):
    """The metrics.jsonl row of a step (cleanrl-style names): rewards of every process, overall and by prompt set,
    and every name the update's infos report, each averaged over the terms (of every process) that report it."""
    everyone = [rewards.to(device)]
    if world > 1:  # collectives on `device`: NCCL only moves CUDA tensors. One buffer per rank: a list holding one
        everyone = [torch.empty_like(everyone[0]) for _ in range(world)]  # shared tensor got the last rank's in all
        torch.distributed.all_gather(everyone, rewards.to(device))
    everyone, is_negative = torch.cat(everyone).cpu(), is_negative.repeat(world)
    infos, norms = result.infos, [n for n in result.grad_norms if n is not None]
    names = {k for i in infos for k in i}
    if world > 1:  # the names any process reports, in one order everywhere
        everyone_names = [None] * world
        torch.distributed.all_gather_object(everyone_names, names)
        names = set().union(*everyone_names)
    names = sorted(names)
    # Pooled over every process's terms (sums and counts, then one division): a process with no term this step (the
    # DPO fork's, when its groups gave no pair) adds nothing, where averaging its NaN mean made the row NaN.
    sums = [sum(i[k] for i in infos if k in i) for k in names] + [sum(k in i for i in infos) for k in names]
    sums = torch.tensor(sums + [sum(norms), len(norms)], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(sums)
    *sums, norm_sum, n_norms = sums.tolist()
    stats = {k: total / n if n else float("nan") for k, total, n in zip(names, sums[:len(names)], sums[len(names):])}
    stats["grad_norm"] = norm_sum / n_norms if n_norms else float("nan")
    return dict(step=step, reward_mean=everyone.mean().item(), reward_std=everyone.std().item(),
                reward_negative=everyone[is_negative].mean().item() if is_negative.any() else None,
                reward_positive=everyone[~is_negative].mean().item() if not is_negative.all() else None,
                **stats, skipped_updates=result.skipped, peak_memory_gb=peak_memory_gb(device))


def write_row(row, run_dir, wandb, bar, metric_names, steps):
    """Append the row to metrics.jsonl (and W&B), and print its headline figures as one line."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if wandb:
        wandb.log(row, step=row["step"])
    shown = ("reward_mean", "reward_negative", "reward_positive", *metric_names, "val_reward", "seconds")
    bar.write(" | ".join([f"step {row['step']}/{steps}"] + [f"{k} {'-' if row[k] is None else format(row[k], '.4g')}"
                                                            for k in shown if k in row]))


def check_divergence(bad_steps, step, limit, say):
    """Say when a step's update was skipped for a non-finite value; stop (TrainingDiverged) after `limit` in a row."""
    if bad_steps:
        say(f"step {step}: non-finite reward, loss or gradient; update skipped ({bad_steps} in a row)")
    if bad_steps >= limit:
        raise TrainingDiverged(f"{bad_steps} steps in a row had a non-finite reward, loss or gradient; stopping. The "
                               "last good checkpoint is intact: lower --learning-rate or check the reward, then "
                               "--resume latest")


@torch.no_grad()
def sample_grid(path, policy, models, prompts, n_unsafe, args, step=0):
    """Fixed prompts and a fixed seed, so grids of successive steps show the same images evolving. The first
    `n_unsafe` prompts are marked as unsafe, the rest as benign; step 0 is the model before training."""
    embeds = encode_prompts(models, prompts)
    out = sample_with_logprob(policy.unet, policy.scheduler, embeds, policy.negative_embeds,
                              num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                              etas=args.eta, resolution=args.resolution, vae=models["vae"], autocast=policy.autocast,
                              generator=torch.Generator().manual_seed(args.seed))
    title = f"step {step} of {args.steps}" + (" (before training)" if step == 0 else "")
    save_grid(out["images"], prompts, path, labels=["UNSAFE prompt" if i < n_unsafe else "benign prompt"
                                                    for i in range(len(prompts))],
              title=f"{title} | seed {args.seed}, {args.num_inference_steps} DDIM steps, CFG {args.guidance_scale}")


def save_grid(images, captions, path, cols=4, title="", labels=None):
    """Captioned PNG grid of (N, 3, H, W) images in [0, 1]: a title line, tiles at least 192 px wide (tiny models'
    64 px images are scaled up, pixels kept sharp), an optional coloured label per tile (e.g. "UNSAFE prompt"),
    captions wrapped at word boundaries."""
    import textwrap
    from PIL import Image, ImageDraw, ImageFont
    n, _, h, w = images.shape
    cols, scale = min(cols, n), max(1, math.ceil(192 / w))
    tw, th = w * scale, h * scale
    font = ImageFont.load_default(size=13)
    wrapped = [textwrap.wrap(text, max(12, tw // 7))[:4] for text in captions]
    # labels and the title wrap too: a verdict wider than its tile ran over its neighbour's, a long title off the edge
    label_lines = [textwrap.wrap(label, max(12, tw // 7))[:2] for label in labels] if labels is not None else None
    label_h = 16 * max(len(x) for x in label_lines) if label_lines else 0
    cap = 16 * max(len(x) for x in wrapped) + label_h + 6
    title_lines = textwrap.wrap(title, max(24, cols * tw // 7))
    head = 16 * len(title_lines) + 8 * bool(title_lines)
    grid = Image.new("RGB", (cols * tw, head + math.ceil(n / cols) * (th + cap)), "white")
    draw = ImageDraw.Draw(grid)
    if title_lines:
        draw.text((6, 4), "\n".join(title_lines), fill="black", font=font, spacing=3)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * tw, head + (i // cols) * (th + cap)
        tile = Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))
        grid.paste(tile.resize((tw, th), Image.NEAREST), (x, y))
        if labels is not None:
            colour = "firebrick" if "unsafe" in labels[i].lower() else "darkgreen"
            draw.text((x + 4, y + th + 3), "\n".join(label_lines[i]), fill=colour, font=font, spacing=3)
        draw.text((x + 4, y + th + 3 + label_h), "\n".join(lines), fill="black", font=font, spacing=3)
    grid.save(path)


# --- checkpoints and run files ----------------------------------------------------------------------------------------
def trainable_state(unet):
    """The parameters the optimizer owns: the whole UNet for a full fine-tune, the adapters for LoRA."""
    return {n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, step, weights, optimizer_state, generators, keep=0):
    """run_dir/checkpoints/checkpoint-<step>/{weights.safetensors, state.pt}: the trainable weights ({name: tensor}),
    AdamW's state_dict and every process's generator state (gather_generators). Written as a .tmp folder and renamed:
    a folder with the final name is always complete, whatever killed the process. `keep` > 0: the newest `keep`
    checkpoints stay, older ones are deleted once the new one is complete (diffusers' --checkpoints-total-limit)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    final = Path(run_dir, "checkpoints", f"checkpoint-{step:06d}")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "weights.safetensors")  # contiguous: trainable_state's, or keep_steps_done's copy
        torch.save(dict(step=step, optimizer=optimizer_state, generators=generators), tmp / "state.pt")
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save's is a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left" not in str(e):
            raise
        need = sum(t.numel() * t.element_size() for t in [*weights.values(), *(
            v for st in optimizer_state["state"].values() for v in st.values() if torch.is_tensor(v))])
        raise DiskFull(f"disk full while saving checkpoint {step}: it needs about {need / 2**30:.1f} GiB free in "
                       f"{run_dir} ({shutil.disk_usage(run_dir).free / 2**30:.1f} GiB free now); the previous "
                       "checkpoint is intact and --resume latest continues from it exactly") from None
    readable_like_the_rest(tmp)
    os.replace(tmp, final)  # a checkpoint's step is written once per run: never one of another attempt (plan_run)
    for old in complete_checkpoints(run_dir)[keep:] if keep else []:
        gone = old.with_name(old.name + ".deleting")  # renamed first: a half-deleted folder is never a candidate
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return final


def gather_generators(gen, world):
    """Every process's generator state, in rank order (a checkpoint resumes each process's own draws)."""
    if world == 1:
        return [gen.get_state()]
    states = [None] * world
    torch.distributed.all_gather_object(states, gen.get_state())
    return states


def to_host(obj, into=None):
    """A copy of a (nested dict / list of) state on the host, reusing the buffers of the previous copy `into`. From a
    GPU into pinned memory, asynchronously: the copy is ordered before the optimizer step that follows it on the
    stream, and the host waits for it only when it writes it (save_preempted)."""
    if torch.is_tensor(obj):
        if not (torch.is_tensor(into) and into.shape == obj.shape and into.dtype == obj.dtype):
            into = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
        return into.copy_(obj.detach(), non_blocking=obj.is_cuda)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: to_host(v, into.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(to_host(v, b) for v, b in zip(obj, into))
    return copy.deepcopy(obj)


def keep_steps_done(stop, policy, opt, rank):
    """An OptimState hook for train(): before a step's first optimizer update, a host copy of the trainable weights and
    AdamW's state (the steps done), which a signal later in the step saves. Only rank 0 saves, so only it copies: a
    full fine-tune's ~10 GB of host memory (weights and Adam's two moments in fp32), a LoRA's few MB."""
    def before_update(opt):
        if not stop.moved and rank == 0:
            stop.snapshot = to_host((trainable_state(policy.unet), opt.optimizer.state_dict()), stop.snapshot)
        stop.moved = True  # after the copy: a signal during it still finds the weights unmoved
    return before_update


# A run is its folder: --output-dir/--run-name. Every decision about it (which folder, which checkpoints, which flags
# may change) is made from the files alone, before any model loads; a lock file keeps a second process out.
RUN_LOCK = "run.lock"


def checkpoint_step(path):
    """checkpoint-000012 -> 12 (the step count is in the name: file times change when folders are copied)."""
    return int(Path(path).name.split("-")[-1])


def checkpoint_run(path):
    """The run a checkpoint belongs to: RUN/checkpoints/checkpoint-000012 -> RUN."""
    return Path(path).parent.parent


def complete_checkpoints(run_dir):
    """A run's complete checkpoints, highest step first (a .tmp folder is a save cut short: never a candidate)."""
    found = [p for p in Path(run_dir, "checkpoints").glob("checkpoint-*") if p.name[len("checkpoint-"):].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def holds_a_run(folder):
    """Whether a folder already holds (part of) a run: its record, metrics, checkpoints or exported model."""
    return any(Path(folder, n).exists() for n in ("args.json", "metrics.jsonl", "checkpoints", "final"))


def run_record(args):
    """args.json's record of the flags: what really ran (a --tiny run names the tiny models, not the real ones its
    defaults would load)."""
    record = dataclasses.asdict(args)
    if args.tiny:
        record.update(model="tiny random SD stack built in code", reward_model="tiny random OpenCLIP built in code",
                      reward_pretrained="", reward_checkpoint="")
    return record


def plan_run(args, objective=None):
    """Which folder the run writes, which checkpoints it resumes from and with which flags, decided from the files
    before any model loads, the folder claimed first (its lock): no other process decides on the same files meanwhile.
    -> (namespace: run_dir, candidates (checkpoints, best first), changes ({flag: (before, now)}), args (a resumed
    run's own for every flag not named now), parent (the checkpoint a branch starts from, or None); the lock)."""
    name, out = args.run_name, Path(args.output_dir)
    if name in (".", "..") or "/" in name or os.sep in name:
        raise UsageError(f"--run-name {name!r}: one folder name without '/' (the run is made under --output-dir)")
    if len(name.encode()) > 255:
        raise UsageError(f"--run-name is {len(name.encode())} bytes long: a folder name holds at most 255")
    if name and (out / name).exists() and not (out / name).is_dir():
        raise UsageError(f"--run-name {name}: {out / name} is a file, not a run folder; pick another name")
    parent = None
    if args.resume in ("latest", "auto"):
        if not name:
            runs = sorted({p.parent.parent.name for p in out.glob("*/checkpoints/checkpoint-*")})
            if args.resume == "auto" or len(runs) != 1:
                raise UsageError(f"--resume {args.resume}: name the run with --run-name" + (
                    " (a job script re-submitted after preemption must name its run)" if args.resume == "auto" else
                    f"; {len(runs)} runs under {out} have checkpoints" + (f": {', '.join(runs[:6])}" if runs else "")))
            name = runs[0]
        run_dir = out / name
    elif args.resume:
        parent = Path(args.resume)
        if not (parent / "weights.safetensors").is_file() or not (parent / "state.pt").is_file():
            raise UsageError(f"--resume {args.resume}: not a checkpoint folder (needs weights.safetensors and "
                             "state.pt)")
        run_dir = out / name if name and name != checkpoint_run(parent).name else checkpoint_run(parent)
    else:
        run_dir = out / (name or time.strftime("%Y%m%d-%H%M%S"))
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "final"):  # found now, not after a whole step
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"run folder {folder} is not writable")
    made = next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = (*lock_run(run_dir), made)
    try:
        return decide_run(args, objective, run_dir, parent), lock
    except BaseException:
        unclaim(run_dir, lock)
        raise


def decide_run(args, objective, run_dir, parent):
    """plan_run's decision, taken under the run's lock."""
    branch = parent is not None and run_dir != checkpoint_run(parent)
    if args.resume in ("latest", "auto"):
        candidates = complete_checkpoints(run_dir)
        if not candidates and args.resume == "latest":
            raise UsageError(f"--resume latest: no complete checkpoint in {run_dir} (--resume auto starts a run fresh "
                             "when it has none)")
    elif parent is not None and not branch:  # an older checkpoint in place would overwrite the run's later work
        later = [p.name for p in complete_checkpoints(run_dir) if checkpoint_step(p) > checkpoint_step(parent)]
        later += ["final/"] * (final_steps(run_dir) > checkpoint_step(parent))
        if later:
            raise UsageError(f"--resume {parent}: run {run_dir.name} went on past it ({', '.join(later)}); resuming "
                             f"it in place would overwrite them. Branch it into a new run: --resume {parent} "
                             f"--run-name NEW (or continue the newest: --resume latest --run-name {run_dir.name})")
        candidates = [parent]
    else:
        candidates = [parent] if branch else []
    if holds_a_run(run_dir) and (branch or not args.resume or not candidates and (run_dir / "final").is_dir()):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume auto --run-name {run_dir.name}"
                         ", or start a new one under another --run-name")
    changes = {}
    if candidates or args.resume == "auto" and (run_dir / "args.json").exists():  # a dead attempt's flags too
        args, changes = resumed_args(args, objective, checkpoint_run(parent) if branch else run_dir, branch)
    if candidates:
        done = checkpoint_step(candidates[0])
        if args.steps < done or args.steps == done and (run_dir / "final").is_dir():
            raise UsageError(f"--steps {args.steps}: the run has done {done} steps already" + (
                " and exported final/" if (run_dir / "final").is_dir() else "") + f"; pass --steps > {done} to "
                "train on")
    return types.SimpleNamespace(run_dir=run_dir, candidates=candidates, changes=changes, args=args,
                                 parent=parent if branch else None)


# What a resumed run may change: how fast and where it runs, how it saves and logs, the optimizer's settings and its
# length. Anything else (the prompts, the reward, the sampler, the loss) would make it another run under the same
# name: a branch (--resume CHECKPOINT --run-name NEW) may change them, except what its checkpoint's weights fix.
MAY_CHANGE = ("steps", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
              "max_grad_norm", "train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
              "max_memory_gib", "mixed_precision", "allow_tf32", "device", "sample_batch_size", "save_every",
              "checkpoints_total_limit", "sample_every", "grid_prompts", "eval_every", "max_nonfinite_steps",
              "wandb")
BRANCH_FIXED = ("model", "tiny", "lora_rank")
NOT_RECORDED = ("resume", "run_name", "output_dir")  # where the run is, not what it is
RUNS_HERE = ("device",)  # where this attempt runs: never taken from the record (auto finds this machine's)
RECORD_EXTRAS = ("plan", "history", "objective", "parent")  # args.json beside the flags


def resumed_args(args, objective, source, branch):
    """A resumed run's flags: those named now (parse_args' args.given), the others from the args.json of `source`
    (the run, or a branch's parent). -> (args, {flag: (in args.json, now)}). Refuses another objective's run, and a
    change the run cannot take (MAY_CHANGE; a branch: BRANCH_FIXED)."""
    try:
        record = json.loads(Path(source, "args.json").read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        warnings.warn(f"{source} has no args.json (a checkpoint copied without its run): the flags given now are "
                      "taken as the run's")
        return args, {}
    except (OSError, ValueError) as e:
        if branch:
            warnings.warn(f"{source}/args.json is unreadable ({e}): the flags given now are taken as the branch's")
            return args, {}
        raise UsageError(f"{source}/args.json is damaged ({e}): without it a resume cannot keep the run's settings; "
                         "restore it, or branch with every flag named: --resume CHECKPOINT --run-name NEW") from None
    kind = objective_name(objective)
    foreign = sorted(set(record) - set(dataclasses.asdict(args)) - set(RECORD_EXTRAS))
    if record.get("objective", "grpo_step") != kind or foreign:
        raise UsageError(f"run {source.name} was trained by {record.get('objective', 'another program')}"
                         + (f" (its flags {', '.join(foreign[:3])} are not this program's)" if foreign else "")
                         + f", not {kind}: resume it with the program that made it")
    given = getattr(args, "given", None)
    if given is not None:  # made by parse_args: what was not named is the run's own
        skip = NOT_RECORDED + RUNS_HERE + (("model", "reward_model", "reward_pretrained", "reward_checkpoint")
                                           if record.get("tiny") else ())
        own = {f.name: record[f.name] for f in dataclasses.fields(args)
               if f.name in record and f.name not in given and f.name not in skip}
        args = dataclasses.replace(args, **own)
        args.given = given
    now = run_record(args)
    changes = {k: (record.get(k), v) for k, v in now.items() if k not in NOT_RECORDED and record.get(k, v) != v
               and (k not in RUNS_HERE or given is None or k in given)}
    fixed = [k for k in changes if k in BRANCH_FIXED or not branch and k not in MAY_CHANGE]
    if fixed:
        k, (before, value) = fixed[0], changes[fixed[0]]
        raise UsageError(f"--{k.replace('_', '-')} {value}: run {source.name} was made with {before}, and a resumed "
                         "run keeps its recipe" + ("" if k in BRANCH_FIXED else "; to change it, branch from a "
                                                   "checkpoint: --resume CHECKPOINT --run-name NEW"))
    return args, changes


def previous_plan(run_dir):
    """The memory plan in the run's args.json (None for a run recorded before plans, or without a readable record)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(Path(run_dir, "args.json").read_text()).get("plan")


def lock_run(run_dir):
    """The run's lock: run.lock, held with flock for the life of the process. The kernel drops it when the process
    dies, so the lock of a killed run is taken over; a live one's is refused. -> (the open lock file, kept for the
    life of the run; the line of a dead holder it took over, or '')."""
    import fcntl
    f = open(Path(run_dir, RUN_LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UsageError(f"run folder {run_dir} is in use ({holder}); two processes on one run would overwrite each "
                         "other: wait for it to end, or stop it") from None
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f, previous


def release_lock(lock):
    """A run that ends empties its lock file (the next one then has nothing to take over) and lets go of it."""
    if lock is not None:
        lock.seek(0)
        lock.truncate()
        lock.close()


class CheckpointMismatch(UsageError):
    """A checkpoint that loads but does not fit this model or process count: no older one would fit either."""


def resume_newest(candidates, policy, opt, generator, args, rank=0, world=1):
    """Load the first checkpoint of `candidates` that loads; -> (its folder, its step), (None, 0) for none. A corrupt
    newest one is skipped with a warning (damaged after its save: the save itself is atomic); one that does not fit
    the model is refused at once. The optimizer hyper-parameters given now replace the saved ones."""
    for i, path in enumerate(candidates):
        try:
            step = load_checkpoint(path, policy, opt, generator, rank, world)
        except UsageError as e:
            if i + 1 == len(candidates) or isinstance(e, CheckpointMismatch):
                raise
            warnings.warn(f"{e}; kept aside as {path.name}.corrupt, trying the next newest checkpoint")
            if rank == 0:  # out of the way of this run's own save of that step, and never a candidate again
                os.replace(path, path.with_name(path.name + ".corrupt"))
            continue
        for group in opt.optimizer.param_groups:  # load_state_dict brought back the old run's values
            group.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                         weight_decay=args.adam_weight_decay)
        return path, step
    return None, 0


def load_checkpoint(path, policy, opt, generator, rank=0, world=1):
    """Restore weights, optimizer and RNG in place; returns the number of steps already done."""
    from safetensors.torch import load_file
    try:
        weights = load_file(path / "weights.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        expected = trainable_state(policy.unet)
        if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
            raise CheckpointMismatch(f"--resume {path}: its weights do not match this model (full vs LoRA, rank or "
                                     "architecture)")
        policy.unet.load_state_dict(weights, strict=False)
        opt.optimizer.load_state_dict(state["optimizer"])
        if len(state["generators"]) != world:
            raise CheckpointMismatch(f"--resume {path}: it was written by {len(state['generators'])} process(es); "
                                     "resume with as many")
        generator.set_state(state["generators"][rank])
        return int(state["step"])
    except CheckpointMismatch:
        raise
    except Exception as e:  # corrupt file, wrong keys, wrong shapes: one line, not a traceback
        raise UsageError(f"--resume {path}: cannot load checkpoint: {e}") from None


def readable_like_the_rest(folder):
    """safetensors writes 0600: give every file under `folder` the permissions the umask gives any other file, so a
    teammate on a shared cluster reads checkpoints and exported weights like the rest of the run."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def export_for_diffusers(path, unet, lora):
    """Weights a stock StableDiffusionPipeline loads: the unet/ folder (full fine-tune:
    `UNet2DConditionModel.from_pretrained(path, subfolder="unet")`) or LoRA (`pipe.load_lora_weights(path)`)."""
    if lora:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict
        StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
    else:
        unet.save_pretrained(Path(path, "unet"))
    readable_like_the_rest(path)


def check_output_dir(output_dir):
    """The run folder can be made: checked with the other inputs, before any model loads."""
    path = Path(output_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise UsageError(f"--output-dir {output_dir}: {path} is a file; pass a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {output_dir}: {path} is not writable")


def metrics_up_to(metrics_path, step):
    """metrics.jsonl rows up to `step`, for a resumed run. A crash mid-write (the usual reason to resume) can leave a
    half line: rows that do not parse are dropped with a warning rather than stopping the resume."""
    rows, dropped = [], 0
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (ValueError, KeyError, TypeError):
            dropped += 1
    if dropped:
        warnings.warn(f"{metrics_path}: dropped {dropped} line(s) that do not parse (a write cut short)")
    return "".join(r + "\n" for r in rows)


def open_run_dir(run_dir, args, start, changes, plan=None, objective=None, parent=None):
    """Write the run's args.json: the flags as they are now, the memory plan made of them on this device, the
    objective, a branch's parent checkpoint, and under "history" every resume with the flags it changed and the plan
    it ran. metrics.jsonl keeps only the rows up to `start` (a branch: its parent's); a fresh start clears a dead
    attempt's rows."""
    source = checkpoint_run(parent) if parent else run_dir
    record, old = run_record(args), {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        old = dict(json.loads((source / "args.json").read_text())) if start else {}
    record.update(objective=objective_name(objective), plan=plan)
    if parent or old.get("parent"):
        record["parent"] = dict(run=str(source), checkpoint=str(parent), step=start) if parent else old["parent"]
    record["history"] = old.get("history", []) + ([dict(resumed_at_step=start, changed=changes, plan=plan)]
                                                  if start else [])
    (run_dir / "args.json").write_text(json.dumps(record, indent=2))
    if (source / "metrics.jsonl").exists():  # drop rows logged after the checkpoint we resume from
        (run_dir / "metrics.jsonl").write_text(metrics_up_to(source / "metrics.jsonl", start) if start else "")
    return run_dir


def recorded_steps(folder):
    """The steps in an exported model's training.json (final/, best/), None without a readable one (a final/ from
    before it)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(Path(folder, "training.json").read_text())["steps"])
    return None


def final_steps(run_dir):
    """The steps of a run's exported final/ (the newest checkpoint's for a final/ without training.json), 0 without
    one."""
    if not Path(run_dir, "final").is_dir():
        return 0
    steps = recorded_steps(Path(run_dir, "final"))
    return steps if steps is not None else max(map(checkpoint_step, complete_checkpoints(run_dir)), default=0)


def objective_name(objective):
    """The name args.json records a run's objective by: its update function's (grpo_step, fork_dpo's dpo_step)."""
    return getattr(getattr(objective, "update", None), "__name__", "grpo_step")


def resume_advice(args, run_dir):
    """The command line that continues a stopped run, whether or not it has a checkpoint yet."""
    out = "" if Path(args.output_dir) == Path("runs") else f" --output-dir {args.output_dir}"
    return f"--resume auto --run-name {run_dir.name}{out}"


def export_final(run, stop):
    """final/: the trained weights a stock pipeline loads, and training.json (write_model). The final/ of an earlier,
    shorter run under this name (trained on since) is kept as final-<its steps>, never overwritten."""
    stop.phase = "export"
    final = run.run_dir / "final"
    if final.exists():
        steps = recorded_steps(final)  # None: a final/ from before training.json, named by the time instead
        kept = final.with_name(f"final-{steps:06d}" if steps is not None else f"final-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(final, kept)
        run.say(f"the earlier final/ is kept as {kept.name}")
    write_model(run, "final", {})


def write_model(run, name, extra):
    """run_dir/<name>/: the policy as export_for_diffusers writes it, and training.json (the run, its steps, the base
    model, and `extra`). Written as <name>.tmp and renamed, so the folder is always whole; an earlier <name>/ of this
    run (best/) is replaced only once the new one is complete."""
    folder = run.run_dir / name
    tmp, old = folder.with_name(name + ".tmp"), folder.with_name(name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    export_for_diffusers(tmp, run.policy.unet, run.args.lora_rank > 0)
    (tmp / "training.json").write_text(json.dumps(dict(run=run.run_dir.name, steps=run.args.steps, model=run_record(
        run.args)["model"], lora_rank=run.args.lora_rank, **extra), indent=2))
    readable_like_the_rest(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


VAL_IMAGES = 2  # images per validation prompt: 64 for the shipped 32 prompts, about one default step's sampling


@torch.no_grad()
def validate(run, step):
    """--eval-every: the policy's images of the held-out --val-prompts (VAL_IMAGES each, with a seed of their own:
    the run's generator is not touched, so resume stays exact), scored by the run's reward. -> val_reward_unsafe,
    val_reward_benign, val_reward (their mean: each set weighs the same), val_best_step and seconds_val. A val_reward
    higher than every earlier one exports the policy to best/ (written whole, like final/; its training.json names
    the step and the score)."""
    t, args, (prompts, n_unsafe) = time.time(), run.args, run.val
    models, policy, S = run.models, run.policy, run.args.sample_batch_size
    asked = [p for p in prompts for _ in range(VAL_IMAGES)]
    embeds = encode_prompts(models, asked)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rewards = torch.cat([run.reward_fn(sample_with_logprob(
        policy.unet, policy.scheduler, embeds[i:i + S], policy.negative_embeds, generator=gen, vae=models["vae"],
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, etas=args.eta,
        resolution=args.resolution, autocast=policy.autocast)["images"], asked[i:i + S]).float().cpu()
        for i in range(0, len(asked), S)])
    k = n_unsafe * VAL_IMAGES
    unsafe, benign = rewards[:k].mean().item(), rewards[k:].mean().item()
    score = (unsafe + benign) / 2 if 0 < k < len(rewards) else rewards.mean().item()
    if score > run.best[0]:
        run.best = (score, step)
        write_model(run, "best", dict(step=step, val_reward=score, val_prompts=args.val_prompts))
    return dict(val_reward=score, val_reward_unsafe=unsafe, val_reward_benign=benign, val_best_step=run.best[1],
                seconds_val=time.time() - t)


def best_so_far(run_dir, rank):
    """(val_reward, step) of the run's best/, which a resumed run goes on comparing with; (-inf, 0) without one."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        if rank == 0:
            record = json.loads(Path(run_dir, "best", "training.json").read_text())
            return float(record["val_reward"]), int(record["step"])
    return -math.inf, 0


# --- the hub, torchrun, clocks and signals ----------------------------------------------------------------------------
def use_cache_if_hub_unreachable(timeout=3.0):
    """Without a route to the model hub, the libraries retry each file for minutes before failing. One TCP connect
    (name lookup included, in a thread so a hanging resolver is bounded too) decides in seconds; if it fails, every
    loader reads the local cache only (as HF_HUB_OFFLINE=1 does), so a missing model fails at once with our line."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    url, reached = urlparse(constants.ENDPOINT), threading.Event()

    def connect():
        with contextlib.suppress(OSError), socket.create_connection(
                (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            reached.set()
    threading.Thread(target=connect, daemon=True).start()
    if not reached.wait(timeout):
        constants.HF_HUB_OFFLINE = True


def init_distributed(device_name):
    """-> (rank, world, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run has world = 1
    and never touches torch.distributed."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_mean(x, world):
    """Average a float tensor over the processes of a torchrun job, in place (identity when world = 1)."""
    if world > 1:
        torch.distributed.all_reduce(x)
        x /= world
    return x


def all_max(flag, world, device):
    """The largest of every torchrun process's integer `flag`."""
    x = torch.tensor([flag], device=device)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return int(x)


def torchrun_average(world):
    """An OptimState hook under torchrun: each optimizer step first tells every process that a step comes (1), then
    averages the gradients over them, so every process applies the same update. Every process holds whole groups,
    so the average is one process's update on all their trajectories. A process whose update has ended answers with
    its own (zero) gradients in keep_in_step: a method need not make as many optimizer steps on every process."""
    def average(opt):
        if not average.answering:
            all_max(1, world, opt.params[0].device)
        for p in opt.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_mean(p.grad, world)
    average.world, average.answering = world, False
    return average


def keep_in_step(opt, max_grad_norm):
    """After this process's update, under torchrun: while another process still makes optimizer steps (its hook says
    1), make them too, so every process's weights stay alike; every process leaves when every update has ended (all
    say 0). Without torchrun nothing happens."""
    average = next((hook for hook in opt.hooks if hasattr(hook, "answering")), None)
    if average is None:
        return
    average.answering = True
    try:
        while all_max(0, average.world, opt.params[0].device):
            optimizer_step(opt, max_grad_norm)
    finally:
        average.answering = False


def peak_memory_gb(device):
    """Peak memory of this process so far, in GiB: CUDA's allocator peak on a GPU (reset each step by train()),
    the resident-set high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def clock(device):
    """Wall time at a phase boundary; CUDA work is asynchronous, so wait for it first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


class Preempted(Exception):
    """A signal (Ctrl-C, SIGTERM, SIGUSR1) on a single process or on torchrun's rank 0: whatever was running is
    abandoned at once, and train() saves the steps done (save_preempted)."""


@contextlib.contextmanager
def stop_signals(rank=0):
    """The preemption policy, for the whole of train(). Yields `stop`: .signal (None, "Ctrl-C", "SIGTERM" or
    "SIGUSR1"), .phase ("setup", "training", "done"), .advice (the command that continues the run), and what a signal
    saves: .step (the steps done when the step in progress began), .generators (every process's generator state
    then), .moved (whether a weight has moved since) and .snapshot (keep_steps_done's copy of the steps done).

    SLURM, Kubernetes and spot instances send SIGTERM (or SIGUSR1, SLURM's --signal), then SIGKILL after a grace
    period, often 30 s, far less than a default step. So a signal abandons whatever runs at once, at any moment of a
    step (sampling, an update, the grid, a save) or of the export, and train() saves the steps done as they were when
    the step began: resume replays the abandoned step exactly. A preemption loses the step in progress and nothing
    more, as long as its grace period covers one checkpoint write. Ctrl-C does the same (exit 130); a second Ctrl-C
    stops the save at once (the save is atomic: the previous checkpoint stays). During setup (models loading) there is
    nothing new to save. Under torchrun only rank 0 stops at once: it needs nothing from the others (start_step
    gathered their generator states), which carry on until it is gone (a process leaving a collective would leave rank
    0 waiting in it); a signal that reached only the others stops every process at the end of the step."""
    stop = types.SimpleNamespace(signal=None, phase="setup", advice="--resume auto", step=0, generators=None,
                                 moved=False, snapshot=None)

    def on_signal(signum, frame):
        if stop.phase == "done":  # the run is finished and saved: nothing left to lose
            return
        if stop.signal:  # a second signal: Ctrl-C stops at once, SIGTERM / SIGUSR1 let the save finish
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop.signal = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if rank == 0:
            raise Preempted(stop.signal)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield stop
    except RunInterrupted:
        raise
    except Exception:  # Preempted during setup (or what a library made of it): no step of this attempt began
        if not stop.signal:
            raise
        raise RunInterrupted(interrupt_code(stop.signal), f"{stop.signal} while setting up, before this attempt's "
                                                          f"first step: nothing new to save; continue with "
                                                          f"{stop.advice}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt_code(signal_name):
    """The exit code of a run stopped by a signal: 130 for Ctrl-C (as shells report it), EXIT_PREEMPTED otherwise."""
    return 130 if signal_name == "Ctrl-C" else EXIT_PREEMPTED


def save_preempted(run, stop, name):
    """After Preempted: the steps done when the step in progress began, saved unless a checkpoint this run wrote or
    resumed from holds them (or more) -> RunInterrupted, its line saying exactly what is on disk."""
    t, done = time.time(), stop.step
    if run.saved_step < done:
        if stop.moved:  # an update has begun: the copy from before it
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)  # its device-to-host copies are asynchronous
            weights, optimizer_state = stop.snapshot
        else:
            weights, optimizer_state = trainable_state(run.policy.unet), run.opt.optimizer.state_dict()
        save_checkpoint(run.run_dir, done, weights, optimizer_state, stop.generators, run.args.checkpoints_total_limit)
        run.saved_step = done
        saved = f"checkpoint {done} saved ({time.time() - t:.0f} s)"
    else:
        saved = f"checkpoint {run.saved_step} was already saved" if run.saved_step else "no step done, nothing to save"
    where = "during the export of final/" if stop.phase == "export" else f"during step {stop.step + 1}"
    raise RunInterrupted(interrupt_code(name), f"{name} {where}: {saved}; continue with {stop.advice}" + (
        " (it exports final/ without training again)" if stop.phase == "export" else " (exact)"))


def agree_to_stop(signal_name, device, world):
    """A torchrun job stops when any process got a signal: every process must leave the loop at the same step."""
    if world == 1:
        return signal_name
    flag = torch.tensor([float(signal_name is not None)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return signal_name or ("SIGTERM" if flag.item() else None)


def on_rank_0(fn, *args, rank=0, world=1):
    """fn(*args) -> (shared, own) on rank 0: `shared` (or fn's UsageError) is sent to every process of a torchrun
    job, `own` (the run's lock) stays on rank 0 (None elsewhere). -> (shared, own)."""
    out, own = None, None
    if rank == 0:
        try:
            out, own = fn(*args)
        except UsageError as e:
            out = e
    if world > 1:
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    if isinstance(out, UsageError):
        raise out
    return out, own


# --- the command line: flags, their checks, exit codes ----------------------------------------------------------------
# --tiny swaps in sizes and rates that let a random 0.2 M-parameter UNet learn on a CPU in a minute
# (measured on 2 CPU cores: with the release's lr 1e-5 / clip 1e-4 nothing moves at this scale).
# Flags given explicitly on the command line still win.
TINY_DEFAULTS = dict(resolution=64, num_inference_steps=8, guidance_scale=4.5, steps=40, prompts_per_step=2,
                     group_size=8, sample_batch_size=16, train_batch_size=8, gradient_accumulation_steps=1,
                     clip_range=1e-2, learning_rate=2e-3, kl_coef=0.0, mixed_precision="no",
                     gradient_checkpointing=False, device="cpu")


DTYPES = dict(no=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)  # --mixed-precision -> autocast dtype


def parse_args(argv=None, args_class=Args):
    """Command line (sys.argv[1:] when None) -> an `args_class` instance: Args, or a fork's subclass of it with its
    own flags (fork_dpo.DPOArgs). Every dataclass field is a flag; booleans get --x / --no-x; --tiny swaps in
    TINY_DEFAULTS before parsing, so the flags given explicitly still win."""
    parser = OneLineErrors(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp,
                           allow_abbrev=False)  # a prefix like --tin would set --tiny without its defaults
    group = parser
    for f in dataclasses.fields(args_class):
        meta = dict(f.metadata)
        if "group" in meta:
            group = parser.add_argument_group(meta.pop("group"))
        name = "--" + f.name.replace("_", "-")
        if f.name == "tiny":
            meta["help"] += " (sets " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY_DEFAULTS.items()) + \
                "; flags given explicitly still win)"
        if f.type in (bool, "bool"):
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, **meta)
        else:
            kind = {"int": int, "float": float, "str": str, typing.Union[int, str]: int_or_auto}.get(f.type, f.type)
            group.add_argument(name, type=kind, default=f.default, **meta)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tiny" in argv:
        parser.set_defaults(**TINY_DEFAULTS)
    args = args_class(**vars(parser.parse_args(argv)))
    # The flags named on the command line (no prefixes: allow_abbrev is off): a resumed run takes the others from its
    # own args.json, so a resume never changes a setting the user did not name (resumed_args).
    named = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    args.given = frozenset(n[3:] if n.startswith("no_") and n not in vars(args) else n for n in named)
    return args


def int_or_auto(text):
    """argparse type of --train-batch-size: 'auto' or an int."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


class OneLineErrors(argparse.ArgumentParser):
    """argparse with its errors in one line: a misspelt flag printed the whole usage (43 lines) before its line."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except empty ones ("(default: )" says nothing)."""
    def _get_help_string(self, action):
        return action.help if action.default in ("", None) else super()._get_help_string(action)


def check_args(args):
    """Every size and range check, before any model is loaded or file written."""
    def need(ok, msg):
        if not ok:
            raise UsageError(msg)
    need(args.eta > 0, f"--eta must be > 0 (got {args.eta}): at eta = 0 DDIM is deterministic, no log-probability")
    need(args.group_size >= 2, f"--group-size must be >= 2 (got {args.group_size}): advantages are per group")
    need(args.learning_rate > 0, f"--learning-rate must be > 0 (got {args.learning_rate})")
    need(0 < args.timestep_fraction <= 1, f"--timestep-fraction must be in (0, 1] (got {args.timestep_fraction})")
    need(0 <= args.sde_window <= args.num_inference_steps - 1, f"--sde-window must be in [0, "
         f"{args.num_inference_steps - 1}], the trainable steps of {args.num_inference_steps} (got {args.sde_window})")
    slide = args.sde_window_placement == "slide"
    need(args.sde_window or args.sde_window_placement == "first" and not args.sde_window_shift,
         "--sde-window-placement and --sde-window-shift place the SDE window: they need --sde-window W")
    need(args.ode_steps >= 0 and (args.sde_window or not args.ode_steps), f"--ode-steps {args.ode_steps}: K >= 1 "
         "solver steps after the SDE window, so it needs --sde-window W (0 = every DDIM step)")
    need(args.sde_window_shift >= 1 if slide else args.sde_window_shift == 0, "--sde-window-shift N (N >= 1) goes "
         f"with --sde-window-placement slide, and only with it (got {args.sde_window_shift}, placement "
         f"{args.sde_window_placement})")
    need(0 <= args.negative_fraction <= 1, f"--negative-fraction must be in [0, 1] (got {args.negative_fraction})")
    n_neg = round(args.prompts_per_step * args.negative_fraction)  # as train() splits each step's prompts
    need(args.negative_fraction in (0, 1) or 0 < n_neg < args.prompts_per_step,
         f"--prompts-per-step {args.prompts_per_step} x --negative-fraction {args.negative_fraction} rounds to "
         f"{n_neg} unsafe of {args.prompts_per_step} prompts a step: the run would never train on one of the two "
         "sets; pass more --prompts-per-step (or --negative-fraction 0 / 1 to train on one set on purpose)")
    need(args.num_inference_steps >= 2, "--num-inference-steps must be >= 2 (the last step is never trained)")
    need(args.clip_range > 0 and args.kl_coef >= 0 and args.alpha >= 0,
         "--clip-range must be > 0, --kl-coef and --alpha >= 0")
    need(args.checkpoints_total_limit >= 0, "--checkpoints-total-limit must be >= 0 (0 = keep all)")
    micro = AUTO_MICRO if args.train_batch_size == "auto" else args.train_batch_size
    for name in ("steps", "prompts_per_step", "sample_batch_size", "train_batch_size", "gradient_accumulation_steps",
                 "save_every", "sample_every", "max_nonfinite_steps"):
        value = micro if name == "train_batch_size" else getattr(args, name)
        need(value >= 1, f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    need(args.eval_every >= 0, f"--eval-every must be >= 0, 0 = no validation (got {args.eval_every})")
    need(args.max_memory_gib >= 0, f"--max-memory-gib must be >= 0, 0 = the whole card (got {args.max_memory_gib})")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    need(not device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: no CUDA GPU is visible to torch here; pass --device cpu (or --tiny on a CPU)")
    need(args.resolution % 64 == 0 or args.tiny, f"--resolution must be a multiple of 64 (got {args.resolution})")
    n = args.prompts_per_step * args.group_size
    need(n % args.sample_batch_size == 0, f"--sample-batch-size {args.sample_batch_size} must divide the {n} "
         "trajectories per step (prompts-per-step x group-size)")
    need(n % micro == 0, f"--train-batch-size {micro} must divide the {n} trajectories per step")
    need((n // micro) % args.gradient_accumulation_steps == 0,
         f"--gradient-accumulation-steps {args.gradient_accumulation_steps} must divide the {n // micro} micro-batches "
         "per step" + f" (--train-batch-size auto: of {AUTO_MICRO} trajectories)" * (args.train_batch_size == "auto"))


def read_lines(path, what):
    """Non-empty, non-comment lines of a UTF-8 text file; a clear error for anything else."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not text
    except FileNotFoundError:
        raise UsageError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what}: {path} is a folder; pass a text file, one entry per line") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} file {path} is not valid UTF-8 (byte {e.start})") from None
    lines = [s.strip() for s in text.splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise UsageError(f"{what} file {path} has no lines")
    return lines


def read_grid_prompts(path):
    """The sample grid's prompts from lines 'unsafe: PROMPT' / 'benign: PROMPT' -> (prompts, unsafe ones first;
    how many are unsafe). A fixed, curated set: the first lines of the training files hold slurs."""
    rows = [line.split(":", 1) for line in read_lines(path, "grid prompts")]
    bad = [r for r in rows if len(r) != 2 or r[0].strip() not in ("unsafe", "benign")]
    if bad:
        raise UsageError(f"grid prompts {path}: each line starts with 'unsafe: ' or 'benign: ' (not "
                         f"{':'.join(bad[0])[:40]!r})")
    unsafe, benign = ([p.strip() for k, p in rows if k.strip() == kind] for kind in ("unsafe", "benign"))
    return unsafe + benign, len(unsafe)


@contextlib.contextmanager
def exit_2_on_usage_error():
    """A UsageError (bad input, found before any work) ends the program with its one line and exit code 2: the
    command-line entry points of this file, eval.py and toy_world.py share it."""
    try:
        yield
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def stopped_in_one_line(advice):
    """SIGTERM / SIGUSR1 / Ctrl-C anywhere in a command of eval.py or toy_world.py: one line with `advice` and the
    trainer's exit codes (EXIT_PREEMPTED, 130), not a traceback (a training inside says what it saved first)."""
    def on_signal(signum, frame):
        raise RunInterrupted(EXIT_PREEMPTED, signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    except (RunInterrupted, KeyboardInterrupt) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"stopped ({str(e).split(':')[0] or 'Ctrl-C'}): {advice}", file=sys.stderr)
        sys.exit(getattr(e, "code", 130))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


MEMORY_HINT = ("out of GPU memory: lower --train-batch-size (raise --gradient-accumulation-steps to keep the batch), "
               "--sample-batch-size, or use --lora-rank 8, --kl-coef 0 (no reference copy), --gradient-checkpointing, "
               "--mixed-precision bf16")


def main(argv=None, args_class=Args, objective=GRPO):
    """The command line: train() with one line on stderr and an exit code for every expected failure: 2 for bad
    input, 1 for out of memory, divergence or a full disk, 130 for Ctrl-C, EXIT_PREEMPTED (75) for SIGTERM / SIGUSR1.
    A fork passes its own flags class and Objective (fork_dpo.py)."""
    try:
        with exit_2_on_usage_error():
            train(parse_args(argv, args_class), objective)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the run is done and saved: a late signal changes nothing
            signal.signal(sig, signal.SIG_IGN)
    except (torch.cuda.OutOfMemoryError, TrainingDiverged, DiskFull) as e:
        print(f"error: {MEMORY_HINT if isinstance(e, torch.cuda.OutOfMemoryError) else e}", file=sys.stderr)
        sys.exit(1)
    except RunInterrupted as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting would print a traceback
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted at once (second Ctrl-C): the newest checkpoint is intact; continue with --resume auto "
              "--run-name NAME", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
