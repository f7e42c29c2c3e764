"""pytest's shared fixtures for every test file (helpers: testkit.py)."""
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub, which reads it once
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N shares the cores: one thread per worker and its runs, set
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, which reads it once
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import safediffusion_r1 as sd  # noqa: E402
import toy_world as tw  # noqa: E402
from bench import trained_like  # noqa: E402
from testkit import (HERE, SD14_INDEX, SD14_SCHEDULER, SD21_INDEX, SD21_SCHEDULER, SDXL_INDEX,
                     SDXL_SCHEDULER, TINY_CLIP_CFG, save_standin, standin_text_encoder)  # noqa: E402


@pytest.fixture(scope="session")  # built once: every test file reads it, none changes it
def tiny():
    return sd.build_tiny_models(seed=0)


@pytest.fixture(scope="session")  # built once: every test file reads it, none changes it
def real_format(tmp_path_factory):
    """{sd: a diffusers SD 1.4 folder, clip: an OpenCLIP local-dir folder, hps: an HPSv2-format checkpoint}."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor
    root = tmp_path_factory.mktemp("real_format")
    m = sd.build_tiny_models(seed=3)
    trained_like(m["unet"], m["vae"], m["text_encoder"], m["reward_model"])
    folder = root / "sd-v1-4"
    for name in ("unet", "vae", "text_encoder"):
        m[name].save_pretrained(folder / name)
    # SD 1.4 ships the slow-tokenizer files (vocab.json, merges.txt, ...): transformers 5's save_pretrained writes
    # only tokenizer.json, so the vocabulary is written as SD's is, and tokenizer.json dropped
    sd.clip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    (folder / "tokenizer/tokenizer.json").unlink(missing_ok=True)
    vae_cfg = json.loads((folder / "vae/config.json").read_text())
    vae_cfg.pop("scaling_factor", None)  # SD 1.4's VAE config predates it (diffusers falls back to 0.18215)
    (folder / "vae/config.json").write_text(json.dumps(vae_cfg))
    (folder / "scheduler").mkdir()
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(SD14_INDEX))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder / "feature_extractor")
    checker_cfg = dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1)
    StableDiffusionSafetyChecker(CLIPConfig(text_config=checker_cfg, projection_dim=32, vision_config=dict(
        checker_cfg, image_size=32, patch_size=8))).save_pretrained(folder / "safety_checker")
    clip_dir = root / "clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps(dict(
        model_cfg=TINY_CLIP_CFG,
        preprocess_cfg=dict(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD))))
    save_file(m["reward_model"].state_dict(), clip_dir / "open_clip_model.safetensors")
    hps = root / "HPS_v2.1_like.pt"  # HPSv2's save format: the unwrapped model's state dict beside training state
    torch.save(dict(iterations=10, name="hps", state_dict=m["reward_model"].state_dict(), optimizer={"state": {}},
                    scaler={"scale": 65536.0, "_growth_tracker": 0}), hps)
    return dict(sd=folder, clip=clip_dir, hps=hps, models=m)


@pytest.fixture(scope="session")  # built once: every test file reads it, none changes it
def families(tmp_path_factory, real_format):
    """{"SD 2.x-v", "SD 2.x" (-base), "SDXL": folder; "clip": the OpenCLIP stand-in}: tiny models in real layouts,
    built here from diffusers' and transformers' classes (independently of the code under test's builders)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(7)
    blocks = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)

    def vae(**kw):
        return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                             norm_num_groups=4, **kw)
    sd2 = UNet2DConditionModel(**blocks, cross_attention_dim=48, upcast_attention=True,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    save_standin(root / "sd-2-1", SD21_INDEX, SD21_SCHEDULER, sd2, vae(),
                 {"text_encoder": (standin_text_encoder(48, seed=1), "!")})
    # SDXL: cross-attention on both encoders' hidden states side by side (32 + 48), the added conditions the pooled
    # projection (40) and six size ids of 8 sinusoidal dims each; its first level has no attention, as SDXL's
    xl = UNet2DConditionModel(**blocks, cross_attention_dim=80, addition_embed_type="text_time",
                              addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8,
                              transformer_layers_per_block=(1, 2), down_block_types=("DownBlock2D",
                                                                                     "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    save_standin(root / "sdxl-base-1.0", SDXL_INDEX, SDXL_SCHEDULER, xl, vae(scaling_factor=0.13025, force_upcast=True),
                 {"text_encoder": (standin_text_encoder(32, seed=2), "<|endoftext|>"),
                  "text_encoder_2": (standin_text_encoder(48, projection=40, seed=3), "!")})
    shutil.copytree(root / "sd-2-1", root / "sd-2-1-base")  # SD 2.1-base: the same files, epsilon prediction
    (root / "sd-2-1-base/scheduler/scheduler_config.json").write_text(json.dumps(dict(SD21_SCHEDULER,
                                                                                      prediction_type="epsilon")))
    return {"SD 2.x-v": root / "sd-2-1", "SD 2.x": root / "sd-2-1-base", "SDXL": root / "sdxl-base-1.0",
            "clip": real_format["clip"]}


@pytest.fixture(scope="module")
def toy_models():
    args = sd.parse_args(tw.train_argv(HERE / "toy", {}, Path("unused"), {}, 0))
    return sd.load_models(args)
