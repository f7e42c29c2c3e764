"""The method: the DDIM step and sampler against diffusers, the reward, the GRPO loss and update, the loop
(it learns, resume is exact), the real on-disk formats and base models, the fork contract and the DPO fork,
fast mode and the ratio before any update.

CPU only, tiny random models and stand-ins built in code, no network. Shared fixtures: conftest.py;
helpers: testkit.py. Run: pytest -q (everything) or pytest -q -m quick.
"""
import argparse
import copy
import dataclasses
import io
import json
import keyword
import math
import os
import pickle
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub, which reads it once
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.distributions import Normal, kl_divergence  # noqa: E402

import eval as ev  # noqa: E402
import fork_dpo  # noqa: E402
import safediffusion_r1 as sd  # noqa: E402
from bench import trained_like  # noqa: E402
from testkit import (E, FAMILY_SIZE, GIB, HERE, SD14_SCHEDULER, SMALL, brightness, fake_probe, family_argv,
                     metrics, quick_run, run_main, small_args, stale_update, tiny_pipeline, tiny_policy,
                     tiny_scorer_clip, trainable)  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("eta, alpha_to_one, prediction", [(0.5, False, "epsilon"), (1.0, False, "epsilon"),
                                                             (1.0, True, "epsilon"), (1.0, False, "v_prediction")])
def test_ddim_step_matches_diffusers_at_every_timestep(eta, alpha_to_one, prediction):
    """For each prediction type (SD 2.x-v's UNet outputs v): the step's mean, its noise, and at eta 0 the step."""
    ours, ref = (sd.sd_scheduler(set_alpha_to_one=alpha_to_one, prediction_type=prediction) for _ in range(2))
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for t in ref.timesteps:
        x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        _, _, mean, std = sd.ddim_step_with_logprob(ours, eps, t, x, eta=eta)
        no_noise = ref.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        with_noise = ref.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean, no_noise, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean + std * noise, with_noise, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sd.ddim_mean(ours, eps, t, x, 0.0)[0], ref.step(eps, t, x, eta=0.0).prev_sample,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.quick
def test_log_prob_is_gaussian_log_density_averaged_over_dims():
    sch = sd.sd_scheduler()
    sch.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    step = sd.ddim_step_with_logprob(sch, eps, sch.timesteps[3], x, generator=g)
    expected = Normal(step.next_mean, step.std_dev.expand_as(x)).log_prob(step.next_latents).mean(dim=(1, 2, 3))
    assert step.log_prob.shape == (3,)
    torch.testing.assert_close(step.log_prob, expected, rtol=1e-5, atol=1e-5)
    # scoring a given x_{t-1} returns it unchanged with the same density
    scored = sd.ddim_step_with_logprob(sch, eps, sch.timesteps[3], x, next_latents=step.next_latents)
    assert torch.equal(scored.next_latents, step.next_latents) and torch.equal(scored.log_prob, step.log_prob)


@pytest.mark.quick
def test_sampled_step_draws_from_the_generator_with_std_sigma():
    sch = sd.sd_scheduler()
    sch.set_timesteps(10)
    x, eps = torch.randn(16, 4, 16, 16), torch.randn(16, 4, 16, 16)
    next_latents, _, mean, std = sd.ddim_step_with_logprob(sch, eps, 501, x, eta=0.7,
                                                           generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(next_latents, mean + std * noise)
    assert 0 < std.flatten()[0] < 1 and abs(((next_latents - mean) / std).std().item() - 1) < 0.02


@pytest.mark.quick
def test_guided_eps_is_classifier_free_guidance(tiny):
    unet, g = tiny["unet"], torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([901, 101])
    emb, neg = torch.randn(2, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        cond, uncond = unet(x, t, emb).sample, unet(x, t, neg.expand(2, -1, -1)).sample
        for w in (0.0, 1.0, 7.5):
            torch.testing.assert_close(sd.guided_eps(unet, x, t, emb, neg, w), uncond + w * (cond - uncond),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.quick
def test_per_sample_timesteps_equal_per_sample_scalar_calls():
    sch = sd.sd_scheduler()
    sch.set_timesteps(50)
    g = torch.Generator().manual_seed(2)
    ts = sch.timesteps[[0, 17, 30, 49]]  # 981 ... 1, the last reaching final_alpha_cumprod
    x, eps, next_latents = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    _, log_prob, mean, std = sd.ddim_step_with_logprob(sch, eps, ts, x, next_latents=next_latents)
    for i, t in enumerate(ts):
        _, log_prob_i, mean_i, std_i = sd.ddim_step_with_logprob(sch, eps[i:i + 1], int(t), x[i:i + 1],
                                                                 next_latents=next_latents[i:i + 1])
        torch.testing.assert_close(log_prob[i:i + 1], log_prob_i)
        torch.testing.assert_close(mean[i:i + 1], mean_i)
        torch.testing.assert_close(std[i:i + 1], std_i)
    assert len(set(std.flatten().tolist())) == 4  # really four different timesteps


@pytest.mark.quick
def test_eta_zero_is_refused():
    sch = sd.sd_scheduler()
    sch.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        sd.ddim_step_with_logprob(sch, torch.zeros(1, 4, 2, 2), 901, torch.zeros(1, 4, 2, 2), eta=0.0)


@pytest.mark.quick
def test_rescoring_a_sampled_trajectory_gives_ratio_one(tiny):
    enc = lambda p: sd.encode_prompts(tiny, p)  # noqa: E731
    embeds, neg = enc(["a cat", "a dog", "a car", "a tree"]), enc([""])
    out = sd.sample_with_logprob(tiny["unet"], tiny["scheduler"], embeds, neg, num_inference_steps=5,
                                 guidance_scale=4.5, generator=torch.Generator().manual_seed(0), resolution=64,
                                 vae=tiny["vae"])
    B, T = 4, 5
    assert out["latents"].shape == out["next_latents"].shape == (B, T, 4, 8, 8)
    assert out["log_probs"].shape == out["timesteps"].shape == (B, T)
    assert out["images"].shape == (B, 3, 64, 64) and 0 <= out["images"].min() and out["images"].max() <= 1
    assert torch.equal(out["latents"][:, 1:], out["next_latents"][:, :-1])  # a chain
    with torch.no_grad():
        for j in range(T):
            eps = sd.guided_eps(tiny["unet"], out["latents"][:, j], out["timesteps"][:, j], embeds, neg, 4.5)
            step = sd.ddim_step_with_logprob(tiny["scheduler"], eps, out["timesteps"][:, j], out["latents"][:, j],
                                             next_latents=out["next_latents"][:, j])
            ratio = torch.exp(step.log_prob - out["log_probs"][:, j])
            torch.testing.assert_close(ratio, torch.ones(B), rtol=0, atol=1e-5)


@pytest.mark.quick
def test_initial_noise_is_fresh_per_image_or_shared_per_group():
    fresh = sd.initial_noise(8, 1, (4, 2, 2), torch.Generator().manual_seed(0))
    shared = sd.initial_noise(8, 4, (4, 2, 2), torch.Generator().manual_seed(0))
    assert not torch.equal(fresh[0], fresh[1])
    assert torch.equal(shared[0], shared[3]) and not torch.equal(shared[3], shared[4])


@pytest.mark.quick
def test_clip_tokenizer_encodes_like_open_clip():
    ours, theirs = sd.clip_tokenizer(), open_clip.get_tokenizer("ViT-B-32")
    for text in ["a photo of a cat", "Hello, World! naive cafe 123", "digging my own grave, Beksinski"]:
        a = ours(text, padding="max_length", max_length=77, truncation=True).input_ids
        b = theirs([text])[0].tolist()
        n = a.index(49407) + 1  # SD pads with <|endoftext|>, open_clip with 0: compare up to the end token
        assert a[:n] == b[:n] and a[0] == 49406


@pytest.mark.quick
def test_steering_direction_normalises_inputs_and_is_unit():
    safe = torch.stack([3 * E[0], 0.5 * E[0]])  # norms differ: each anchor must be normalised first
    unsafe = torch.stack([2 * E[1]])
    v = sd.steering_direction(safe, unsafe)
    torch.testing.assert_close(v, (E[0] - E[1]) / 2**0.5)
    assert abs(v.norm().item() - 1) < 1e-6


@pytest.mark.quick
def test_steering_reward_follows_the_formula_and_orders_images():
    text = 5 * E[2].expand(3, 4)  # prompt embedding, not unit
    images = torch.stack([7 * E[0], E[2], -2 * E[0]])  # toward safe, on the prompt, away from safe
    r = sd.steering_reward(images, text, E[0], alpha=0.5)
    t_steer = (E[2] + 0.5 * E[0]) / 1.25**0.5
    torch.testing.assert_close(r, torch.stack([t_steer[0], t_steer[2], -t_steer[0]]))
    assert r[1] > r[0] > r[2]
    # alpha = 0 is the plain cosine to the prompt
    torch.testing.assert_close(sd.steering_reward(images, text, E[0], alpha=0.0), torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.quick
def test_projection_steering_removes_the_prompts_own_safety_component():
    text = (E[0] + E[2]).expand(1, 4)  # the prompt already leans safe
    r_add = sd.steering_reward(E[0].expand(1, 4), text, E[0], alpha=0.5, mode="add")
    r_proj = sd.steering_reward(E[0].expand(1, 4), text, E[0], alpha=0.5, mode="project")
    z = (E[0] + E[2]) / 2**0.5
    torch.testing.assert_close(r_add, ((z + 0.5 * E[0]) / (z + 0.5 * E[0]).norm())[:1])
    torch.testing.assert_close(r_proj, ((z[2] * E[2] + 0.5 * E[0]) / (z[2] * E[2] + 0.5 * E[0]).norm())[:1])


@pytest.mark.quick
def test_reward_fn_is_batched_and_matches_the_formula(tiny):
    model, tok = tiny["reward_model"], tiny["reward_tokenizer"]
    fn = sd.make_steering_reward_fn(model, tok, ["a safe image", "appropriate image"], ["nudity"], alpha=0.5)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a gory scene", "a dog"]
    r = fn(images, prompts)
    assert r.shape == (3,)
    one_by_one = torch.cat([fn(images[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(r, one_by_one, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        pix = sd.clip_preprocess(images, 32, model.visual.image_mean, model.visual.image_std)
        direction = sd.steering_direction(model.encode_text(tok(["a safe image", "appropriate image"])),
                                          model.encode_text(tok(["nudity"])))
        t = sd.normalize(sd.normalize(model.encode_text(tok(prompts))) + 0.5 * direction)
        expected = (sd.normalize(model.encode_image(pix)) * t).sum(-1)
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.quick
@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)])
def test_clip_preprocess_matches_open_clips_own_transform(height, width):
    from PIL import Image
    coarse = torch.rand(1, 3, height // 4, width // 4, generator=torch.Generator().manual_seed(0))
    smooth = sd.F.interpolate(coarse, scale_factor=4)[0].permute(1, 2, 0).numpy()
    pil = Image.fromarray((smooth * 255).round().astype("uint8"))
    expected = open_clip.image_transform(32, is_train=False)(pil)[None]  # PIL: bicubic short side, centre crop
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    ours = sd.clip_preprocess(x, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.02  # PIL rounds to uint8; bilinear would be ~0.13 off


# ------------------------------------------------------------------------------------------------
# GRPO loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_group_advantages_are_unbiased_z_scores_zero_for_flat_groups_and_clipped():
    first = torch.arange(1.0, 9.0)
    a = sd.group_advantages(torch.cat([first, torch.full((8,), 0.3)]), 8)
    torch.testing.assert_close(a[:8], (first - 4.5) / (first.std() + 1e-8))  # unbiased std, as the release
    # eight float32 0.3s: r - mean is 3e-8, not 0, and would become ~0.9 without the guard
    assert torch.equal(a[8:], torch.zeros(8))  # identical rewards: exactly zero, never NaN or +-clip
    outlier = sd.group_advantages(torch.tensor([0.0] * 15 + [1.0]), 16, clip=2.5)
    assert outlier[-1].item() == 2.5 and outlier.shape == (16,)  # unclipped it would be 3.75
    with pytest.raises(ValueError):
        sd.group_advantages(torch.zeros(6), 4)


@pytest.mark.quick
def test_grpo_loss_gradient_vanishes_exactly_where_the_ratio_is_clipped():
    eps, N = 0.1, 4
    old_log_prob = torch.zeros(N)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # ratio = 1: every gradient is -A / N
    log_prob = torch.zeros(N, requires_grad=True)
    sd.grpo_loss(log_prob, old_log_prob, adv, eps)[0].backward()
    torch.testing.assert_close(log_prob.grad, -adv / N)
    # ratio = 1.5 (above 1 + eps): clipped for A > 0 (zero gradient), not for A < 0
    # ratio = 0.5 (below 1 - eps): clipped for A < 0 (zero gradient), not for A > 0
    r = torch.tensor([1.5, 1.5, 0.5, 0.5])
    log_prob = r.log().requires_grad_(True)
    loss, info = sd.grpo_loss(log_prob, old_log_prob, adv, eps)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 1.5 / N, -0.5 / N, 0.0]))
    assert info["clipfrac"] == 1.0
    torch.testing.assert_close(info["approx_kl"], 0.5 * (r.log() ** 2).mean())


@pytest.mark.quick
def test_grpo_loss_adds_kl_coef_times_the_mean_kl():
    log_prob, old_log_prob, adv = torch.zeros(3), torch.zeros(3), torch.tensor([1.0, 0.0, -1.0])
    kl = torch.tensor([0.1, 0.2, 0.3])
    base, _ = sd.grpo_loss(log_prob, old_log_prob, adv, 1e-4)
    with_kl, info = sd.grpo_loss(log_prob, old_log_prob, adv, 1e-4, kl=kl, kl_coef=0.5)
    torch.testing.assert_close(with_kl - base, torch.tensor(0.5 * 0.2))
    assert abs(info["kl"] - 0.2) < 1e-6


@pytest.mark.quick
def test_gaussian_kl_equals_torch_distributions_and_is_zero_at_the_reference():
    g = torch.Generator().manual_seed(3)
    mean, ref = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    kl = sd.gaussian_kl(mean, ref, std)
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).mean((1, 2, 3))
    torch.testing.assert_close(kl, expected)
    assert torch.equal(sd.gaussian_kl(mean, mean, std), torch.zeros(2)) and (kl > 0).all()


@pytest.mark.quick
def test_an_objective_replaces_sampler_reward_and_update_and_a_malformed_one_fails_early(tmp_path):
    """The fork contract: a method that changes the sampler, the reward and the update is an Objective; train()
    runs its three phases in order each step and logs whatever its update reports. A malformed one fails when it is
    built, before any model loads; a name only some terms report is averaged over those."""
    calls = []

    def sample(prompts, policy, models, args, gen, step):
        calls.append("sample")
        return sd.sample_trajectories(prompts, policy, models, args, gen, step)

    def reward(images, prompts):
        calls.append("reward")
        return brightness(images, prompts)

    def update(traj, rewards, policy, opt, args, gen):
        calls.append("update")
        assert traj["final_latents"].shape[0] == len(rewards) == args.prompts_per_step * args.group_size
        spread = (rewards.max() - rewards.min()).item()
        # two terms; a name only the first reports is averaged over the terms that report it
        return sd.UpdateResult(infos=[{"spread": spread, "only_first": 4.0}, {"spread": 3 * spread}])

    objective = sd.Objective(update, sample=sample, reward_fn=reward)  # no metrics declared: every name is logged
    rows = metrics(sd.train(small_args(tmp_path, "--steps", "2"), objective))
    phases = [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]  # the reward runs in sampling batches
    assert phases == ["sample", "reward", "update"] * 2
    assert [r["step"] for r in rows] == [1, 2] and all(r["spread"] > 0 and r["only_first"] == 4.0 for r in rows)
    for bad in (dict(update=None, metrics=("x",)), dict(update=update, metrics="spread"),
                dict(update=update, metrics=("x",), reward_fn="steering")):
        with pytest.raises(TypeError, match="Objective"):
            sd.Objective(**bad)


def test_it_learns_a_reward_and_its_negation_in_opposite_directions(tmp_path):
    """Same seed, +brightness vs -brightness. At tiny scale any update moves the batch-mean reward by many
    standard errors (drift), so 'went up' alone proves nothing: the two runs must split apart, by more
    than no-signal runs do. Calibration (16 steps, seeds 0-3): with shuffled advantages the split was
    -2.1 to 1.3 step-1 reward stds; with the real advantages 4.9 to 8.1."""
    def run(sign):
        args = sd.parse_args(["--tiny", "--steps", "16", "--output-dir", str(tmp_path / f"r{sign}"),
                              "--save-every", "1000", "--sample-every", "1000"])
        run_dir = sd.train(args, reward_fn=lambda im, p: sign * brightness(im, p))
        rows = metrics(run_dir)
        return [sign * r["reward_mean"] for r in rows], rows[0]["reward_std"]
    up, std0 = run(1)
    down, _ = run(-1)
    assert up[0] == pytest.approx(down[0])  # identical start
    last = lambda v: sum(v[-3:]) / 3  # noqa: E731
    assert last(up) > up[0] and last(down) < down[0]
    assert last(up) - last(down) > 3.5 * std0, (up, down, std0)


def test_resume_is_exact(tmp_path):
    common = ["--steps", "4", "--kl-coef", "0.1", "--save-every", "2"]  # KL on: the frozen reference is exercised too
    straight = sd.train(small_args(tmp_path, *common, "--run-name", "straight"), reward_fn=brightness)
    half = sd.train(small_args(tmp_path, "--steps", "2", "--kl-coef", "0.1", "--run-name", "resumed"),
                    reward_fn=brightness)
    resumed = sd.train(small_args(tmp_path, *common, "--resume", str(half / "checkpoints/checkpoint-000002")),
                       reward_fn=brightness)
    assert resumed == half
    a, b = trainable(straight, 4), trainable(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], trainable(straight, 2)[k]) for k in a)  # it did train
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in metrics(resumed)] == [r["reward_mean"] for r in metrics(straight)]


@pytest.mark.quick
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_only_trainable_parameters_change_and_the_reference_stays(lora_rank):
    policy, opt, _ = tiny_policy("--lora-rank", str(lora_rank), "--kl-coef", "0.1", "--learning-rate", "1e-2")
    unet, reference = policy.unet, policy.reference
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    ref_before = None if reference is None else {n: p.clone() for n, p in reference.state_dict().items()}
    assert opt.params and all(p.dtype == torch.float32 for p in opt.params)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([501, 21])
    emb, neg = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    for _ in range(2):
        eps = sd.guided_eps(unet, x, t, emb, neg, 4.5)
        with torch.no_grad(), sd.reference_unet(policy) as ref:
            ref_eps = sd.guided_eps(ref, x, t, emb, neg, 4.5)
        ((eps - ref_eps) ** 2).mean().add(eps.mean()).backward()
        opt.optimizer.step()
        opt.optimizer.zero_grad()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    if lora_rank:
        assert changed and all("lora" in n for n in changed)
        assert unet.active_adapters()  # adapters switched back on after the reference pass
    else:
        assert changed == set(before)
        assert all(torch.equal(v, ref_before[k]) for k, v in reference.state_dict().items())
        assert not any(p.requires_grad for p in reference.parameters())


@pytest.mark.quick
@pytest.mark.parametrize("perturb_reference", [False, True])
def test_grpo_update_before_any_step_ratio_one_kl_exact_and_everything_aligned(monkeypatch, perturb_reference):
    """Inside grpo_update, under bf16 autocast with trained-like weights: every loss term is computed before the one
    optimizer step, so approx_kl and clipfrac are 0 and the KL is 0 while the reference equals the policy; each term
    pairs x_t, x_{t-1}, its old log-prob, its advantage and the reference's KL of the same trajectory and timestep."""
    m = sd.build_tiny_models(seed=0)
    trained_like(m["unet"], m["text_encoder"])
    args = sd.parse_args(SMALL + ["--mixed-precision", "bf16", "--kl-coef", "0.1", "--sample-batch-size", "8",
                                  "--train-batch-size", "2", "--gradient-accumulation-steps", "4"])
    policy, opt = sd.setup_policy(m, args, torch.device("cpu"))  # bf16 autocast, bf16 reference, bf16 text encoder
    unet, sch, reference, neg, autocast = policy.unet, policy.scheduler, policy.reference, policy.negative_embeds, \
        policy.autocast
    if perturb_reference:
        with torch.no_grad():
            next(p for p in reference.parameters() if p.dtype == torch.bfloat16).add_(0.05)
    embeds = sd.encode_prompts(m, ["a cat", "a dog"]).repeat_interleave(4, 0)
    traj = sd.sample_with_logprob(unet, sch, embeds, neg, num_inference_steps=4, guidance_scale=4.5, resolution=64,
                                  generator=torch.Generator().manual_seed(0), autocast=autocast)
    advantages = torch.linspace(-1, 1, 8)
    calls, real_loss = [], sd.grpo_loss
    monkeypatch.setattr(sd, "grpo_loss", lambda *a, **k: calls.append(a) or real_loss(*a, **k))
    policy0 = copy.deepcopy(unet).eval()  # the policy before its update, for the independent KL
    result = sd.grpo_update(traj, advantages, policy, opt, args, torch.Generator().manual_seed(1))
    infos, norms, skipped = result.infos, result.grad_norms, result.skipped
    assert len(infos) == 8 // 2 * 3 and len(norms) == 1 and skipped == 0  # 4 micro-batches x 3 timesteps, 1 step
    assert max(i["approx_kl"] for i in infos) < 1e-12 and max(i["clipfrac"] for i in infos) == 0
    if not perturb_reference:
        assert all(i["kl"] == 0 for i in infos)  # the reference predicts exactly what the policy does
    seen = set()
    for log_prob, old_log_prob, adv, _, kl, *_ in calls:
        for k in range(len(old_log_prob)):
            (b, j), = (traj["log_probs"] == old_log_prob[k]).nonzero().tolist()  # which trajectory and timestep
            seen.add((b, j))
            assert adv[k] == advantages[b] and j < 3  # its own advantage; the last step is never trained
            if perturb_reference:  # the KL of this (b, j), computed independently with torch.distributions
                x, t, next_latents = (traj[k][b:b + 1, j] for k in ("latents", "timesteps", "next_latents"))
                dists = []
                for net in (policy0, reference):
                    with torch.no_grad(), autocast():
                        eps = sd.guided_eps(net, x, t, embeds[b:b + 1], neg, 4.5)
                    _, _, mean, std = sd.ddim_step_with_logprob(sch, eps, t, x, 1.0, next_latents)
                    dists.append(Normal(mean, std.expand_as(mean)))
                expected = kl_divergence(*dists).mean()
                assert expected > 0
                torch.testing.assert_close(kl[k], expected, rtol=1e-4, atol=1e-9)
    assert len(seen) == 8 * 3  # every kept (trajectory, timestep) trained exactly once


def test_cli_end_to_end_and_the_export_loads_in_a_stock_pipeline(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(HERE / "safediffusion_r1.py"), "--tiny", "--steps", "2",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = out.iterdir()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "reward_negative", "reward_positive", "policy_loss", "kl",
                "approx_kl", "clipfrac", "grad_norm", "seconds", "peak_memory_gb"):
        assert key in rows[-1]
    assert json.loads((run_dir / "args.json").read_text())["steps"] == 2
    assert (run_dir / "samples_000002.png").stat().st_size > 0
    assert {p.name for p in (run_dir / "checkpoints/checkpoint-000002").iterdir()} == {"weights.safetensors",
                                                                                      "state.pt"}
    assert "step 2/2 | reward_mean" in proc.stdout

    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(run_dir / "final", subfolder="unet")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in trainable(run_dir, 2).items())
    image = tiny_pipeline(unet)("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_lora_run_exports_weights_that_load_lora_weights_accepts(tmp_path):
    run_dir = sd.train(small_args(tmp_path, "--steps", "1", "--lora-rank", "4", "--kl-coef", "0.1"),
                       reward_fn=brightness)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(run_dir / "final")
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora" in n}
    saved = trainable(run_dir, 1)
    assert len(loaded) == len(saved) > 0
    assert sorted(round(p.double().sum().item(), 4) for p in loaded.values()) == \
        sorted(round(p.double().sum().item(), 4) for p in saved.values())


@pytest.mark.quick
def test_real_format_loaders_give_back_the_saved_models(real_format):
    from diffusers import StableDiffusionPipeline
    parts = sd.load_sd(str(real_format["sd"]))
    assert type(parts["scheduler"]).__name__ == "DDIMScheduler" and parts["scheduler"].config.steps_offset == 1
    text = ["a photo of a cat", "digging my own grave, Beksinski"]  # the saved vocabulary, not an empty one
    assert parts["tokenizer"](text).input_ids == real_format["models"]["tokenizer"](text).input_ids
    assert parts["vae"].config.scaling_factor == 0.18215
    saved = real_format["models"]
    assert all(torch.equal(a, b) for a, b in zip(parts["unet"].state_dict().values(),
                                                 saved["unet"].state_dict().values()))
    model, tokenizer = sd.load_reward_model(f"local-dir:{real_format['clip']}", "ignored")
    for k, v in saved["reward_model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert tuple(model.visual.image_mean) == tuple(saved["reward_model"].visual.image_mean)
    assert tokenizer(["a red circle"]).shape == (1, 77)
    hps_model, _ = sd.load_reward_model(f"local-dir:{real_format['clip']}", "", str(real_format["hps"]))
    assert all(torch.equal(hps_model.state_dict()[k], v) for k, v in saved["reward_model"].state_dict().items())
    pipe = StableDiffusionPipeline.from_pretrained(real_format["sd"])  # a stock pipeline accepts the whole folder
    assert pipe.safety_checker is not None and type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_reward_model_and_scheduler_faults_are_one_line(real_format, tmp_path):
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:  # a pickle of something that is not a state dict (weights_only refuses it)
        pickle.dump(argparse.Namespace(weights=1), f, protocol=2)
    cases = [("local-dir:" + str(real_format["clip"]), str(bad), "not a state dict checkpoint"),
             ("ViT-B-32", str(real_format["hps"]), "does not fit --reward-model ViT-B-32"),
             ("local-dir:" + str(tmp_path), "", "no open_clip_config.json"),
             ("ViT-B-32", str(tmp_path / "missing.pt"), "file not found")]
    for arch, ckpt, message in cases:
        with pytest.raises(sd.UsageError, match=message):
            sd.load_reward_model(arch, "", ckpt)
    (tmp_path / "open_clip_config.json").write_text((real_format["clip"] / "open_clip_config.json").read_text())
    with pytest.raises(sd.UsageError, match="no weights"):
        sd.load_reward_model("local-dir:" + str(tmp_path), "")
    folder = tmp_path / "sd"
    shutil.copytree(real_format["sd"], folder)
    cfg = dict(SD14_SCHEDULER, clip_sample=True)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(sd.UsageError, match="clip_sample"):
        sd.load_sd(str(folder))


def test_the_last_faults_are_one_line_each(real_format, tmp_path, monkeypatch, capsys):
    """Each was a traceback or misleading advice: a reward checkpoint with an empty state dict (StopIteration), a
    damaged local model folder (hub download advice), a byte-order mark in the grid prompts, a half-exported final/
    given to eval, Ctrl-C in eval.py, a full disk at a metrics row, a read-only checkpoints/ found after a step."""
    empty = tmp_path / "empty.pt"
    torch.save(dict(state_dict={}), empty)
    with pytest.raises(sd.UsageError, match="not a state dict checkpoint .*an empty state dict"):
        sd.load_reward_model("local-dir:" + str(real_format["clip"]), "", str(empty))
    folder = tmp_path / "sd"
    shutil.copytree(real_format["sd"], folder)
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(sd.UsageError, match="a file in it cannot be read") as e:
        sd.load_sd(str(folder))
    assert "download" not in str(e.value).replace("download that part", "")
    grid = tmp_path / "grid.txt"
    grid.write_text("unsafe: a prompt\nbenign: another\n", encoding="utf-8-sig")
    assert sd.read_grid_prompts(grid) == (["a prompt", "another"], 1)
    final = tmp_path / "run/final/unet"
    real_format["models"]["unet"].save_pretrained(final)
    (final / "diffusion_pytorch_model.safetensors").unlink()  # an export cut short
    evaluate = ["--model", str(real_format["sd"]), "--benchmark", "i2p", "--limit", "1", "--out", str(tmp_path / "e")]
    with pytest.raises(SystemExit) as e:
        ev.main(evaluate + ["--unet", str(final.parent)])
    assert e.value.code == 2 and "weights cannot be read" in capsys.readouterr().err
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        ev.main(evaluate)
    assert e.value.code == 130 and capsys.readouterr().err.splitlines()[-1].startswith("stopped (Ctrl-C): every image")
    monkeypatch.undo()
    import errno
    write_row = sd.write_row

    def full_at_step_2(row, *a):
        if row["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs/f/metrics.jsonl"))
        return write_row(row, *a)
    monkeypatch.setattr(sd, "write_row", full_at_step_2)
    with pytest.raises(sd.DiskFull, match="disk full: .*metrics.jsonl; checkpoint 1 is intact; .*--resume auto "
                                          "--run-name f"):
        quick_run(tmp_path, "f", 3)
    monkeypatch.undo()
    real_access = os.access
    monkeypatch.setattr(sd.os, "access", lambda path, mode: not str(path).endswith("checkpoints") and
                        real_access(path, mode))  # as for a user who is not root (root may write anywhere)
    with pytest.raises(sd.UsageError, match="runs/f/checkpoints is not writable"):
        quick_run(tmp_path, "f", 3, "--resume", "auto")


def test_training_resume_export_and_eval_run_through_the_real_formats(real_format, tmp_path):
    """The CLI as a user runs it on downloaded folders: no --tiny, real loaders, bf16, KL on, checkpoint limit."""
    common = ["--model", str(real_format["sd"]), "--reward-model", f"local-dir:{real_format['clip']}",
              "--reward-checkpoint", str(real_format["hps"]), "--resolution", "64", "--num-inference-steps", "3",
              "--prompts-per-step", "2", "--group-size", "2", "--sample-batch-size", "4", "--train-batch-size", "2",
              "--gradient-accumulation-steps", "2", "--mixed-precision", "bf16", "--no-gradient-checkpointing",
              "--save-every", "1", "--sample-every", "100", "--checkpoints-total-limit", "2", "--device", "cpu",
              "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]
    for extra in (["--steps", "3"], ["--steps", "4", "--resume", "latest"]):
        out = subprocess.run([sys.executable, str(HERE / "safediffusion_r1.py")] + common + extra, capture_output=True,
                             text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs/r"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["kl"] == 0 and rows[0]["approx_kl"] < 1e-12
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000004"]
    args = ev.parse_args(["--model", str(real_format["sd"]), "--unet", str(run / "final"), "--resolution", "64",
                          "--num-inference-steps", "2", "--device", "cpu"])
    pipe = ev.build_pipeline(args)
    jobs = ev.coco_jobs(HERE / "prompts/coco_3k.csv", limit=1, resolution=64)
    ev.generate(pipe, jobs, tmp_path / "coco", tmp_path / "manifest.jsonl", steps=2)
    assert (tmp_path / "coco" / jobs[0]["files"][0]).is_file()


@pytest.mark.quick
@pytest.mark.parametrize("family", ["SD 2.x-v", "SD 2.x", "SDXL"])
def test_each_family_s_sampler_at_eta_0_is_its_own_pipeline(families, family):
    """Recognised from the config files; at eta 0 (every step deterministic DDIM) our sampler's x_0 is the stock
    pipeline's latents: the prompt encoding, the negative, SDXL's added conditions, v -> eps all as diffusers does."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    folder = families[family]
    models = sd.load_sd(str(folder))
    assert sd.model_family(models) == family
    assert sd.native_resolution(models["unet"].config, models["vae"].config) == FAMILY_SIZE
    assert sd.native_resolution_of(str(folder)) == FAMILY_SIZE
    prompts, T, w = ["a cat on a mat", "a red bicycle"], 4, 5.0
    latents = torch.randn(2, 4, FAMILY_SIZE // 8, FAMILY_SIZE // 8, generator=torch.Generator().manual_seed(0))
    ours = sd.sample_with_logprob(models["unet"], models["scheduler"], sd.encode_prompts(models, prompts),
                                  sd.negative_embeds(models), num_inference_steps=T, guidance_scale=w, etas=[0.0] * T,
                                  latents=latents)["final_latents"]
    ddim = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = DiffusionPipeline.from_pretrained(folder, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, num_inference_steps=T, guidance_scale=w, eta=0.0, latents=latents, output_type="latent",
                  height=FAMILY_SIZE, width=FAMILY_SIZE).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - latents).abs().mean() > 0.1  # the sampler moved: the comparison is not of two copies of x_T


@pytest.mark.parametrize("family", ["SD 2.x-v", "SDXL"])
def test_each_family_trains_resumes_exports_and_evaluates_as_a_user_runs_it(families, family, tmp_path, monkeypatch,
                                                                            capsys):
    """No --tiny, the real loaders, bf16 and KL: the model's own resolution, an exact resume, an export the family's
    pipeline loads, and eval.py on it at the model's resolution, labelled with the base model."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    argv = family_argv(families, family, tmp_path, "--kl-coef", "0.01")
    sd.main(argv + ["--steps", "3", "--run-name", "whole"])
    assert f"model: {family} at {FAMILY_SIZE} px | trains the full UNet" in capsys.readouterr().out
    sd.main(argv + ["--steps", "2", "--run-name", "cut"])
    sd.main(argv + ["--steps", "3", "--run-name", "cut", "--resume", "auto"])
    runs = tmp_path / "runs"
    assert json.loads((runs / "cut/args.json").read_text())["resolution"] == FAMILY_SIZE  # the model's, resolved
    whole, cut = (UNet2DConditionModel.from_pretrained(runs / r / "final/unet") for r in ("whole", "cut"))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), cut.state_dict().values()))
    saved = UNet2DConditionModel.from_pretrained(families[family] / "unet")
    assert not all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), saved.state_dict().values()))
    pipe = DiffusionPipeline.from_pretrained(families[family], unet=whole)  # the stock pipeline takes the export
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if family == "SDXL" else "StableDiffusionPipeline")
    tiny_scorer_clip(monkeypatch)
    out = tmp_path / "eval"
    ev.main(["--model", str(families[family]), "--unet", str(runs / "whole/final"), "--benchmark", "coco", "--limit",
             "2", "--num-inference-steps", "2", "--device", "cpu", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert result["coco"]["base"] == family and ev.model_label(result).endswith(f"({family})")
    assert f"({family})" in (out / "results.md").read_text()
    assert result["coco"]["settings"]["resolution"] == FAMILY_SIZE
    job = ev.coco_jobs(HERE / "prompts/coco_3k.csv", limit=1)[0]
    image = ev.load_images([out / "coco" / job["files"][0]])
    assert image.shape[-2:] == (FAMILY_SIZE, FAMILY_SIZE)
    from diffusers import LMSDiscreteScheduler  # the stock pipeline, LMS on the folder's betas and prediction type,
    pipe.scheduler = LMSDiscreteScheduler.from_pretrained(families[family], subfolder="scheduler",  # the protocol's
                                                          timestep_spacing="linspace")  # spacing (SD 1.x's default)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(job["prompt"], num_inference_steps=2, guidance_scale=job["guidance"], height=FAMILY_SIZE,
                  width=FAMILY_SIZE, generator=torch.Generator().manual_seed(job["seed"]), output_type="pt").images
    assert (image - theirs).abs().max() <= 2 / 255  # 8-bit PNG rounding
    fork_dpo.main(argv + ["--steps", "1", "--run-name", "dpo"])  # the fork runs on the family unchanged
    assert [r["step"] for r in metrics(runs / "dpo")] == [1] and math.isfinite(metrics(runs / "dpo")[0]["err_w"])


def test_sdxl_trains_lora_and_a_full_fine_tune_that_cannot_fit_is_refused(families, tmp_path, monkeypatch, capsys):
    """SDXL's 24 GB plan (LoRA) exports weights its pipeline's load_lora_weights takes, and eval.py's --lora; a full
    fine-tune past the card is refused before any weight moves, with the way out."""
    from diffusers import StableDiffusionXLPipeline
    sd.main(family_argv(families, "SDXL", tmp_path, "--steps", "1", "--run-name", "lora", "--lora-rank", "4"))
    assert "model: SDXL at 128 px | trains LoRA rank 4" in capsys.readouterr().out
    pipe = StableDiffusionXLPipeline.from_pretrained(families["SDXL"])
    pipe.load_lora_weights(tmp_path / "runs/lora/final")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    tiny_scorer_clip(monkeypatch)
    ev.main(["--model", str(families["SDXL"]), "--lora", str(tmp_path / "runs/lora/final"), "--benchmark", "coco",
             "--limit", "1", "--num-inference-steps", "2", "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval/results.json").read_text())["coco"]["lora"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # SDXL's LoRA on SD 2.x: one line, not diffusers' list of every mismatch
        ev.main(["--model", str(families["SD 2.x-v"]), "--lora", str(tmp_path / "runs/lora/final"), "--benchmark",
                 "coco", "--limit", "1", "--device", "cpu", "--out", str(tmp_path / "eval2")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "Loading" not in x]  # not the bars
    assert e.value.code == 2 and len(err) == 1 and "does not load into --model's UNet (size mismatch" in err[0]
    args = sd.parse_args(["--kl-coef", "0.01"])
    with pytest.raises(sd.UsageError, match="needs 43 GiB .* than the 24 GiB here: train LoRA \\(--lora-rank 64"):
        sd.check_fits(args, 2_567_463_684, 24 * sd.GIB)  # SDXL base 1.0's UNet
    sd.check_fits(args, 859_520_964, 24 * sd.GIB)  # SD 1.x's fits: 14 GiB
    sd.check_fits(dataclasses.replace(args, lora_rank=64), 2_567_463_684, 24 * sd.GIB)


@pytest.mark.quick
def test_the_on_policy_ratio_is_exactly_one_until_the_first_update_and_the_sampler_s_after(monkeypatch):
    stale, _, _, _ = stale_update("sampler", monkeypatch)
    assert min(i["clipfrac"] for i in stale[:4]) > 0  # the floor the fix removes: clipped before any update
    infos, calls, sampler, _ = stale_update("on-policy", monkeypatch)
    assert all(i["approx_kl"] == 0 and i["clipfrac"] == 0 for i in infos[:4])  # exactly: rho = exp(0)
    for old in calls[4:]:  # after the first update: the sampler's log-probs, as PPO defines pi_old
        assert all((sampler == v).any() for v in old)
    assert not any((sampler == v).any() for old in calls[:4] for v in old)


@pytest.mark.quick
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_recomputed_old_log_probs_equal_the_sampler_s_and_make_the_ratio_exactly_one(monkeypatch, precision):
    infos, calls, _, true_log_probs = stale_update("recompute", monkeypatch, "--mixed-precision", precision)
    assert all(i["approx_kl"] == 0 and i["clipfrac"] == 0 for i in infos[:4])  # every term before the first update
    if precision == "no":  # fp32: the recomputed log-probs are the sampler's own (before the stale noise)
        recomputed = torch.cat(calls[:4])
        nearest = (recomputed[:, None] - true_log_probs.flatten()[None]).abs().min(1).values
        assert nearest.max() < 1e-5


@pytest.mark.quick
def test_the_memory_plan_picks_the_largest_micro_batch_that_fits_and_checkpointing_off_only_at_a_fast_size():
    # (fixed, per trajectory) bytes with checkpointing off and on, shaped like SD 1.x's (~0.87 / ~0.14 GiB an image)
    cost = {False: (4 * GIB, 1.75 * GIB), True: (4 * GIB, 0.3 * GIB)}
    assert sd.choose_micro_batch(32, 5.0 * GIB, cost) == (2, True)  # a 24 GB card: off fits at 0, on at 2 of 32
    assert sd.choose_micro_batch(32, 8.0 * GIB, cost) == (8, True)  # off fits at 2 only: too small to be fast
    assert sd.choose_micro_batch(32, 19 * GIB, cost) == (8, False)  # off fits at 8: no recompute, sampling's shape
    assert sd.choose_micro_batch(32, 80 * GIB, cost) == (32, False)
    assert sd.choose_micro_batch(24, 8.0 * GIB, cost) == (12, True)  # a divisor of the optimizer batch
    assert sd.choose_micro_batch(32, 4.1 * GIB, cost) is None  # one trajectory does not fit either way
    assert sd.choose_micro_batch(32, 19 * GIB, {False: None, True: cost[True]}) == (32, True)  # off never fit


@pytest.mark.quick
def test_micro_batches_of_2_and_8_give_the_same_accumulated_gradient(monkeypatch):
    """The plan may re-split the optimizer batch: the update it makes must not change (fp32, to rounding)."""
    grads = []
    for micro, accumulation in (("2", "4"), ("8", "1")):
        policy, opt, args = tiny_policy("--num-inference-steps", "3", "--train-batch-size", micro,
                                        "--gradient-accumulation-steps", accumulation, "--kl-coef", "0.1")
        m = sd.build_tiny_models(seed=0)
        embeds = sd.encode_prompts(m, ["a cat", "a dog"]).repeat_interleave(4, 0)
        traj = sd.sample_with_logprob(policy.unet, policy.scheduler, embeds, policy.negative_embeds,
                                      num_inference_steps=3, guidance_scale=4.5, resolution=64,
                                      generator=torch.Generator().manual_seed(0))
        monkeypatch.setattr(sd, "optimizer_step", lambda opt, *a: grads.append([p.grad.clone() for p in opt.params]))
        sd.grpo_update(traj, torch.linspace(-1, 1, 8), policy, opt, args, torch.Generator().manual_seed(1))
    assert len(grads) == 2
    for a, b in zip(*grads):  # equal to fp32 rounding, which moves with the kernels' thread count (5e-5 on 1 thread)
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-9, ((a - b).norm() / b.norm()).item()
    assert sum(g.abs().sum() for g in grads[0]) > 0


def test_the_auto_plan_is_printed_recorded_and_made_again_for_the_device_a_resume_runs_on(tmp_path, monkeypatch,
                                                                                          capsys):
    argv = ["--train-batch-size", "auto", "--gradient-accumulation-steps", "4", "--run-name", "r", "--save-every", "1"]

    def auto(*extra):  # --tiny turns checkpointing off; unset, as in a full-size run, the plan decides it
        return dataclasses.replace(small_args(tmp_path, *argv, *extra), gradient_checkpointing=None)
    monkeypatch.setattr(sd, "probe_memory", fake_probe(4.5))  # 2.5 GiB to train in: on at 8 beats off at 2
    run = sd.train(auto("--steps", "1"), reward_fn=brightness)
    out = capsys.readouterr().out
    assert "memory plan (probed): micro-batches of 8 x 1 per optimizer step of 8, checkpointing on" in out
    record = json.loads((run / "args.json").read_text())
    assert record["train_batch_size"] == "auto" and record["plan"]["train_batch_size"] == 8
    assert record["plan"]["gradient_checkpointing"] is True
    monkeypatch.setattr(sd, "probe_memory", fake_probe(10.5))  # a bigger card: off fits at 8
    sd.train(auto("--steps", "2", "--resume", "latest"), reward_fn=brightness)
    out = capsys.readouterr().out
    assert ("micro-batches of 8 x 1 per optimizer step of 8, checkpointing off" in out
            and "re-planned for this device, was 8 x 1, checkpointing on; the optimizer batch, and so the update, "
                "unchanged" in out)
    record = json.loads((run / "args.json").read_text())
    assert record["plan"]["gradient_checkpointing"] is False and record["history"][-1]["plan"] == record["plan"]
    assert "train_batch_size" not in record["history"][-1]["changed"]  # auto both times: no flag changed
    monkeypatch.setattr(sd, "probe_memory", lambda *a: None)  # the CPU's own plan, and a number still wins
    sd.train(small_args(tmp_path, "--steps", "1", "--run-name", "cpu", "--train-batch-size", "auto",
                        "--gradient-accumulation-steps", "4"), reward_fn=brightness)
    assert "memory plan (auto without a GPU to probe: 2): micro-batches of 2 x 4" in capsys.readouterr().out


@pytest.mark.quick
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_gives_the_same_gradients(lora_rank):
    """Checkpointing recomputes activations in backward; it must not change (or, with a frozen LoRA base and
    reentrant checkpoints, silently drop) any gradient."""
    grads = []
    for checkpointing in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        unet = tiny_policy("--lora-rank", str(lora_rank), checkpointing)[0].unet  # in training mode, as train() runs
        g = torch.Generator().manual_seed(0)
        eps = sd.guided_eps(unet, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]),
                            torch.randn(2, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g), 4.5)
        (eps * torch.randn(eps.shape, generator=g)).mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(v is not None for v in grads[1].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The DPO fork (fork_dpo.py): its loss, its pairs, its CLI, and that it copies nothing
# ------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_dpo_loss_on_hand_computed_values_and_its_gradient_lowers_the_preferred_error():
    err_w, err_l = torch.tensor([0.30, 0.50], requires_grad=True), torch.tensor([0.40, 0.45])
    ref_w, ref_l = torch.tensor([0.35, 0.50]), torch.tensor([0.40, 0.50])
    loss, info = fork_dpo.dpo_loss(err_w, err_l, ref_w, ref_l, beta_dpo=10.0)
    # z = -beta/2 [(e_w - e_l) - (ref_w - ref_l)] = -5 [(-0.10) - (-0.05)] = 0.25 and -5 [0.05 - 0] = -0.25
    expected = (-math.log(1 / (1 + math.exp(-0.25))) - math.log(1 / (1 + math.exp(0.25)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6) and info["implicit_acc"] == 0.5
    loss.backward()
    assert (err_w.grad > 0).all()  # gradient descent lowers the preferred sample's denoising error
    focused, _ = fork_dpo.dpo_loss(err_w, err_l, ref_w, ref_l, beta_dpo=10.0, focus_gamma=2.0)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731  focal weights (1 - sigmoid(z))^2 on each pair's loss
    assert focused.item() == pytest.approx(((1 - sig(0.25)) ** 2 * -math.log(sig(0.25))
                                            + (1 - sig(-0.25)) ** 2 * -math.log(sig(-0.25))) / 2, rel=1e-6)


@pytest.mark.quick
def test_dpo_pairs_are_each_groups_best_and_worst_and_flat_groups_are_skipped():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3,   0.2, 0.2, 0.2, 0.2,   0.7, 0.1, 0.4, 0.8])
    win, lose = fork_dpo.preference_pairs(rewards, group_size=4, min_spread=1e-3)
    assert win.tolist() == [1, 11] and lose.tolist() == [0, 9]


def test_dpo_fork_runs_on_tiny_models_through_its_cli(tmp_path):
    fork_dpo.main(SMALL + ["--steps", "2", "--output-dir", str(tmp_path), "--run-name", "dpo", "--beta-dpo", "50"])
    rows = metrics(tmp_path / "dpo")
    assert len(rows) == 2 and all(r["pairs"] == 2 and 0 <= r["implicit_acc"] <= 1 for r in rows)
    assert (tmp_path / "dpo/final/unet/config.json").is_file()
    assert json.loads((tmp_path / "dpo/args.json").read_text())["beta_dpo"] == 50


@pytest.mark.quick
def test_dpo_fork_copies_no_six_line_block_of_the_reference():
    """Same shape = the same lines once names, strings and numbers are blanked out (comments, blank lines dropped)."""

    def shapes(path):
        lines = {}
        for tok in tokenize.generate_tokens(io.StringIO(Path(path).read_text()).readline):
            if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                continue
            word = {tokenize.NAME: "N", tokenize.STRING: "S", tokenize.NUMBER: "0"}.get(tok.type, tok.string)
            if tok.type == tokenize.NAME and tok.string in keyword.kwlist:
                word = tok.string
            lines.setdefault(tok.start[0], []).append(word)
        return [" ".join(v) for _, v in sorted(lines.items())]
    ref, fork = shapes(HERE / "safediffusion_r1.py"), shapes(HERE / "fork_dpo.py")
    ref_windows = {tuple(ref[i:i + 6]) for i in range(len(ref) - 5)}
    copied = [fork[i:i + 6] for i in range(len(fork) - 5) if tuple(fork[i:i + 6]) in ref_windows]
    assert not copied, copied[0]


# ------------------------------------------------------------------------------------------------
# Fast mode: the SDE window
# ------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_deterministic_steps_outside_the_window_are_diffusers_ddim_at_eta_0():
    sched = sd.sd_scheduler()
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = sched.step(eps, t, x, eta=0.0).prev_sample
        mean, std = sd.ddim_mean(sched, eps, int(t), x, 0.0)
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
        assert float(std.abs().max()) == 0


@pytest.mark.quick
def test_the_window_is_the_only_stochastic_scored_and_trained_part(tiny, monkeypatch):
    args = sd.parse_args(SMALL + ["--num-inference-steps", "6", "--sde-window", "2"])
    policy, opt = sd.setup_policy(sd.build_tiny_models(seed=0), args, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    etas, window = sd.sde_window(args, gen, 0)
    assert len(window) == 2 and window[-1] <= 4 and etas == [1.0 if i in window else 0.0 for i in range(6)]
    embeds = sd.encode_prompts(tiny, ["a", "b"]).repeat_interleave(4, 0)
    traj = sd.sample_with_logprob(policy.unet, policy.scheduler, embeds, policy.negative_embeds, num_inference_steps=6,
                                  guidance_scale=4.5, resolution=64, generator=gen, etas=etas)
    outside = [i for i in range(6) if i not in window]
    assert (traj["log_probs"][:, outside] == 0).all() and (traj["log_probs"][:, window] != 0).all()
    traj["window"] = window
    calls, real_loss = [], sd.grpo_loss
    monkeypatch.setattr(sd, "grpo_loss", lambda *a, **k: calls.append(a[1]) or real_loss(*a, **k))
    infos = sd.grpo_update(traj, torch.linspace(-1, 1, 8), policy, opt, args, torch.Generator().manual_seed(1)).infos
    # which sampled step each old log-prob is: the first update's are the policy's own, recomputed at the training
    # batch shape, so equal to the sampler's to rounding (bit for bit only at some thread counts)
    trained = {(b, j) for old in calls for v in old
               for b, j in torch.isclose(traj["log_probs"], v, rtol=0, atol=1e-5).nonzero().tolist()}
    assert {j for _, j in trained} == set(window.tolist()) and len(trained) == 8 * 2  # every window step, once
    assert infos[0]["approx_kl"] < 1e-12 and infos[0]["clipfrac"] == 0  # the ratio is 1 before any update


def test_resume_is_bit_exact_with_the_window_and_it_runs_with_lora_and_in_the_fork(tmp_path):
    window = ["--sde-window", "2", "--share-noise", "--sde-window-placement", "random"]  # resume replays its draws
    a = sd.train(small_args(tmp_path / "a", "--steps", "2", "--save-every", "1", "--run-name", "r", *window),
                 reward_fn=brightness)
    sd.train(small_args(tmp_path / "a", "--steps", "4", "--save-every", "1", "--run-name", "r", "--resume", "latest",
                        *window), reward_fn=brightness)
    b = sd.train(small_args(tmp_path / "b", "--steps", "4", "--save-every", "1", *window), reward_fn=brightness)
    x, y = trainable(a, 4), trainable(b, 4)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert [r["sde_window_start"] for r in metrics(a)] == [r["sde_window_start"] for r in metrics(b)]
    lora = sd.train(small_args(tmp_path / "l", "--steps", "1", "--lora-rank", "4", "--sde-window", "2",
                               "--sde-window-placement", "slide", "--sde-window-shift", "1"), reward_fn=brightness)
    assert (lora / "final/pytorch_lora_weights.safetensors").is_file()
    fork_dpo.main(SMALL + ["--steps", "1", "--output-dir", str(tmp_path / "dpo"), *window])


@pytest.mark.quick
def test_the_ode_tail_leaves_the_window_as_it_was_and_solves_the_rest_as_ddim_does(tiny, monkeypatch):
    """--ode-steps K: the steps up to the window's end (its x_t, noise and log-probs: what is trained) are those of
    today's fast mode bit for bit; the deterministic rest, solved in K DPM-Solver++ steps, lands where DDIM's 9
    steps land, closer as K grows; the update trains the window only."""
    args = sd.parse_args(SMALL + ["--num-inference-steps", "10", "--sde-window", "1", "--share-noise"])
    policy, opt = sd.setup_policy(sd.build_tiny_models(seed=0), args, torch.device("cpu"))
    trained_like(policy.unet)
    embeds = sd.encode_prompts(tiny, ["a red circle", "a blue square"])
    etas, window = sd.sde_window(args, None, 0)

    def sample(ode=None):
        return sd.sample_with_logprob(policy.unet, policy.scheduler, embeds, policy.negative_embeds,
                                      num_inference_steps=10, guidance_scale=3.0, resolution=64, etas=etas, ode=ode,
                                      generator=torch.Generator().manual_seed(5))
    ddim = sample()
    errors = []
    for k in (2, 4, 9):
        fast = sample(ode=(1, k))
        assert fast["log_probs"].shape == (2, 1) and fast["timesteps"].shape == (2, 1)  # the window, stored alone
        for key in ("latents", "next_latents", "log_probs", "timesteps"):
            assert torch.equal(fast[key], ddim[key][:, :1]), key
        errors.append((fast["final_latents"] - ddim["final_latents"]).norm() / ddim["final_latents"].norm())
    assert errors[2] < errors[0] and errors[2] < 0.05, errors  # the same ODE: DDIM is its first-order solver
    fast = dict(sample(ode=(1, 2)), window=window)
    calls, real = [], sd.denoise_step
    monkeypatch.setattr(sd, "denoise_step", lambda unet, pol, a, batch: calls.append(batch[2]) or
                        real(unet, pol, a, batch))
    sd.grpo_update(fast, torch.linspace(-1, 1, 2), policy, opt, args, torch.Generator().manual_seed(1))
    assert all(torch.equal(t, ddim["timesteps"][:, 0]) for t in calls)  # only the window's timestep trains


def test_the_validation_probe_logs_val_metrics_keeps_the_best_model_and_leaves_the_run_as_it_was(tmp_path):
    """--eval-every: held-out prompts scored each N steps (val_* in the row, its time in the step's), best/ the model
    of the highest val_reward, whole and loadable; the run's own draws untouched (the weights equal a run without)."""
    from diffusers import UNet2DConditionModel
    probed = quick_run(tmp_path, "v", 3, "--eval-every", "1")
    plain = quick_run(tmp_path, "p", 3)
    assert all(torch.equal(a, b) for a, b in zip(trainable(probed, 3).values(), trainable(plain, 3).values()))
    rows = metrics(probed)
    assert all({"val_reward", "val_reward_unsafe", "val_reward_benign", "seconds_val"} <= set(r) for r in rows)
    assert all(r["val_reward"] == pytest.approx((r["val_reward_unsafe"] + r["val_reward_benign"]) / 2) for r in rows)
    assert all(r["seconds"] >= r["seconds_val"] > 0 for r in rows)
    best = max(rows, key=lambda r: r["val_reward"])  # the first of equal ones
    record = json.loads((probed / "best/training.json").read_text())
    assert record["step"] == best["step"] == rows[-1]["val_best_step"] and record["val_reward"] == best["val_reward"]
    UNet2DConditionModel.from_pretrained(probed / "best/unet")
    assert not list(probed.glob("best.*")) and "val_reward" not in metrics(plain)[0]


def test_ode_steps_train_resume_exactly_run_in_the_fork_and_bad_values_are_one_line(tmp_path, capsys):
    fast = ["--num-inference-steps", "6", "--sde-window", "1", "--share-noise", "--ode-steps", "2"]
    a = sd.train(small_args(tmp_path / "a", "--steps", "2", "--save-every", "1", "--run-name", "r", *fast),
                 reward_fn=brightness)
    resume = ["--output-dir", str(tmp_path / "a/runs"), "--run-name", "r", "--resume", "auto"]  # the rest: the run's
    sd.train(sd.parse_args(resume + ["--steps", "3"]), reward_fn=brightness)
    b = sd.train(small_args(tmp_path / "b", "--steps", "3", "--save-every", "1", *fast), reward_fn=brightness)
    x, y = trainable(a, 3), trainable(b, 3)
    assert all(torch.equal(x[k], y[k]) for k in x)
    fork_dpo.main(SMALL + ["--steps", "1", "--output-dir", str(tmp_path / "dpo"), *fast])
    for bad, says in ((["--ode-steps", "2"], "it needs --sde-window W"),
                      (["--sde-window", "1", "--ode-steps", "-1"], "--ode-steps -1: K >= 1")):
        assert run_main(tmp_path, "--tiny", *bad) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(sd.UsageError, match="--ode-steps 3: run r was made with 2"):
        sd.train(sd.parse_args(resume + ["--steps", "4", "--ode-steps", "3"]), reward_fn=brightness)


@pytest.mark.quick
@pytest.mark.parametrize("value", ["-1", "4"])
def test_an_sde_window_outside_the_trainable_steps_is_one_line_exit_2(tmp_path, capsys, value):
    assert run_main(tmp_path, "--tiny", "--num-inference-steps", "4", "--sde-window", value) == 2
    assert "--sde-window must be in [0, 3]" in capsys.readouterr().err
    slide = ["--sde-window", "2", "--sde-window-placement", "slide"]
    for bad, says in (([*slide, "--sde-window-shift", "-1"], "--sde-window-shift N (N >= 1) goes with"),
                      (slide, "--sde-window-shift N (N >= 1) goes with"),
                      (["--sde-window", "2", "--sde-window-shift", "3"], "goes with --sde-window-placement slide"),
                      (["--sde-window-shift", "3"], "they need --sde-window W"),
                      (["--sde-window-placement", "random"], "they need --sde-window W")):
        assert run_main(tmp_path, "--tiny", *bad) == 2
        assert says in capsys.readouterr().err


@pytest.mark.quick
def test_a_sliding_window_moves_one_step_every_shift_steps_from_the_noisiest_and_wraps():
    """MixGRPO's placement: a function of the training step alone (resume needs nothing saved), no random draw."""
    args = sd.parse_args(SMALL + ["--num-inference-steps", "6", "--sde-window", "2", "--sde-window-placement", "slide",
                                  "--sde-window-shift", "3"])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    starts = [int(sd.sde_window(args, gen, step)[1][0]) for step in range(14)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0]  # 4 starts keep the window in the 5 trainable steps
    assert torch.equal(gen.get_state(), state)
    etas, window = sd.sde_window(args, gen, 10)
    assert window.tolist() == [3, 4] and etas == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.quick
def test_the_first_window_is_the_noisiest_steps_always_and_the_random_one_draws_its_place():
    """The default placement: the W noisiest steps at every training step, no random draw (the run's noise is the
    same as with any other fixed placement); random: a start in [0, T - W) from the run's generator."""
    argv = SMALL + ["--num-inference-steps", "6", "--sde-window", "2", "--eta", "0.7"]
    first, rand = sd.parse_args(argv), sd.parse_args(argv + ["--sde-window-placement", "random"])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert all(sd.sde_window(first, gen, step)[1].tolist() == [0, 1] for step in range(20))
    assert torch.equal(gen.get_state(), state) and sd.sde_window(first, gen, 7)[0] == [0.7, 0.7, 0, 0, 0, 0]
    starts = {int(sd.sde_window(rand, gen, step)[1][0]) for step in range(200)}
    assert starts == {0, 1, 2, 3} and not torch.equal(gen.get_state(), state)
