"""A fork of safediffusion_r1.py: online Diffusion-DPO on safety-ranked pairs, built from the reference's parts.

The worked example of adding a method: an sd.Objective whose `update` is new. Models, sampler, steering reward, LoRA /
full fine-tune, memory flags, checkpoints, resume, torchrun, metrics, grids and export all come from
safediffusion_r1.train(args, DPO):
  1. SAMPLE  G images per prompt with the reference's sampler (its log-probs are simply not used);
  2. COST    safety cost = -steering reward (pluggable: train(args, reward_fn=...) as for GRPO);
  3. PAIR    per group, the lowest-cost image is preferred (x0_w), the highest-cost dispreferred (x0_l); groups
             whose reward spread is below --min-spread carry no preference and are skipped;
  4. TRAIN   Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, eq. 14 with the per-timestep ELBO): both final
             latents noised to one random t with one noise draw; e = ||noise - eps_theta(x_t, t, c)||^2 (mean over
             dims) for the policy and the frozen reference;
             L = -log sigmoid(-beta_dpo/2 [(e_w - e_l) - (e_w_ref - e_l_ref)]).
Option --focus-gamma: SC-DPO's "dynamic focusing" (arXiv 2504.14290) weights hard pairs more. Its exact form, its
safety cost model and its SCP-10K data are not public; we use the focal-loss form w = (1 - sigmoid(z))^gamma
(z the logit above, w detached), which grows as the policy ranks the pair less correctly. So this is Diffusion-DPO
with SC-DPO-style focusing on our steering cost, not SC-DPO.

Run:  python fork_dpo.py --tiny --steps 4                               # CPU, tiny random models: mechanics
      python toy_world.py demo --method dpo              # GRPO beside this fork in the toy world, one table
"""
import dataclasses

import torch
import torch.nn.functional as F

import safediffusion_r1 as sd


@dataclasses.dataclass
class DPOArgs(sd.Args):
    """The reference's flags, plus Diffusion-DPO's own under their own --help heading."""
    # -- Diffusion-DPO. The GRPO-only flags (--clip-range, --kl-coef, --adv-clip-max, --timestep-fraction) are still
    # checked and printed with the rest, but dpo_step never reads them: its KL is DPO's own, against pi_ref. --
    beta_dpo: float = sd.flag(5000.0, "DPO temperature beta_dpo (5000: the Diffusion-DPO SD 1.5 release)", group="DPO")
    focus_gamma: float = sd.flag(0.0, "SC-DPO-style dynamic focusing exponent; 0 = plain Diffusion-DPO")
    min_spread: float = sd.flag(1e-3, "skip groups whose reward max - min is below this (no preference)")
    dpo_timesteps: int = sd.flag(4, "noise draws (t, noise) per pair and step: DPO's Monte-Carlo over t")


def preference_pairs(rewards, group_size, min_spread):
    """(B,) rewards in consecutive groups of G -> (winner, loser) indices (K,), (K,) into the B samples: each kept
    group's highest- and lowest-reward sample (lowest / highest safety cost)."""
    r = rewards.float().view(-1, group_size)
    keep = (r.amax(1) - r.amin(1)) >= min_spread
    start = torch.arange(r.shape[0]) * group_size
    return (start + r.argmax(1))[keep], (start + r.argmin(1))[keep]


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta_dpo, focus_gamma=0.0):
    """Diffusion-DPO on denoising errors, all (K,):  z = -beta_dpo/2 [(e_w - e_l) - (e_w_ref - e_l_ref)],
    L = mean(w * -log sigmoid(z)), w = (1 - sigmoid(z))^gamma detached (1 when gamma = 0). -> (loss, info)."""
    z = -0.5 * beta_dpo * ((err_w - err_l) - (ref_err_w - ref_err_l))
    weight = (1 - torch.sigmoid(z)).detach() ** focus_gamma
    loss = (weight * -F.logsigmoid(z)).mean()
    with torch.no_grad():  # implicit_acc: share of pairs the policy already ranks better than the reference
        info = dict(policy_loss=loss.item(), implicit_acc=(z > 0).float().mean().item(),
                    err_w=err_w.mean().item(), err_l=err_l.mean().item())
    return loss, info


def denoising_errors(unet, x0, noise, t, embeds, scheduler):
    """||noise - eps_theta(x_t, t, c)||^2 averaged over (C, H, W), conditional branch only (as Diffusion-DPO trains);
    for a v-prediction model (SD 2.x-v) the error of v, its training target. x0, noise (N, C, h, w); t (N,); embeds
    (N, 77, D) -> (N,)."""
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    return ((sd.model_output(unet, x_t, t, embeds) - target) ** 2).flatten(1).mean(1)


def dpo_micro_batch(w, l, x0, embeds, policy, opt, args, gen):
    """One micro-batch of pairs (winner indices w, loser indices l): one (t, noise) draw per pair, the DPO loss, its
    backward (accumulated). -> dpo_loss's info."""
    t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (len(w),), generator=gen).to(x0.device)
    noise = torch.randn(x0[w].shape, generator=gen).to(x0.device)  # the same (t, noise) for both images
    pair = dict(x0=torch.cat([x0[w], x0[l]]), noise=torch.cat([noise, noise]), t=torch.cat([t, t]),
                embeds=torch.cat([embeds[w], embeds[l]]), scheduler=policy.scheduler)
    with policy.autocast():
        err = denoising_errors(policy.unet, **pair)
    with torch.no_grad(), sd.reference_unet(policy) as ref, policy.autocast():
        ref_err = denoising_errors(ref, **pair)
    loss, info = dpo_loss(*err.chunk(2), *ref_err.chunk(2), args.beta_dpo, args.focus_gamma)
    opt.scaler.scale(loss / args.gradient_accumulation_steps).backward()
    return info


def dpo_step(traj, rewards, policy, opt, args, gen):
    """DPO's Objective.update: pairs from the step's groups, then --dpo-timesteps noise draws per pair, each
    micro-batch of --train-batch-size pairs one backward; an optimizer step every --gradient-accumulation-steps."""
    win, lose = preference_pairs(rewards, args.group_size, args.min_spread)
    x0, embeds = traj["final_latents"], traj["prompt_embeds"]  # (B, C, h, w), (B, 77, D)
    result = sd.UpdateResult()
    batches = [i for _ in range(args.dpo_timesteps) for i in range(0, len(win), args.train_batch_size)]
    for n, i in enumerate(batches, 1):
        result.infos.append(dpo_micro_batch(win[i:i + args.train_batch_size], lose[i:i + args.train_batch_size],
                                            x0, embeds, policy, opt, args, gen))
        if n % args.gradient_accumulation_steps == 0 or n == len(batches):  # a partial last accumulation counts
            sd.optimizer_step(opt, args.max_grad_norm, result)
    for info in result.infos:
        info["pairs"] = float(len(win))
    return result


# beta_dpo is measured against the frozen starting model, so DPO needs pi_ref even at --kl-coef 0
DPO = sd.Objective(update=dpo_step, metrics=("policy_loss", "implicit_acc"), needs_reference=True)


def main(argv=None):
    """The fork's command line: the reference's main() with DPOArgs and DPO."""
    sd.main(argv, args_class=DPOArgs, objective=DPO)


if __name__ == "__main__":
    main()
