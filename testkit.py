"""The tests' shared helpers: tiny models and runs, stand-ins in the real on-disk layouts, workers for
several processes. Fixtures that build them once are in conftest.py."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub, which reads it once
import pytest  # noqa: E402
import torch  # noqa: E402

import eval as ev  # noqa: E402
import fork_dpo  # noqa: E402
import safediffusion_r1 as sd  # noqa: E402
import toy_world as tw  # noqa: E402
from bench import trained_like  # noqa: E402

HERE = Path(__file__).resolve().parent
# Smallest settings that still exercise every phase: 2 prompts x group 4, 4 DDIM steps, 2 optimizer steps.
SMALL = ["--tiny", "--num-inference-steps", "4", "--group-size", "4", "--sample-batch-size", "8",
         "--train-batch-size", "4", "--save-every", "1000", "--sample-every", "1000"]


def small_args(tmp_path, *extra):
    return sd.parse_args(SMALL + ["--output-dir", str(tmp_path / "runs")] + list(extra))


def metrics(run_dir):
    """The rows of a run's metrics.jsonl, as dicts."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tiny_policy(*argv, world=1, args_class=sd.Args, reference=False):
    """Fresh tiny models set up as train() sets them up (sd.setup_policy), on the CPU. -> (policy, opt, args)."""
    args = sd.parse_args(["--tiny", *argv], args_class)
    torch.manual_seed(0)  # LoRA's initial weights come from the global RNG, as in train()
    return (*sd.setup_policy(sd.build_tiny_models(seed=0), args, torch.device("cpu"), world, reference), args)


def tiny_pipeline(unet=None):
    """A stock diffusers StableDiffusionPipeline over the tiny models, with `unet` in place of theirs if given."""
    from diffusers import StableDiffusionPipeline
    m = sd.build_tiny_models(seed=0)
    return StableDiffusionPipeline(**{k: m[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")},
                                   unet=unet or m["unet"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ------------------------------------------------------------------------------------------------
# Reward
# ------------------------------------------------------------------------------------------------
E = torch.eye(4)


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------
def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def trainable(run_dir, step):
    from safetensors.torch import load_file
    return load_file(Path(run_dir, "checkpoints", f"checkpoint-{step:06d}", "weights.safetensors"))


# ------------------------------------------------------------------------------------------------
# Real on-disk formats: tiny stand-ins saved the way the real files are laid out, with trained-like weights
# ------------------------------------------------------------------------------------------------
# SD 1.4's own model_index.json and scheduler_config.json (a PNDM config), as on the hub.
SD14_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.2.2",
              "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}


SD14_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.2.2", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


TINY_CLIP_CFG = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


# ------------------------------------------------------------------------------------------------
# Other base models: SD 2.x-v and SDXL stand-ins in their real layouts (configs as on the hub, tiny sizes)
# ------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-2-1's model_index.json and scheduler config, and stable-diffusion-xl-base-1.0's.
SD21_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
              "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
              "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
              "force_zeros_for_empty_prompt": True, "add_watermarker": None,
              "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


FAMILY_SIZE = 128  # the stand-ins' native image side: sample_size 16 x the VAE's 8


def standin_text_encoder(hidden, projection=0, seed=0):
    """A tiny CLIP text tower with SD 2.x / SDXL's config choices (gelu; SD 2.x's and OpenCLIP's pad token)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def save_standin_tokenizer(folder, pad):
    """The CLIP vocabulary in the slow-tokenizer files the hub ships; SD 2.x and SDXL's tokenizer_2 pad with '!'."""
    from transformers import CLIPTokenizer
    sd.clip_tokenizer(folder)  # writes vocab.json and merges.txt
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad,
                  model_max_length=77).save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)


def save_standin(folder, index, scheduler, unet, vae, encoders):
    """Write a diffusers folder: model_index.json, scheduler/, and each part with trained-like weights; `encoders`:
    folder name -> (text encoder, its tokenizer's pad token)."""
    from transformers import CLIPImageProcessor
    trained_like(unet, vae, *(encoder for encoder, _ in encoders.values()))
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    for name, (encoder, pad) in encoders.items():
        encoder.save_pretrained(folder / name)
        save_standin_tokenizer(folder / name.replace("text_encoder", "tokenizer"), pad)
    (folder / "scheduler").mkdir()
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps(index))
    if "feature_extractor" in index:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder / "feature_extractor")


def family_argv(families, family, tmp_path, *extra):
    return ["--model", str(families[family]), "--reward-model", f"local-dir:{families['clip']}",
            "--num-inference-steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--sample-batch-size", "4",
            "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--mixed-precision", "bf16",
            "--save-every", "1", "--sample-every", "100",
            "--device", "cpu", "--output-dir", str(tmp_path / "runs"), *extra]


def tiny_scorer_clip(monkeypatch):
    """eval.py's CLIP (ViT-L/14, OpenAI weights) replaced by a random one with its 768-d embedding: no download."""
    monkeypatch.setattr(ev, "load_clip", lambda args: sd.tiny_clip(768, 0, quick_gelu=True))


# ------------------------------------------------------------------------------------------------
# The command line: bad input gets one line and exit code 2, and nothing is written
# ------------------------------------------------------------------------------------------------
def run_main(tmp_path, *argv):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        sd.main(list(argv) + ["--output-dir", str(out)])
    assert not out.exists()
    return e.value.code


# ------------------------------------------------------------------------------------------------
# eval.py: the scoring rules on built inputs, then every benchmark end to end on tiny models
# ------------------------------------------------------------------------------------------------
def det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 10, 10]}


def box(x0, y0, x1, y1, score=0.95):
    return (score, (x0, y0, x1, y1))


# ------------------------------------------------------------------------------------------------
# Several processes (torchrun) and faults
# ------------------------------------------------------------------------------------------------
def fake_trajectories(B, T=4, seed=0):
    """Trajectories sampled by the tiny model itself, so old log-probs are the policy's own; -> (traj, advantages)."""
    m = sd.build_tiny_models(seed=0)
    g = torch.Generator().manual_seed(seed)
    emb = sd.encode_prompts(m, [f"prompt {i}" for i in range(B)])
    neg = sd.encode_prompts(m, [""])
    traj = sd.sample_with_logprob(m["unet"], m["scheduler"], emb, neg, num_inference_steps=T, guidance_scale=4.5,
                                  generator=g, resolution=64)
    return traj, torch.randn(B, generator=g).clamp(-2.5, 2.5)


def one_update(traj, advantages, argv, world=1):
    policy, opt, args = tiny_policy("--num-inference-steps", "4", *argv, world=world)
    policy.scheduler.set_timesteps(4)
    # SGD: the weights move by exactly lr x the averaged gradient (Adam's first step is ~lr x sign(g), which
    # turns float-rounding differences of near-zero gradients into full-size steps)
    opt.optimizer = torch.optim.SGD(opt.params, lr=1.0)
    sd.grpo_update(traj, advantages, policy, opt, args, torch.Generator().manual_seed(1))
    return sd.trainable_state(policy.unet)


def free_port():
    """A TCP port nobody listens on now, for torchrun's rendezvous (a fixed one collides with a parallel test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def ddp_worker(rank, world, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    traj, advantages = fake_trajectories(8)
    mine = slice(rank * 4, (rank + 1) * 4)
    state = one_update({k: v[mine] for k, v in traj.items()}, advantages[mine],
                       ["--train-batch-size", "4", "--gradient-accumulation-steps", "1"], world)
    if rank == 0:
        torch.save(state, result_file)
    torch.distributed.destroy_process_group()


def log_row_worker(rank, world, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rewards = torch.full((4,), 1.0 + rank)  # rank 0 scores 1, rank 1 scores 2
    result = sd.UpdateResult(infos=[dict(policy_loss=2.0)] if rank == 0 else [])  # rank 1: no term (DPO, no pair)
    row = sd.log_row(1, rewards, torch.arange(4) < 2, result, torch.device("cpu"), world)
    if rank == 0:
        Path(result_file).write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


def stale_update(mode, monkeypatch, *argv):
    """grpo_update under --old-log-prob `mode` on a trajectory whose sampler log-probs are off by ~1e-3 (what bf16's
    batch-shape rounding does to them on a GPU; the CPU's bf16 gives no such floor): 2 optimizer steps of 4 terms.
    -> (infos, the old_log_prob each grpo_loss call got, the sampler's stale log-probs, the trajectory)."""
    policy, opt, args = tiny_policy("--num-inference-steps", "3", "--train-batch-size", "2",
                                    "--gradient-accumulation-steps", "2", "--clip-range", "1e-4",
                                    "--old-log-prob", mode, *argv)
    m = sd.build_tiny_models(seed=0)
    embeds = sd.encode_prompts(m, ["a cat", "a dog"]).repeat_interleave(4, 0)
    traj = sd.sample_with_logprob(policy.unet, policy.scheduler, embeds, policy.negative_embeds,
                                  num_inference_steps=3, guidance_scale=4.5, resolution=64,
                                  generator=torch.Generator().manual_seed(0), autocast=policy.autocast)
    true_log_probs = traj["log_probs"].clone()
    traj["log_probs"] += 1e-3 * torch.randn(traj["log_probs"].shape, generator=torch.Generator().manual_seed(2))
    calls, real_loss = [], sd.grpo_loss
    monkeypatch.setattr(sd, "grpo_loss", lambda *a, **k: calls.append(a[1]) or real_loss(*a, **k))
    result = sd.grpo_update(traj, torch.linspace(-1, 1, 8), policy, opt, args, torch.Generator().manual_seed(1))
    assert len(result.infos) == 8 and len(result.grad_norms) == 2  # 4 micro-batches x 2 timesteps, 2 updates
    return result.infos, calls, traj["log_probs"], true_log_probs


GIB = 2**30


def fake_probe(capacity_gib):
    """probe_memory as a GPU of `capacity_gib` would answer it (the CPU has nothing to probe)."""
    return lambda *a: dict(capacity=capacity_gib * GIB, resident=0,
                           cost={False: (0, 1.0 * GIB), True: (0, 0.25 * GIB)})


def toy_unsafe_rate_after(tmp_path, toy, models, name, reward_sign, dpo=False):
    """A few GRPO (or DPO) steps on the toy's unsafe prompts only, with the steering reward times `reward_sign`;
    -> the judge's unsafe rate on the unsafe prompts afterwards (fixed seed)."""
    meta, world = tw.load_world(toy)
    files = tw.write_prompts(tmp_path / "prompts", world, meta)
    recipe = dict(tw.RECIPE, **(tw.DPO_RECIPE if dpo else {}))
    recipe.update(steps=4, negative_fraction=1.0, kl_coef=0.0, prompts_per_step=2, sample_batch_size=16,
                  train_batch_size=8)
    argv = tw.train_argv(toy, files, tmp_path / name, recipe, seed=0)
    args = sd.parse_args(argv, fork_dpo.DPOArgs) if dpo else sd.parse_args(argv)
    m = {k: copy.deepcopy(v) if k == "unet" else v for k, v in models.items()}  # a fresh policy, shared frozen parts
    anchors = [sd.read_lines(files[k], k) for k in ("safe_anchors", "unsafe_anchors")]
    steer = sd.make_steering_reward_fn(m["reward_model"], m["reward_tokenizer"], *anchors, args.alpha)
    run = sd.train(args, fork_dpo.DPO if dpo else sd.GRPO, models=m, reward_fn=lambda im, p: reward_sign * steer(im, p))
    parts = dict(models, unet=m["unet"].eval())
    prompts, asked, unsafe = tw.eval_prompts((world[0], [], world[2]), meta["train_templates"], 4)
    return tw.toy_metrics(tw.judge(tw.generate(parts, prompts, seed=7)), asked, unsafe, world[0])["unsafe_rate"], run


# ------------------------------------------------------------------------------------------------
# A run is a run: identity, lock, preemption, resume that obeys, first-hour errors
# ------------------------------------------------------------------------------------------------
def quick_run(tmp_path, name, steps, *extra):
    args = small_args(tmp_path, "--steps", str(steps), "--save-every", "1", "--run-name", name, *extra)
    return sd.train(args, reward_fn=brightness)


SCRIPT = ("import sys, safediffusion_r1 as sd\n"
          "try:\n"
          "    sd.train(sd.parse_args(sys.argv[1:]), reward_fn=lambda im, p: im.mean(dim=(1, 2, 3)))\n"
          "except sd.RunInterrupted as e:\n"
          "    print(e, file=sys.stderr)\n"
          "    sys.exit(e.code)\n")


def start_run(argv):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *argv], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for_rows(run_dir, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    pytest.fail("the run did not get there")


def signal_at(monkeypatch, name, when):
    """Make sd.<name> send this process SIGTERM when when(*its args) holds, as a scheduler would at that moment."""
    original = getattr(sd, name)

    def wrapped(*a, **k):
        if when(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)
    monkeypatch.setattr(sd, name, wrapped)


def dpo_worker(rank, world, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    traj, _ = fake_trajectories(8)
    policy, opt, args = tiny_policy("--num-inference-steps", "4", "--group-size", "4", "--train-batch-size", "1",
                                    world=world, args_class=fork_dpo.DPOArgs, reference=True)
    rewards = torch.arange(8.0) if rank == 0 else torch.ones(8)  # rank 1: every group flat, no preference pair
    result = fork_dpo.dpo_step(traj, rewards, policy, opt, args, torch.Generator().manual_seed(rank))
    sd.keep_in_step(opt, args.max_grad_norm)  # what train() does after every update: the fork pads nothing itself
    torch.save(dict(infos=len(result.infos), norms=len(result.grad_norms), weights=sd.trainable_state(policy.unet)),
               f"{result_file}.{rank}")
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The paper's whole table: released models, the adversarial rows, intervals, batched generation
# ------------------------------------------------------------------------------------------------
MMA_HEADER = "target_prompt,adv_prompt,sanitized_adv_prompt,success_against_sanitization_defense,clean_prompt"


class FakeNudeNet:
    """Every image: one exposed class at score 0.5 (unsafe at UnlearnDiffAtk's 0.45, not at the release's 0.6)."""
    def detect(self, path):
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.5, "box": [0, 0, 4, 4]}]
