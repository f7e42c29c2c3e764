"""The benchmark (bench.py): the GPU check's stages on tiny models, its projections, and the FLOP counts.

CPU only, tiny random models and stand-ins built in code, no network. Shared fixtures: conftest.py;
helpers: testkit.py. Run: pytest -q (everything) or pytest -q -m quick.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub, which reads it once
import pytest  # noqa: E402
import torch  # noqa: E402

import safediffusion_r1 as sd  # noqa: E402
import bench  # noqa: E402
from testkit import (HERE, tiny_policy)  # noqa: E402


@pytest.mark.quick
def test_prime_optimizer_creates_adams_state_without_moving_a_weight():
    policy, opt, _ = tiny_policy()
    before = {k: v.clone() for k, v in sd.trainable_state(policy.unet).items()}
    bench.prime_optimizer(opt.optimizer)
    assert len(opt.optimizer.state) == len(opt.params)
    assert all(p.grad is None for p in opt.params)
    assert all(torch.equal(before[k], v) for k, v in sd.trainable_state(policy.unet).items())
    assert opt.optimizer.param_groups[0]["lr"] == 2e-3  # the learning rate is given back


def test_gpu_check_runs_every_stage_and_measures_the_default_s_peak_with_its_optimizer_state(tmp_path, monkeypatch):
    """bench.py --gpu-check --tiny runs each of the eight stages and writes its figures; the steps hold the default's
    64 trajectories with AdamW's state created before the update (a real run holds it from its second optimizer step
    on); the run folders are deleted; no CUDA and no --tiny: exit 2 in one line."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert bench.gpu_check(argparse.Namespace(tiny=True, out=str(tmp_path / "gpu_check.json")), torch.device("cpu"))
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    n_params = sum(p.numel() for p in sd.build_tiny_models()["unet"].parameters())
    assert result["held"]["trajectories_held"] == 64 and result["held"]["optimizer_state_before_step"]
    assert result["held"]["optimizer_state_gib"] * 2**30 >= 8 * n_params  # exp_avg + exp_avg_sq in fp32
    assert [c["passed"] for c in result["checks"]] == [True] * 6 and result["matmul_tflops"] > 0
    assert result["sdxl"]["plan"]["optimizer_batch"] == 8 and result["sdxl"]["row"]["seconds_train"] > 0
    assert result["today"]["plan"]["train_batch_size"] == 2 and result["auto"]["plan"]["how"].startswith("auto")
    for plan in ("today", "auto"):
        rate, projected = result["rate"][plan], result["projection"][plan]
        assert rate["seconds_per_term"] > 0 and 0 < rate["share_of_matmul_rate"] and rate["tflop_per_term"] > 0
        assert projected["hours_2400"] == pytest.approx(8 * projected["hours_300"])
    assert set(result["ratio_floor"]) == {"sampler", "same_shape", "recompute"}
    assert result["fast_mode"]["seconds"] > 0 and set(result["variants"]) == {"channels_last", "cudnn_benchmark",
                                                                              "compile"}
    assert all("seconds_per_term" in v for v in result["variants"].values()), result["variants"]
    assert list(tmp_path.iterdir()) == [tmp_path / "gpu_check.json"]  # no run folder left behind
    for device in ("cpu",) + ("cuda",) * (not torch.cuda.is_available()):  # refused before any model is built
        proc = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--device", device, "--out",
                               str(tmp_path / "x")], cwd=HERE, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--tiny" in proc.stderr


@pytest.mark.quick
def test_the_gpu_check_projects_a_default_step_from_its_measured_parts():
    rate = dict(seconds_per_term=0.1, seconds_per_optimizer_step=0.5)
    row = dict(seconds_sample=30.0, seconds_decode=2.0, seconds_reward=1.0)
    p = bench.projection(rate, row, 8, trained=49)
    assert p["seconds_train"] == pytest.approx(64 / 8 * 49 * 0.1 + 2 * 0.5)  # 392 terms, 2 optimizer steps
    assert p["seconds_per_step"] == pytest.approx(33 + p["seconds_train"])
    assert p["hours_300"] == pytest.approx(300 * p["seconds_per_step"] / 3600)


@pytest.mark.quick
def test_every_step_the_gpu_check_runs_is_a_valid_full_size_config():
    """The CPU tests run the check with --tiny, whose defaults could hide a flag error of the real-size config."""
    for name, argv in bench.check_settings().items():
        sd.check_args(sd.parse_args(argv + ["--device", "cpu"]))  # raises UsageError on a bad combination


@pytest.mark.quick
def test_flops_per_step_count_sampling_of_every_step_and_training_of_the_kept_ones():
    r = bench.bench_flops(sdxl=False)  # SDXL's rows: the next test (its count takes seconds)
    assert r["cfg_pair_forward"] == pytest.approx(1.607e12, rel=1e-3)  # SD 1.x's UNet on a CFG pair at 512 px
    rows = {row["recipe"]: row for row in r["rows"]}
    default, w2 = rows["default (the paper's method)"], rows["--sde-window 2"]
    pair, train = r["cfg_pair_forward"], r["cfg_pair_forward_backward"] + 2 * r["cfg_pair_forward"]  # ckpt + KL
    assert default["flops"] == pytest.approx(64 * 50 * pair + 64 * 49 * train)
    assert w2["flops"] == pytest.approx(64 * 50 * pair + 64 * 2 * train) and w2["fraction_of_default"] < 0.25
    assert rows["--timestep-fraction 0.25"]["trained_timesteps"] == 12
    fast = rows["--sde-window 1 --share-noise (fast mode)"]
    assert fast["flops"] == pytest.approx(64 * 50 * pair + 64 * 1 * train) and fast["trained_timesteps"] == 1
    printed = [line for line in bench.flops_lines(r) if "--sde-window 1" in line]
    assert len(printed) == 1 and f"; {100 * fast['fraction_of_default']:5.1f}% of the default)" in printed[0]
    ode = rows["fast mode --ode-steps 10 (DPM-Solver++)"]  # the window's one DDIM step, then 10 solver steps
    assert ode["sampled_steps"] == 11 and ode["flops"] == pytest.approx(64 * 11 * pair + 64 * 1 * train)
    assert ode["flops_sample"] == pytest.approx(64 * 11 * pair) and ode["hours_2400"] < 24  # at the stated rate


def test_flops_of_sdxl_s_lora_rows_count_its_unet_at_1024_px():
    r = bench.bench_flops()
    rows, pair = {row["recipe"]: row for row in r["rows"]}, r["cfg_pair_forward"]
    xl_pair = r["sdxl_cfg_pair_forward"]  # SDXL's UNet at 1024 px: ~8.4x SD 1.x's at 512 px
    assert xl_pair / pair == pytest.approx(8.42, rel=1e-2) and r["sdxl_cfg_pair_forward_backward"] > 2 * xl_pair
    xl = rows["SDXL LoRA: fast mode --ode-steps 10"]
    assert xl["flops"] == pytest.approx(64 * 11 * xl_pair + 64 * (r["sdxl_cfg_pair_forward_backward"] + 2 * xl_pair))
