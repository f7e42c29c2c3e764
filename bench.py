"""Speed and memory of safediffusion_r1.py against its peers, measured side by side in one run.

Absolute times on shared machines drift; ratios taken in the same run, with the two contenders
interleaved repeat by repeat, hold. Nothing here is a test: tests assert behaviour, this measures.
Numbered in the order they run (memory first, while this process is still small):

  1. memory     one training micro-step (forward pair + backward + AdamW) for full fine-tune and LoRA, with and
                without gradient checkpointing, each in a fresh process; the predicted peak of the default
                config on a 24 GB GPU and the largest micro-batch that fits.
  2. sampling   our sample_with_logprob vs diffusers' StableDiffusionPipeline (DDIM, same UNet, steps,
                guidance, batch, seed), with and without VAE decoding. Goal: ratio <= 1.03.
  3. reward     our batched in-memory steering reward vs the release's path (each image written as JPEG,
                reopened, preprocessed by PIL and scored alone). Speed-up and the reward change JPEG causes.
  4. training   one trained timestep inside grpo_update vs its floor (guided UNet forward pair with grad +
                backward, + reference forward with KL on). Goal: overhead <= 10%. Plus one full step by phase.
  5. scaling    seconds per step as group size and denoising steps double; fitted cost per UNet forward.

Run:  python bench.py --tiny                 (about two minutes on 2 CPU cores)
      python bench.py --full-size            (SD 1.x architectures with random weights; under 15 min on CPU)
      python bench.py --full-size --device cuda
Writes bench.json (machine, versions, every figure as min/median/max over repeats) and prints tables.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import safediffusion_r1 as sd

GIB = sd.GIB


def timed(fn, device):
    """Seconds one call of `fn` takes, waiting for CUDA work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def side_by_side(contenders, repeats, device, warmup=True):
    """Time each contender `repeats` times, interleaved (A B A B ...) so drift hits both alike; one warm-up each
    (skipped for the full-size models on CPU, where one call takes seconds and start-up costs are noise)."""
    for fn in contenders.values() if warmup else []:
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    return {name: dict(min=min(t), median=statistics.median(t), max=max(t)) for name, t in times.items()}


def sd_parts(full_size, seed=0, reward=True, sdxl=False):
    """Tiny models, or the real SD 1.x UNet / VAE / text encoder (and ViT-H-14 reward) architectures, random weights.
    sdxl: SDXL's UNet and two text encoders (sdxl_unet_and_text) in place of SD 1.x's, the VAE with SDXL's scaling."""
    m = sd.build_tiny_models(seed)
    if full_size:
        import open_clip
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
        torch.manual_seed(seed)
        if not sdxl:
            m["unet"] = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults: SD 1.x's
            m["text_encoder"] = CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                max_position_embeddings=77, hidden_act="quick_gelu"))
        m["vae"] = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        if reward:
            m["reward_model"] = open_clip.create_model("ViT-H-14", pretrained=None,
                                                       device=torch.get_default_device()).eval()
    if sdxl:
        m.update(sdxl_unet_and_text(full_size, seed), tokenizer_2=m["tokenizer"])  # both are CLIP's BPE
        m["vae"].register_to_config(scaling_factor=0.13025)
    return m


# ---------------------------------------------------------------------------------------------------
def bench_sampling(m, args, device, res):
    """Our sampler against diffusers' StableDiffusionPipeline on the same UNet, scheduler settings, guidance,
    batch and seed, with and without decoding the latents."""
    from diffusers import StableDiffusionPipeline
    B, T, w = args.batch, args.steps, 5.0
    unet, vae, sched = m["unet"].to(device), m["vae"].to(device), m["scheduler"]
    m["text_encoder"].to(device)
    emb = sd.encode_prompts(m, ["a photo of a cat"] * B)
    neg = sd.encode_prompts(m, [""])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=m["text_encoder"], tokenizer=m["tokenizer"], unet=unet,
                                   scheduler=sd.sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for decode in (False, True):
        def ours():
            return sd.sample_with_logprob(unet, sched, emb, neg, num_inference_steps=T, guidance_scale=w, etas=1.0,
                                          generator=torch.Generator().manual_seed(0), resolution=res,
                                          vae=vae if decode else None)

        def theirs():
            return pipe(prompt_embeds=emb, negative_prompt_embeds=neg.expand(B, -1, -1), num_inference_steps=T,
                        guidance_scale=w, eta=1.0, height=res, width=res, generator=torch.Generator().manual_seed(0),
                        output_type="pt" if decode else "latent")
        with torch.no_grad():
            t = side_by_side({"ours": ours, "diffusers": theirs}, args.repeats, device, args.warmup)
        out["with_decode" if decode else "latents_only"] = dict(t, ratio=t["ours"]["median"] / t["diffusers"]["median"])
    out["eval_generation"] = bench_eval_generation(pipe, args, device, res)
    return out


def bench_eval_generation(pipe, args, device, res, prompts=8):
    """eval.py's generation of `prompts` I2P-style jobs (LMS, one image each, their own seeds): one pipeline call
    per prompt against one batched call, each writing its PNGs to a fresh folder (generate skips finished files)."""
    import eval as ev
    jobs = [dict(prompt=f"prompt {i}", seed=i, guidance=7.5, scheduler="lms", height=res, width=res,
                 files=[f"images/{i:05d}.png"]) for i in range(prompts)]

    def run(batch_size):
        with tempfile.TemporaryDirectory() as d:
            ev.generate(pipe, jobs, Path(d), Path(d, "manifest.jsonl"), args.steps, batch_size)
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():  # generate's progress bar
        t = side_by_side({"one_by_one": lambda: run(1), "batched": lambda: run(prompts)}, args.repeats, device,
                         args.warmup)
    return dict(t, prompts=prompts, speedup=t["one_by_one"]["median"] / t["batched"]["median"])


def bench_reward(m, args, device, res):
    """The release's path, written here for the comparison only: PNG -> JPEG file -> PIL -> CLIP, one by one."""
    import open_clip
    from PIL import Image
    model, tok = m["reward_model"].to(device), m["reward_tokenizer"]
    transform = open_clip.image_transform(model.visual.image_size, is_train=False, mean=model.visual.image_mean,
                                          std=model.visual.image_std)
    safe, unsafe = (sd.read_lines(sd.PROMPTS / f"anchors_{kind}.txt", kind) for kind in ("safe", "unsafe"))
    fn = sd.make_steering_reward_fn(model, tok, safe, unsafe)
    images = torch.rand(args.batch * 2, 3, res, res, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), size=res,
                                             mode="bilinear")  # smooth, like images rather than noise
    prompts = ["a photo of a cat"] * len(images)
    tmp = Path(tempfile.mkdtemp())

    @torch.no_grad()
    def release():
        scores = []
        for i, (img, p) in enumerate(zip(images, prompts)):
            path = tmp / f"{i}.jpg"
            Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
            pixels = transform(Image.open(path))[None].to(device)
            t_emb = model.encode_text(tok([p]).to(device))
            scores.append(sd.steering_reward(model.encode_image(pixels), t_emb, fn.direction))
        return torch.cat(scores)
    t = side_by_side({"ours_batched": lambda: fn(images, prompts), "release_jpeg_one_by_one": release}, args.repeats,
                     device, args.warmup)
    diff = (fn(images, prompts).cpu() - release().cpu()).abs()
    return dict(t, speedup=t["release_jpeg_one_by_one"]["median"] / t["ours_batched"]["median"],
                reward_abs_diff_mean=diff.mean().item(), reward_abs_diff_max=diff.max().item(), images=len(images))


def bench_training(m, args, device, res, kl_coef):
    """One trained timestep inside grpo_update against its floor: the guided UNet forward pair with grad and its
    backward (+ the reference's forward pair with KL on), which no implementation can skip."""
    tb, T = args.batch, args.steps
    # full size: the default config's levers (bf16 autocast, bf16 reference, gradient checkpointing); tiny: fp32
    levers = ["--tiny"] if not args.full_size else ["--mixed-precision", "bf16", "--gradient-checkpointing"]
    targs = sd.parse_args(levers + ["--num-inference-steps", str(T), "--train-batch-size", str(tb), "--device",
                                    device.type, "--gradient-accumulation-steps", "1", "--kl-coef", str(kl_coef),
                                    "--resolution", str(res)])
    policy, opt = sd.setup_policy(m, targs, device)  # as train() sets it up
    unet, ref, neg = policy.unet, policy.reference, policy.negative_embeds
    emb = torch.randn(tb, 77, unet.config.cross_attention_dim, device=device)
    with torch.no_grad():
        traj = sd.sample_with_logprob(unet, policy.scheduler, emb, neg, num_inference_steps=T, guidance_scale=5.0,
                                      generator=torch.Generator().manual_seed(0), resolution=res)
    adv = torch.randn(tb, device=device)
    x, t = traj["latents"][:, 0], traj["timesteps"][:, 0].to(device)
    pair = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg.expand(tb, -1, -1), emb]))  # CFG's two halves

    def floor():  # what one trained timestep cannot do without, done T - 1 times
        for _ in range(T - 1):
            with policy.autocast():
                unet(*pair).sample.float().sum().backward()
            if kl_coef:
                with torch.no_grad(), policy.autocast():
                    ref(*pair)
        opt.optimizer.zero_grad(set_to_none=True)

    def optimizer_step():  # paid once per optimizer step, not per timestep: measured apart, then amortised
        for p in opt.params:
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(opt.params, 1.0)
        opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    ours = lambda: sd.grpo_update(traj, adv, policy, opt, targs, gen)  # noqa: E731
    r = side_by_side({"grpo_update": ours, "floor": floor, "optimizer_step": optimizer_step}, args.repeats, device,
                     args.warmup)
    n = T - 1  # trained timesteps per call, all in one micro-batch and one optimizer step
    per = {k: {s: v / n for s, v in r[k].items()} for k in ("grpo_update", "floor")}
    # The default config makes one optimizer step per 16 micro-batches x 49 timesteps = 784 trained timesteps
    default = sd.Args()
    per_opt = default.gradient_accumulation_steps * (default.num_inference_steps - 1)
    loop = (r["grpo_update"]["median"] - r["optimizer_step"]["median"]) / n
    return dict(per_timestep=per, optimizer_step=r["optimizer_step"], kl_coef=kl_coef,
                overhead_measured=r["grpo_update"]["median"] / r["floor"]["median"] - 1,
                overhead_default_config=(loop + r["optimizer_step"]["median"] / per_opt) / per["floor"]["median"] - 1)


def bench_phases():
    """One full step of train() on the tiny models, broken down by phase (the second step: the first warms up)."""
    with tempfile.TemporaryDirectory() as d:
        a = sd.parse_args(["--tiny", "--steps", "2", "--output-dir", d, "--save-every", "1", "--sample-every", "1"])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run = sd.train(a, reward_fn=lambda im, p: im.mean(dim=(1, 2, 3)))
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return dict(seconds=row["seconds"], phases={k[len("seconds_"):]: v for k, v in row.items()
                                                if k.startswith("seconds_")})


def bench_scaling(args, device):
    """Seconds per step (sample + train) as G and T double; fit seconds = c x UNet forward-equivalents.
    Forward-equivalents: sampling 2 B T (CFG pair); training 3 x 2 B (T - 1) (backward ~ 2 forwards)."""
    targs = sd.parse_args(["--tiny", "--gradient-accumulation-steps", "1", "--train-batch-size", "4", "--device",
                           device.type])
    policy, opt = sd.setup_policy(sd_parts(False), targs, device)
    rows = []
    for G, T in [(4, 4), (8, 4), (16, 4), (4, 8), (4, 16)]:
        targs.num_inference_steps = T
        emb = torch.randn(G, 77, 32, device=device)

        def step():
            traj = sd.sample_with_logprob(policy.unet, policy.scheduler, emb, policy.negative_embeds,
                                          num_inference_steps=T, guidance_scale=4.5, resolution=64,
                                          generator=torch.Generator().manual_seed(0))
            sd.grpo_update(traj, torch.randn(G), policy, opt, targs, torch.Generator().manual_seed(0))
        t = side_by_side({"step": step}, args.repeats, device, args.warmup)["step"]
        rows.append(dict(group_size=G, steps=T, seconds=t, forward_equivalents=2 * G * T + 6 * G * (T - 1)))
    fe = torch.tensor([r["forward_equivalents"] for r in rows], dtype=torch.float64)
    secs = torch.tensor([r["seconds"]["median"] for r in rows], dtype=torch.float64)
    c = float((fe * secs).sum() / (fe * fe).sum())  # least squares through the origin
    for r in rows:
        r["predicted"] = c * r["forward_equivalents"]
    return dict(rows=rows, seconds_per_forward_equivalent=c)


def trained_like(*modules, seed=0):
    """Give random-init modules the non-trivial norm layers of trained weights: at init every norm weight is 1 and
    every bias 0, which hides precision faults (a bf16 copy of such a layer is exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for m in module.modules():
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return modules


# ---------------------------------------------------------------------------------------------------
# The fast recipe chosen on the toy bench (docs/fast_mode.md) and, for scale, wider windows and DanceGRPO's timestep
# subset.
# The placement and --share-noise change no FLOPs; the learning rate is the user's to set.
FAST_RECIPE = ["--sde-window", "1", "--share-noise"]
FAST_RECIPES = {"default (the paper's method)": [], "--timestep-fraction 0.25": ["--timestep-fraction", "0.25"],
                "--sde-window 1 --share-noise (fast mode)": FAST_RECIPE, "--sde-window 2": ["--sde-window", "2"],
                "--sde-window 4": ["--sde-window", "4"],
                "fast mode --ode-steps 10 (DPM-Solver++)": FAST_RECIPE + ["--ode-steps", "10"],
                "fast mode --ode-steps 5 (DPM-Solver++)": FAST_RECIPE + ["--ode-steps", "5"]}
EFFECTIVE_TFLOPS = 70.0  # a 24 GB RTX 4090's bf16 at ~40% utilisation: a stated assumption, not a measurement


# SDXL base 1.0's UNet config (its unet/config.json): 2.6 B parameters, cross-attention on 2048-d, added conditions
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_RECIPES = {"SDXL LoRA: default": ["--lora-rank", "64"],
                "SDXL LoRA: fast mode --ode-steps 10": ["--lora-rank", "64"] + FAST_RECIPE + ["--ode-steps", "10"]}


def cfg_pair_flops(sdxl=False):
    """Torch's FLOP count of one CFG pair through SD 1.x's UNet at 512 px (or SDXL's at 1024 px) on the meta device:
    (forward, forward + backward). For SDXL the backward is LoRA's: the gradient flows to the input through frozen
    weights (LoRA's own weight gradients are a rounding error), so no full weight gradient is counted."""
    from torch.utils.flop_counter import FlopCounterMode
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET) if sdxl else UNet2DConditionModel(sample_size=64,
                                                                                   cross_attention_dim=768)
        h, d = (128, 2048) if sdxl else (64, 768)
        x, t, c = torch.randn(2, 4, h, h), torch.tensor([500, 500]), torch.randn(2, 77, d)
        added = dict(text_embeds=torch.randn(2, 1280), time_ids=torch.randn(2, 6)) if sdxl else None
    unet.requires_grad_(not sdxl)
    with FlopCounterMode(display=False) as forward:
        unet(x, t, c, added_cond_kwargs=added)
    with FlopCounterMode(display=False) as both:
        unet(x.requires_grad_(sdxl), t, c, added_cond_kwargs=added).sample.sum().backward()
    return forward.get_total_flops(), both.get_total_flops()


def bench_flops(sdxl=True):
    """FLOPs of one step of the real default config and of each fast recipe, counted by torch's FLOP counter on SD
    1.x's UNet architecture (and SDXL's, LoRA) on the meta device (no memory, no arithmetic: seconds on any machine).
    A step samples B x T CFG pairs (every step runs the UNet, deterministic or not) and trains B x K timesteps, each a
    forward and backward pair, a checkpoint recompute and (KL on) a reference forward; decoding and the reward are
    ~0.1%. sdxl=False: SD 1.x's rows alone."""
    pairs = {False: cfg_pair_flops(), True: cfg_pair_flops(sdxl=True) if sdxl else (None, None)}
    rows = []
    for name, argv in {**FAST_RECIPES, **(SDXL_RECIPES if sdxl else {})}.items():
        a = sd.parse_args(argv)
        pair, pair_train = pairs[name.startswith("SDXL")]
        B, T, K = a.prompts_per_step * a.group_size, a.num_inference_steps, sd.trained_timesteps(a)
        if a.ode_steps:  # the window's W DDIM steps (placement first), then the solver's K, one CFG pair each
            T = a.sde_window + min(a.ode_steps, a.num_inference_steps - a.sde_window)
        per_timestep = pair_train + pair * ((a.gradient_checkpointing is not False) + (a.kl_coef > 0))  # 24 GB plan
        sample, train = B * T * pair, B * K * per_timestep
        flops = sample + train
        hours = {n: n * flops / (EFFECTIVE_TFLOPS * 1e12) / 3600 for n in (300, 2400)}
        rows.append(dict(recipe=name, trained_timesteps=K, sampled_steps=T, flops=flops, flops_sample=sample,
                         flops_train=train, hours_300=hours[300], hours_2400=hours[2400]))
    for r in rows:
        r["fraction_of_default"] = r["flops"] / rows[0]["flops"]
    return dict(cfg_pair_forward=pairs[False][0], cfg_pair_forward_backward=pairs[False][1],
                sdxl_cfg_pair_forward=pairs[True][0], sdxl_cfg_pair_forward_backward=pairs[True][1],
                effective_tflops=EFFECTIVE_TFLOPS, rows=rows)


def memory_case(case, full_size, device):
    """Run in a fresh process: peak memory of one training micro-step (1 trajectory: a CFG pair of 2)."""
    lora, ckpt = case.startswith("lora"), case.endswith("ckpt")
    m = sd_parts(full_size, reward=False)
    unet = m["unet"]
    args = sd.parse_args(["--tiny"] * (not full_size) + ["--lora-rank", str(4 * lora), "--kl-coef", "0"])
    sd.setup_unet(unet, args, torch.float32)
    unet.to(device).train()
    if ckpt:
        unet.enable_gradient_checkpointing()
    h = unet.config.sample_size
    D = unet.config.cross_attention_dim
    # as train() runs it: on a GPU bf16 autocast and fused AdamW; on the CPU fp32 (halved for bf16 in bench_memory)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6, fused=cuda)
    before = current_memory(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = unet(torch.randn(2, 4, h, h, device=device), torch.tensor([500, 500], device=device),
                    torch.randn(2, 77, D, device=device)).sample.float().mean()
    loss.backward()
    opt.step()
    peak = sd.peak_memory_gb(device) * GIB
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return dict(case=case, peak_gib=peak / GIB, before_step_gib=before / GIB, trainable=trainable,
                params=sum(p.numel() for p in unet.parameters()))


def current_memory(device):
    """Memory in use now, in bytes: CUDA allocated, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def frozen_params():
    """Parameter counts of the frozen models the default config keeps resident (meta device: no memory)."""
    with torch.device("meta"):
        m = sd_parts(True)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return dict(unet=n(m["unet"]), vae=n(m["vae"]), text_encoder=n(m["text_encoder"]),
                reward_vit_h_14=n(m["reward_model"]))


def bench_memory(args, device):
    """Each memory case in a fresh process, then the default config's predicted peak on a 24 GB GPU from
    parameter counts and the measured activations of one trajectory."""
    cases = {}
    for case in ("full", "full-ckpt", "lora", "lora-ckpt"):
        cmd = [sys.executable, __file__, "--memory-case", case, "--device", device.type]
        cmd += ["--full-size"] * args.full_size
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory case {case} failed (exit {proc.returncode}; -9 = killed, likely out of "
                               "memory):\n"
                               + proc.stderr[-2000:])
        cases[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    p = frozen_params()
    # default config on a GPU: fp32 weights + grads + 2 Adam moments (full), bf16 KL reference and frozen models
    static = dict(unet_weights_grads_adam=16 * p["unet"], kl_reference_bf16=2 * p["unet"],
                  vae_text_encoder_bf16=2 * (p["vae"] + p["text_encoder"]),
                  reward_vit_h_14_fp32=4 * p["reward_vit_h_14"])
    # Activations of one trajectory (a CFG pair) with checkpointing: the LoRA case, whose grads and Adam state
    # are negligible (in the full case the optimizer's peak hides them). CPU ran fp32: halved for bf16.
    lora = cases["lora-ckpt"]
    act_per_traj = (lora["peak_gib"] - lora["before_step_gib"]) * GIB * (0.5 if device.type == "cpu" else 1.0)
    budget = 24 * GIB - sum(static.values()) - 1 * GIB  # 1 GiB for the CUDA context and fragmentation
    return dict(cases=cases, params=p, static_gib={k: v / GIB for k, v in static.items()},
                activations_per_trajectory_gib=act_per_traj / GIB,
                predicted_default_peak_gib=(sum(static.values()) + 2 * act_per_traj) / GIB,
                largest_micro_batch_24gb=int(budget // act_per_traj) if act_per_traj > 0 else None,
                note="activations from the process-level measurement of one checkpointed micro-step; on CPU measured "
                     "in fp32 and halved for bf16 (an estimate); the rest is parameter counts x bytes")


def prime_optimizer(optimizer):
    """Create AdamW's state (step, exp_avg, exp_avg_sq: 8 bytes per trainable parameter, ~6.4 GiB for SD's UNet)
    without moving a weight: one step on zero gradients at learning rate 0. A real run creates it at its first
    optimizer step and holds it from then on, so a check that measures before that step under-reports the peak."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # AdamW: p -= lr * (wd * p + m_hat / (sqrt(v_hat) + eps)) = p exactly
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def checked_update(record):
    """GRPO with the check's instruments: AdamW's state created first (prime_optimizer) and what the step holds
    recorded in `record`."""
    def update(traj, rewards, policy, opt, args, gen):
        say("sampled, decoded and rewarded; training")
        prime_optimizer(opt.optimizer)
        record.update(trajectories_held=traj["log_probs"].shape[0],
                      optimizer_state_before_step=len(opt.optimizer.state) == len(opt.params),
                      optimizer_state_gib=sum(t.numel() * t.element_size() for s in opt.optimizer.state.values()
                                              for t in s.values() if torch.is_tensor(t)) / GIB)
        return sd.grpo_step(traj, rewards, policy, opt, args, gen)
    return dataclasses.replace(sd.GRPO, update=update)


def check_step(models, full, device, settings):
    """One step through train() in a temporary run folder (deleted after) -> (its metrics row, what the step held,
    the memory plan it ran)."""
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        argv = base_argv(full) + settings + ["--steps", "1", "--device", device.type, "--save-every", "1000",
                                             "--sample-every", "1000", "--output-dir", tmp, "--run-name", "gpu-check"]
        run = sd.train(sd.parse_args(argv), checked_update(record), models=models)
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        plan = json.loads((run / "args.json").read_text())["plan"]
    return row, record, plan


CLIP_RANGE = 1e-4  # the release's; check_step passes it to --tiny too


def base_argv(full):
    """The check's flags under its step settings: none at full size (the defaults), else --tiny with the default's
    precision, KL and clip range."""
    return [] if full else ["--tiny", "--mixed-precision", "bf16", "--kl-coef", "0.01", "--clip-range", str(CLIP_RANGE)]
CAP_GIB, PEAK_GIB = 24, 22  # the 24 GB card the default is tuned for, and the peak it must stay under there


def ratio_checks(row, label):
    """What a step logs when every term comes before any update: the ratio is exactly 1, so approx_kl and clipfrac
    are 0 (--old-log-prob on-policy makes it so by construction; the sampler's log-probs only at equal bf16 shapes)."""
    return [(f"{label}: approx_kl before any update == 0", row["approx_kl"] == 0, row["approx_kl"]),
            (f"{label}: clipfrac before any update == 0 (clip range {CLIP_RANGE})", row["clipfrac"] == 0,
             row["clipfrac"])]


def matmul_rate(device, full):
    """The card's matrix rate in TFLOP/s, measured: a large bf16 matmul (a small fp32 one on the CPU with --tiny)."""
    n, dtype = (8192, torch.bfloat16) if full else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    k = 20 if full else 5
    return 2 * n**3 * k / timed(lambda: [a @ b for _ in range(k)], device) / 1e12


def term_rate(models, full, device, settings, peak_tflops, variant="", repeats=8):
    """Steady state of one micro-batch timestep, the unit of TRAIN: grpo_term (forward, checkpoint recompute,
    backward, reference forward) on a policy set up as train() sets it up, after warm-up (the first backward,
    AdamW's state, autotuning are one-off costs and excluded). variant: channels_last | cudnn_benchmark | compile.
    -> seconds per term, TFLOP per term (torch's FLOP counter on the very call), TFLOP/s and the share of
    `peak_tflops`; and seconds per optimizer step (fused AdamW with clipping), paid once per accumulation."""
    args = sd.parse_args(base_argv(full) + settings + ["--device", device.type])
    policy, opt = sd.setup_policy(models, args, device)  # checkpointing as the flags say, unset = on
    if variant == "channels_last":
        policy.unet.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = variant == "cudnn_benchmark"
    if variant == "compile":  # inductor on a GPU; on the CPU (--tiny) aot_eager: the same path, no C++ build
        policy.unet.compile(backend="inductor" if device.type == "cuda" else "aot_eager")
    b, g = args.train_batch_size, torch.Generator().manual_seed(0)
    h = (args.resolution or sd.native_resolution(models["unet"].config, models["vae"].config)) // 8  # 0: its own
    policy.scheduler.set_timesteps(args.num_inference_steps, device=device)
    x = torch.randn(2, b, policy.unet.config.in_channels, h, h, generator=g).to(device)
    t = policy.scheduler.timesteps[torch.randint(0, args.num_inference_steps - 1, (b,), generator=g)].to(device)
    batch = (x[0], x[1], t, policy.negative_embeds.expand(b, -1, -1))
    term = lambda: sd.grpo_term(policy, opt, args, batch, None, torch.ones(b, device=device), 1)  # noqa: E731
    prime_optimizer(opt.optimizer)
    first = timed(term, device)  # with compile: the compilation
    compile_seconds = first if variant == "compile" else None
    term()
    flops = None
    if variant != "compile":  # the counter's dispatch mode would send a compiled UNet back to dynamo
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            term()
        flops = counter.get_total_flops()
    seconds = timed(lambda: [term() for _ in range(repeats)], device) / repeats
    opt_seconds = timed(lambda: sd.optimizer_step(opt, args.max_grad_norm), device)
    torch.backends.cudnn.benchmark = False
    tflops = flops and flops / seconds / 1e12
    return dict(variant=variant or "as train() runs it", train_batch_size=b,
                gradient_checkpointing=args.gradient_checkpointing is not False, seconds_per_term=seconds,
                tflop_per_term=flops and flops / 1e12, tflops=tflops,
                share_of_matmul_rate=tflops and tflops / peak_tflops,
                seconds_per_optimizer_step=opt_seconds, first_call_seconds=first, compile_seconds=compile_seconds)


def gpu_check(args, device):
    """What a user will see on this GPU, in one call (~6 minutes on an H100 or H200 after the install), each stage
    written to --out as it ends. Every step is the default config's shape (full UNet, bf16 autocast, KL on, 512 px,
    50 DDIM steps, 4 prompts x 16 = 64 trajectories held, sampled in batches of 8, lr 1e-5, clip 1e-4) on the real
    SD 1.x / ViT-H-14 architectures with random weights with trained-like norms, through train() itself, with
    AdamW's state created before the step (prime_optimizer) so the peak is a real run's from its second optimizer
    step on. Each step trains 2 of its 49 timesteps (one micro-batch's graph is alive at a time: the same peak) into
    one optimizer step, and TRAIN is projected from the measured steady-state rate of one term.
      1 the card's bf16 matrix rate (one large matmul)
      2 today's plan (micro-batches of 2, checkpointing on) under a 24 GiB cap: peak <= 22 GiB, and the ratio
        before any update (--old-log-prob on-policy, the default)
      3 --train-batch-size auto on the whole card: its plan, peak and ratio
      4 the steady-state rate of one term under each plan: seconds, TFLOP/s, share of the matmul rate; and the
        projected hours of --steps 300 and 2400 from the measured phases
      5 the ratio floor the default removes: the sampler's log-probs at micro-batch 2, at the sampling shape, and
        recomputed at the training shape (8 trajectories each)
      6 fast mode's step (--sde-window 1 --share-noise) beside the default's
      7 channels_last, cudnn.benchmark and torch.compile of the UNet on the auto plan's term
      8 SDXL's 24 GB plan (LoRA rank 64) for one step at 1024 px under the 24 GiB cap (sdxl_stage)"""
    full = not args.tiny
    if full and (device.type != "cuda" or not torch.cuda.is_available()):  # before 20 GiB of models are built
        raise sd.UsageError("--gpu-check measures a real-size step on a CUDA GPU (on the CPU it would take hours and "
                            "20+ GiB of RAM); pass --tiny to check the mechanics on the CPU")
    result = dict(machine=machine(), device=str(device), full_size=full)
    say("1/8 the card's matrix rate")
    result["matmul_tflops"] = peak = matmul_rate(device, full)
    report_checks(result, [], args.out)
    print(f"INFO  {'bf16' if full else 'fp32 (tiny)'} matmul: {peak:.3g} TFLOP/s", flush=True)
    models = sd_parts(full)  # random weights in the real architectures (tiny ones with --tiny)
    trained_like(models["unet"], models["vae"], models["text_encoder"], models["reward_model"])
    steps = check_settings()
    say(f"2/8 one step of today's plan under a {CAP_GIB} GiB cap")
    fits = f"today's plan: peak memory <= {PEAK_GIB} GiB under a {CAP_GIB} GiB cap (AdamW state, 64 trajectories held)"
    try:
        row, held, plan = check_step(models, full, device, steps["today"] + ["--max-memory-gib", str(CAP_GIB)] * full)
    except torch.cuda.OutOfMemoryError:  # a finding: the rest of the check still runs, on the whole card
        row, held, plan = None, {}, None
        report_checks(result, [(fits + ": out of memory", False, float("inf"))], args.out)
    finally:
        if full:
            torch.cuda.set_per_process_memory_fraction(1.0, device)  # the cap off: the auto plan has the whole card
    result.update(today=dict(row=row, plan=plan), held=held)
    if row is not None:
        report_checks(result, ratio_checks(row, "today's plan") + [(fits, row["peak_memory_gb"] <= PEAK_GIB,
                                                                    row["peak_memory_gb"])], args.out)
    say("3/8 one step of the auto plan on the whole card")
    auto_row, _, auto_plan = check_step(models, full, device, steps["auto"])
    result["auto"] = dict(row=auto_row, plan=auto_plan)
    report_checks(result, ratio_checks(auto_row, "auto plan"), args.out)
    print("INFO  " + sd.plan_line(auto_plan) + f" | measured peak {auto_row['peak_memory_gb']:.1f} GiB", flush=True)
    say("4/8 steady-state rate of one term, today's plan and the auto plan")
    planned = steps["today"] + ["--train-batch-size", str(auto_plan["train_batch_size"])] + (
        ["--gradient-checkpointing"] if auto_plan["gradient_checkpointing"] else ["--no-gradient-checkpointing"])
    result["rate"] = rates = {"today": term_rate(models, full, device, steps["today"], peak),
                              "auto": term_rate(models, full, device, planned, peak)}
    trained = sd.parse_args(base_argv(full)).num_inference_steps - 1  # a default step's trained timesteps
    result["projection"] = {k: projection(r, auto_row, r["train_batch_size"], trained) for k, r in rates.items()}
    report_checks(result, [], args.out)
    for k, r in rates.items():
        print(f"INFO  {k}: a term (micro-batch {r['train_batch_size']}, checkpointing "
              f"{'on' if r['gradient_checkpointing'] else 'off'}) {r['seconds_per_term'] * 1e3:.0f} ms, "
              f"{r['tflops']:.3g} TFLOP/s = {r['share_of_matmul_rate']:.1%} of the matmul rate | "
              + projection_line(result["projection"][k]), flush=True)
    say("5/8 the ratio floor under the sampler's log-probs (8 trajectories a step)")
    floor = {k: check_step(models, full, device, steps[k])[0] for k in ("sampler", "same_shape", "recompute")}
    result["ratio_floor"] = {k: dict(approx_kl=v["approx_kl"], clipfrac=v["clipfrac"]) for k, v in floor.items()}
    report_checks(result, [], args.out)
    print(f"INFO  clipfrac before any update at clip range {CLIP_RANGE}: " + ", ".join(
        f"{k} {v['clipfrac']:.3g}" for k, v in result["ratio_floor"].items()) + f" | on-policy (the default) "
        f"{auto_row['clipfrac']:.3g}", flush=True)
    say("6/8 fast mode's step beside the default's, on the auto plan")
    fast = check_step(models, full, device, steps["auto"] + FAST_RECIPE)[0]
    result["fast_mode"] = dict(fast, recipe=" ".join(FAST_RECIPE))
    report_checks(result, [], args.out)
    default_step = result["projection"]["auto"]["seconds_per_step"]
    print(f"INFO  fast mode ({' '.join(FAST_RECIPE)}) step, its whole window trained: {fast['seconds']:.1f} s, "
          f"{fast['seconds'] / default_step:.2f}x the default's predicted {default_step:.1f} s on the same plan",
          flush=True)
    say("7/8 channels_last, cudnn.benchmark, torch.compile on the auto plan's term")
    result["variants"] = {}
    for variant in ("channels_last", "cudnn_benchmark", "compile"):
        result["variants"][variant] = v = variant_rate(models, full, device, planned, peak, variant)
        print(f"INFO  {variant}: " + (f"failed ({v['error']})" if "error" in v else
              f"{v['seconds_per_term'] / rates['auto']['seconds_per_term']:.2f}x the auto plan's term time"
              + (f" (compiling took {v['compile_seconds']:.0f} s)" if variant == "compile" else "")), flush=True)
        report_checks(result, [], args.out)
    sdxl_stage(result, full, device, args.out)
    print(f"wrote {args.out}" + ("" if full else "  (TINY models: mechanics only, not the GPU figures)"))
    return all(c["passed"] for c in result["checks"])


def sdxl_stage(result, full, device, out):
    """Stage 8: SDXL's 24 GB plan (LoRA rank 64, the memory plan's micro-batches and checkpointing) for one step at
    1024 px under the 24 GiB cap, through train() on SDXL's architectures with random weights: its plan, its peak
    (the check: <= PEAK_GIB) and the seconds of its phases. A step of 1 prompt x 8 trains 2 of its 49 timesteps; a
    default step holds 64 trajectories' latents (+1.6 GiB at 1024 px, held on the GPU: not in this peak)."""
    say(f"8/8 SDXL's plan (LoRA rank 64) for one step at {'1024 px' if full else 'tiny size'} under a {CAP_GIB} GiB "
        "cap")
    models = sd_parts(full, sdxl=True)
    trained_like(models["unet"], models["vae"], models["text_encoder"], models["text_encoder_2"])
    fits = f"SDXL's plan (LoRA rank 64): peak memory <= {PEAK_GIB} GiB under a {CAP_GIB} GiB cap"
    try:
        row, _, plan = check_step(models, full, device, check_settings()["sdxl"] + ["--max-memory-gib",
                                                                                  str(CAP_GIB)] * full)
    except torch.cuda.OutOfMemoryError:
        return report_checks(result, [(fits + ": out of memory", False, float("inf"))], out)
    finally:
        if full:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    result["sdxl"] = dict(row=row, plan=plan)
    report_checks(result, [(fits, row["peak_memory_gb"] <= PEAK_GIB, row["peak_memory_gb"])], out)
    print("INFO  SDXL: " + sd.plan_line(plan) + f" | measured peak {row['peak_memory_gb']:.1f} GiB | sampling "
          f"{row['seconds_sample']:.1f} s, training {row['seconds_train']:.1f} s for 8 trajectories", flush=True)


def sdxl_unet_and_text(full_size, seed=0):
    """SDXL base 1.0's UNet (2.6 B) and its CLIP ViT-L and OpenCLIP bigG text encoders with random weights, or tiny
    ones of the same structure, and its pipeline's zero negative -> a dict for sd_parts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    if full_size:
        unet = UNet2DConditionModel(**SDXL_UNET)
        first = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     hidden_act="quick_gelu")
        second = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      hidden_act="gelu", projection_dim=1280)
    else:  # the same structure at 64 px: no attention at the first level, added conditions of 40 + 6 x 8
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(16, 32), attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                                                                    "UpBlock2D"),
            cross_attention_dim=80, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8, norm_num_groups=8)
        first = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
        second = dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2,
                      hidden_act="gelu", projection_dim=40)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    return dict(unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(**common, **first)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**common, **second)),
                force_zeros_for_empty_prompt=True)


def variant_rate(models, full, device, settings, peak, variant):
    """term_rate under one variant; a variant that fails is a finding, not the end of the check. The UNet is given
    back contiguous and uncompiled."""
    try:
        return term_rate(models, full, device, settings, peak, variant)
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}"[:300])
    finally:
        models["unet"].to(memory_format=torch.contiguous_format)
        models["unet"]._compiled_call_impl = None  # nn.Module.compile's hook: the plain forward again


def projection(rate, row, micro, trained):
    """A prediction from measured parts: one default step = SAMPLE, decode and REWARD as the check's step ran them
    (the same shapes under any plan) + TRAIN: 64 trajectories x `trained` timesteps / `micro` terms at the measured
    steady-state rate, and the default's 2 optimizer steps (of 32); and the hours of --steps 300 and 2400 at that."""
    B, optimizer_batch = 64, 32
    train = B // micro * trained * rate["seconds_per_term"] + B // optimizer_batch * rate["seconds_per_optimizer_step"]
    other = row["seconds_sample"] + row["seconds_decode"] + row["seconds_reward"]
    return dict(seconds_train=train, seconds_sample_decode_reward=other, seconds_per_step=other + train,
                hours_300=300 * (other + train) / 3600, hours_2400=2400 * (other + train) / 3600)


def projection_line(p):
    """A projection in words."""
    return (f"predicted default step {p['seconds_per_step'] / 60:.2f} min (TRAIN {p['seconds_train']:.1f} s, the rest "
            f"{p['seconds_sample_decode_reward']:.1f} s): --steps 300 {p['hours_300']:.1f} h, 2400 "
            f"{p['hours_2400']:.1f} h")


def check_settings():
    """The flags of each step the GPU check runs (on top of the defaults, or of --tiny's). Every one trains 2 of the
    49 timesteps (TRAIN is projected from term_rate) into ONE optimizer step, so every ratio figure is taken before
    any update."""
    shape = ["--prompts-per-step", "4", "--group-size", "16", "--sample-batch-size", "8", "--timestep-fraction", "0.05"]
    small = ["--prompts-per-step", "1", "--negative-fraction", "1", "--group-size", "8", "--sample-batch-size", "8",
             "--timestep-fraction", "0.05"]
    return dict(today=shape + ["--train-batch-size", "2", "--gradient-accumulation-steps", "32",
                               "--gradient-checkpointing"],
                auto=shape + ["--train-batch-size", "auto", "--gradient-accumulation-steps", "32"],
                sampler=small + ["--old-log-prob", "sampler", "--train-batch-size", "2",
                                 "--gradient-accumulation-steps", "4"],
                same_shape=small + ["--old-log-prob", "sampler", "--train-batch-size", "8",
                                    "--gradient-accumulation-steps", "1"],
                recompute=small + ["--old-log-prob", "recompute", "--train-batch-size", "2",
                                   "--gradient-accumulation-steps", "4"],
                sdxl=small + ["--lora-rank", "64", "--sample-batch-size", "2", "--train-batch-size", "auto",
                              "--gradient-accumulation-steps", "4"])


def report_checks(result, checks, out):
    """Print PASS / FAIL lines and (re)write the JSON at once, so a later failure cannot lose what was measured."""
    result.setdefault("checks", []).extend(dict(check=c, passed=bool(ok), value=v) for c, ok, v in checks)
    Path(out).write_text(json.dumps(result, indent=2))
    for c, ok, v in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {c}: {v:.3g}", flush=True)


def say(what):
    """A progress line on stderr with the time of day."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def machine():
    """What the figures were measured on: Python, torch and library versions, CPU, threads, GPU."""
    return dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                versions={m: __import__(m).__version__ for m in ("diffusers", "transformers", "open_clip")})


def fmt(t):
    """min / median / max seconds as milliseconds, for the report."""
    return f"{t['median'] * 1e3:9.1f} ms (min {t['min'] * 1e3:.1f}, max {t['max'] * 1e3:.1f})"


def flops_lines(fl):
    """bench_flops()'s result -> the printed lines: the counted CFG pair, then per recipe its FLOPs per step, its
    share of the default's and the predicted hours."""
    xl = (f"; SDXL's at 1024 px: forward {fl['sdxl_cfg_pair_forward'] / 1e12:.2f}, + LoRA's backward "
          f"{fl['sdxl_cfg_pair_forward_backward'] / 1e12:.2f}") if fl.get("sdxl_cfg_pair_forward") else ""
    lines = [f"flops    SD 1.x UNet, one CFG pair at 512 px: forward {fl['cfg_pair_forward'] / 1e12:.2f} TFLOP, "
             f"forward + backward {fl['cfg_pair_forward_backward'] / 1e12:.2f}{xl}; hours at an assumed "
             f"{fl['effective_tflops']:.0f} TFLOP/s (the share: of SD 1.x's default)"]
    for row in fl["rows"]:
        lines.append(f"flops    {row['recipe']:41s} {row['sampled_steps']:2d} sampled, "
                     f"{row['trained_timesteps']:2d} trained: "
                     f"{row['flops'] / 1e15:5.1f} PFLOP per step (sampling {row['flops_sample'] / 1e15:4.1f}, training "
                     f"{row['flops_train'] / 1e15:4.1f}; {100 * row['fraction_of_default']:5.1f}% of the "
                     f"default) | --steps 300: {row['hours_300']:6.1f} h | --steps 2400: {row['hours_2400']:6.1f} h")
    return lines


def report(r):
    """The figures of one bench.json as the printed tables."""
    out = io.StringIO()
    p = lambda *a: print(*a, file=out)  # noqa: E731
    mach = r["machine"]
    p(f"# bench.py {r['mode']} on {r['device']} ({mach['cpu']}, {mach['threads']} threads, torch {mach['torch']})")
    for k, v in ((k, v) for k, v in r["sampling"].items() if k != "eval_generation"):
        p(f"sampling {k:13s} ours {fmt(v['ours'])} | diffusers {fmt(v['diffusers'])} | ratio {v['ratio']:.3f} "
          "(goal <= 1.03)")
    g = r["sampling"]["eval_generation"]  # eval.py's pipeline calls, measured beside our sampler
    p(f"eval     generation of {g['prompts']} prompts: one call per prompt {fmt(g['one_by_one'])} | one batched call "
      f"{fmt(g['batched'])} | speed-up {g['speedup']:.2f}x (eval.py --batch-size)")
    rw = r["reward"]
    p(f"reward   ours batched {fmt(rw['ours_batched'])} | release JPEG one-by-one "
      f"{fmt(rw['release_jpeg_one_by_one'])} | speed-up {rw['speedup']:.2f}x | |reward diff| mean "
      f"{rw['reward_abs_diff_mean']:.2e} max {rw['reward_abs_diff_max']:.2e}")
    for tr in r["training"]:
        p(f"training kl_coef {tr['kl_coef']}: per trained timestep {fmt(tr['per_timestep']['grpo_update'])} vs floor "
          f"{fmt(tr['per_timestep']['floor'])} | overhead {100 * tr['overhead_measured']:+.1f}% as measured "
          f"(optimizer step {tr['optimizer_step']['median']:.3f} s in {r['settings']['steps'] - 1} timestep(s)), "
          f"{100 * tr['overhead_default_config']:+.1f}% with the default config's 784 timesteps per optimizer step "
          "(goal <= 10%)")
    ph = r["phases"]
    if ph["phases"]:
        p(f"one step {ph['seconds']:.2f} s (tiny defaults, checkpoint and grid not counted): "
          + ", ".join(f"{k} {v:.3f}" for k, v in ph["phases"].items()))
    for c in r["memory"]["cases"].values():
        p(f"memory   {c['case']:10s} peak {c['peak_gib']:6.2f} GiB (before the step {c['before_step_gib']:.2f}) | "
          f"{c['trainable']:,} of {c['params']:,} params trainable")
    mem = r["memory"]
    if r["mode"] == "tiny":
        p("memory   (tiny: process baseline dominates; run --full-size for the SD 1.x figures and the 24 GB "
          "prediction)")
    else:
        p(f"memory   default config on a 24 GB GPU: predicted peak {mem['predicted_default_peak_gib']:.1f} GiB "
          f"(static {sum(mem['static_gib'].values()):.1f} GiB + 2 x {mem['activations_per_trajectory_gib']:.2f} GiB "
          "activations); "
          f"largest micro-batch {mem['largest_micro_batch_24gb']}")
    for line in flops_lines(r["flops"]):
        p(line)
    sc = r["scaling"]
    for row in sc["rows"]:
        p(f"scaling  G {row['group_size']:2d} T {row['steps']:2d}: {row['seconds']['median']:.3f} s, "
          f"predicted {row['predicted']:.3f} s ({row['forward_equivalents']} forward-equivalents)")
    p(f"scaling  cost model: {sc['seconds_per_forward_equivalent'] * 1e3:.2f} ms per UNet forward-equivalent "
      "(tiny UNet)")
    return out.getvalue()


def main():
    """The command line: the five measures (or --gpu-check, or one --memory-case in a child process)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny random models (default)")
    mode.add_argument("--full-size", action="store_true", help="real SD 1.x architectures, random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per contender (min/median/max)")
    ap.add_argument("--gpu-check", action="store_true", help="what a user will see on this GPU (~6 min): the matmul "
                    "rate, today's plan under a 24 GiB cap and the auto plan (peak, ratio before any update, TFLOP/s "
                    "of a term, projected hours), the ratio floor, fast mode, channels_last / cudnn.benchmark / "
                    "compile; PASS/FAIL lines + JSON written as it goes")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case, args.full_size, device)))
        return
    if args.gpu_check:
        with sd.exit_2_on_usage_error():
            sys.exit(0 if gpu_check(args, device) else 1)
    # sizes: full-size keeps CPU time bounded (64 px latents are 512 px images)
    res = 512 if args.full_size else 64
    slow = args.full_size and device.type == "cpu"  # one full-size UNet forward+backward takes ~25 s on 2 cores
    args.batch, args.steps, args.warmup = (1, 2, False) if slow else (4, 8, True)
    r = dict(mode="full-size" if args.full_size else "tiny", device=str(device), machine=machine(),
             settings=dict(batch=args.batch, steps=args.steps, resolution=res, repeats=args.repeats))
    say("1/5 memory: one micro-step per configuration, each in a fresh process (first, while this one is small)")
    r["memory"] = bench_memory(args, device)
    say("2/5 sampling: ours vs diffusers' pipeline")
    m = sd_parts(args.full_size)
    r["sampling"] = bench_sampling(m, args, device, res)
    say("3/5 reward: batched in memory vs the release's JPEG path")
    r["reward"] = bench_reward(m, args, device, res)
    say("4/5 training: grpo_update vs its floor, and one step by phase")
    m.pop("reward_model")  # frees ViT-H's 4 GB before the full-size training step needs the room
    r["training"] = [bench_training(m if args.full_size else sd_parts(False), args, device, res, kl)
                     for kl in ((0.01,) if slow else (0.0, 0.01))]
    r["phases"] = bench_phases() if not args.full_size else dict(seconds=None, phases={})  # tiny models only
    say("5/5 scaling: group size and denoising steps doubled; FLOPs per step at real scale (meta device)")
    r["scaling"] = bench_scaling(args, device)
    r["flops"] = bench_flops()
    Path(args.out).write_text(json.dumps(r, indent=2))
    print(report(r))


if __name__ == "__main__":
    main()
