"""Runs and faults: the command line (bad input is one line, exit 2), torchrun, signals and preemption, resume
that obeys, locks, full disks, checkpoints, the memory plan's refusals, plots.

CPU only, tiny random models and stand-ins built in code, no network. Shared fixtures: conftest.py;
helpers: testkit.py. Run: pytest -q (everything) or pytest -q -m quick.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub, which reads it once
import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import eval as ev  # noqa: E402
import fork_dpo  # noqa: E402
import plots  # noqa: E402
import safediffusion_r1 as sd  # noqa: E402
import toy_world as tw  # noqa: E402
from testkit import (HERE, SMALL, brightness, ddp_worker, dpo_worker, fake_trajectories, free_port,
                     log_row_worker, metrics, one_update, quick_run, run_main, signal_at, small_args, start_run,
                     trainable, wait_for_rows)  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--eta", "0"], "--eta must be > 0"),
    (["--tiny", "--sample-batch-size", "3"], "must divide the 16 trajectories"),
    (["--tiny", "--gradient-accumulation-steps", "3"], "must divide the 2 micro-batches"),
    (["--tiny", "--group-size", "1"], "--group-size must be >= 2"),
    (["--tiny", "--timestep-fraction", "1.5"], "--timestep-fraction"),
    (["--tiny", "--learning-rate", "-1"], "--learning-rate"),
    (["--tiny", "--negative-prompts", "/nonexistent/neg.txt"], "negative prompts file not found"),
    (["--model", "/nonexistent/sd-model"], "not a diffusers Stable Diffusion folder"),
    (["--model", "nonexistent-org/no-such-model"], "hf download nonexistent-org/no-such-model"),
    (["--tiny", "--negative-prompts", str(HERE)], "is a folder"),
    (["--tiny", "--checkpoints-total-limit", "-1"], "--checkpoints-total-limit"),
])
@pytest.mark.quick
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    assert run_main(tmp_path, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.mark.quick
def test_output_paths_that_are_files_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(sd, "load_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(SystemExit) as e:
        sd.main(["--tiny", "--output-dir", str(afile / "runs")])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err
    for main, argv, message in ((ev.main, ["--tiny", "--benchmark", "coco", "--out", str(afile)], "is a file"),
                                (plots.main, [str(tmp_path)], "not a training run")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_unreachable_hub_fails_within_seconds_with_one_line(tmp_path, real_format):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    for argv, message in ((["--model", "some-org/some-model"], "hf download some-org/some-model"),
                          (["--model", str(real_format["sd"])], "--reward-model local-dir:")):  # the default ViT-H-14
        t = time.time()
        out = subprocess.run([sys.executable, str(HERE / "safediffusion_r1.py"), *argv, "--device", "cpu",
                              "--output-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                             timeout=120)
        lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert len(lines) == 1 and message in lines[0], out.stderr
        assert time.time() - t < 40  # the libraries' own retries took minutes
    assert not (tmp_path / "runs").exists()


@pytest.mark.quick
def test_a_custom_reward_never_loads_the_reward_encoder(tmp_path, real_format, monkeypatch):
    monkeypatch.setattr(sd, "load_reward_model", lambda *a, **k: pytest.fail("reward encoder loaded"))
    args = sd.parse_args(["--model", str(real_format["sd"]), "--resolution", "64", "--num-inference-steps", "2",
                          "--prompts-per-step", "1", "--negative-fraction", "0", "--group-size", "2",
                          "--sample-batch-size", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
                          "--steps", "1",
                          "--mixed-precision", "no", "--device", "cpu", "--output-dir", str(tmp_path)])
    assert (sd.train(args, reward_fn=brightness) / "final/unet").is_dir()


def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    """The first Ctrl-C abandons the step and saves the steps done; a second one, during that save, stops at once:
    a checkpoint folder under its final name is still always whole."""
    proc = subprocess.Popen([sys.executable, str(HERE / "safediffusion_r1.py"), *SMALL, "--steps", "200",
                             "--output-dir", str(tmp_path), "--run-name", "c"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/metrics.jsonl")) and time.time() < deadline:  # a step done: the handler is in
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume auto --run-name c" in err.splitlines()[-1]
    for ckpt in sd.complete_checkpoints(tmp_path / "c"):
        assert {p.name for p in ckpt.iterdir()} == {"weights.safetensors", "state.pt"}


@pytest.mark.quick
def test_empty_anchor_file_and_invalid_utf8_prompts(tmp_path, capsys):
    empty = tmp_path / "anchors.txt"
    empty.write_text("# only a comment\n\n")
    assert run_main(tmp_path, "--tiny", "--safe-anchors", str(empty)) == 2
    assert "has no lines" in capsys.readouterr().err
    bad = tmp_path / "neg.txt"
    bad.write_bytes(b"a prompt\n\xff\xfe broken\n")
    assert run_main(tmp_path, "--tiny", "--negative-prompts", str(bad)) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


@pytest.mark.quick
def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, str(HERE / "safediffusion_r1.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for f in sd.dataclasses.fields(sd.Args):
        assert "--" + f.name.replace("_", "-") in proc.stdout
        assert f.metadata["help"][:20] in " ".join(proc.stdout.split())


@pytest.mark.quick
def test_tiny_defaults_apply_only_with_tiny_and_explicit_flags_win():
    assert sd.parse_args([]).learning_rate == 1e-5
    assert sd.parse_args(["--tiny"]).learning_rate == sd.TINY_DEFAULTS["learning_rate"]
    assert sd.parse_args(["--tiny", "--learning-rate", "0.5"]).learning_rate == 0.5


@pytest.mark.quick
def test_plot_draws_training_curves_each_on_its_own_axis(tmp_path, monkeypatch):
    rows = [dict(step=i, reward_mean=0.1 * i, reward_negative=None, reward_positive=0.2, kl=0.0, approx_kl=10.0 ** -i,
                 clipfrac=0.1) for i in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.figure
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **k: saved.append((fig, path)))
    plots.main([str(tmp_path)])
    (fig, path), = saved
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert Path(path) == tmp_path / "curves.png" and list(axes) == ["reward", "KL to the reference", "approx_kl",
                                                                    "clipfrac"]
    assert axes["approx_kl"].get_yscale() == "log" and axes["reward"].get_yscale() == "linear"
    labels = [line.get_label() for line in axes["reward"].get_lines()]
    assert labels == ["reward_mean", "reward_positive"]  # reward_negative has no value: no line
    assert list(axes["approx_kl"].get_lines()[0].get_ydata()) == [0.1, 0.01, 0.001, 0.0001]


@pytest.mark.quick
def test_a_prompt_mix_that_rounds_one_set_away_is_refused():
    for argv in (["--prompts-per-step", "1"], ["--prompts-per-step", "4", "--negative-fraction", "0.1"],
                 ["--prompts-per-step", "4", "--negative-fraction", "0.9"]):
        with pytest.raises(sd.UsageError, match="never train on one of the two sets"):
            sd.check_args(sd.parse_args(["--tiny", "--sample-batch-size", "8", *argv]))
    for argv in (["--prompts-per-step", "1", "--negative-fraction", "1"], ["--prompts-per-step", "2"]):
        sd.check_args(sd.parse_args(["--tiny", "--sample-batch-size", "8", *argv]))  # one set on purpose, or a mix


def test_a_two_process_step_logs_the_rewards_of_both_processes(tmp_path):
    """all_gather into a list that held one tensor object N times left the last rank's rewards in every slot
    (reward_mean 2.0 where the two processes' mean is 1.5); a process with no loss term made the row NaN."""
    torch.multiprocessing.spawn(log_row_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "row.json")), nprocs=2)
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["reward_mean"] == 1.5 and row["reward_negative"] == 1.5 and row["reward_std"] > 0
    assert row["policy_loss"] == 2.0  # the process without a term adds nothing (it made the row NaN)


def test_two_process_update_equals_the_single_process_update(tmp_path, tiny):
    """4 trajectories on each of 2 gloo processes, gradients averaged == 8 trajectories in one process."""
    torch.multiprocessing.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "state.pt")), nprocs=2)
    traj, advantages = fake_trajectories(8)
    single = one_update(traj, advantages, ["--train-batch-size", "4", "--gradient-accumulation-steps", "2"])
    ddp = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = sd.trainable_state(tiny["unet"])  # the same seed's UNet, never trained
    assert any(not torch.equal(single[k], fresh[k]) for k in single)  # the update did something
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fast_mode", [[], ["--sde-window", "1", "--share-noise"]], ids=["default", "fast_mode"])
def test_torchrun_with_two_cpu_processes_writes_one_run(tmp_path, fast_mode):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), str(HERE / "safediffusion_r1.py"), *SMALL, "--steps", "2",
                           "--output-dir", str(out), *fast_mode],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    state = torch.load(run_dir / "checkpoints/checkpoint-000002/state.pt", weights_only=True)
    assert len(state["generators"]) == 2 and not torch.equal(*state["generators"])  # one RNG per rank
    assert (run_dir / "final/unet/config.json").is_file()
    assert proc.stdout.count("step 2/2 |") == 1  # only rank 0 logs
    assert all(r.get("sde_window_start") == (0 if fast_mode else None) for r in metrics(run_dir))


def test_sigkill_mid_run_then_resume_latest_matches_an_uninterrupted_run(tmp_path):
    argv = SMALL + ["--steps", "6", "--save-every", "1", "--output-dir", str(tmp_path / "killed")]
    script = ("import sys, safediffusion_r1 as sd, torch\n"
              "sd.train(sd.parse_args(sys.argv[1:]), reward_fn=lambda im, p: im.mean(dim=(1, 2, 3)))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=HERE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("*/checkpoints/checkpoint-000003")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = (tmp_path / "killed").iterdir()
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert "checkpoint-000006" not in done, "killed too late to test anything"
    # a save cut short leaves only a .tmp folder, which `latest` must never pick
    partial = run_dir / "checkpoints/checkpoint-000099.tmp"
    partial.mkdir()
    (partial / "weights.safetensors").write_bytes(b"garbage")
    resumed = sd.train(sd.parse_args(argv + ["--resume", "latest"]), reward_fn=brightness)
    straight = sd.train(sd.parse_args(SMALL + ["--steps", "6", "--output-dir", str(tmp_path / "straight")]),
                        reward_fn=brightness)
    a, b = trainable(resumed, 6), trainable(straight, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["no", "fp16"])  # fp16: GradScaler's own skipping must not hide it
def test_nan_reward_skips_updates_then_stops_with_the_last_checkpoint_intact(tmp_path, capsys, precision):
    calls = []

    def flaky(images, prompts):  # fine for 2 steps, then NaN forever
        calls.append(1)
        return brightness(images, prompts) * (float("nan") if len(calls) > 2 else 1.0)
    with pytest.raises(RuntimeError, match="non-finite"):
        sd.train(small_args(tmp_path, "--steps", "10", "--save-every", "2", "--max-nonfinite-steps", "3",
                            "--mixed-precision", precision), reward_fn=flaky)
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["skipped_updates"] > 0
    assert not any(r["grad_norm"] == float("inf") for r in rows)  # a skipped update logs no norm
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-000002", "checkpoint-000004"]
    w2, w4 = trainable(run_dir, 2), trainable(run_dir, 4)
    assert all(torch.equal(w2[k], w4[k]) for k in w2)  # no NaN update reached the weights
    assert all(torch.isfinite(v).all() for v in w4.values())


def test_resume_latest_skips_a_corrupt_newest_checkpoint_and_a_half_written_metrics_line(tmp_path, capsys):
    argv = SMALL + ["--save-every", "1", "--output-dir", str(tmp_path)]
    run = sd.train(sd.parse_args(argv + ["--steps", "4"]), reward_fn=brightness)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-00000{i}" for i in (2, 3, 4)]
    (run / "checkpoints/checkpoint-000004/weights.safetensors").write_bytes(b"cut short")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward_me')  # a write cut short by the crash
    with pytest.warns(UserWarning) as record:
        sd.train(sd.parse_args(argv + ["--steps", "5", "--resume", "latest"]), reward_fn=brightness)
    said = " ".join(str(w.message) for w in record)
    assert "checkpoint-000004" in said and "do not parse" in said
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path, capsys):
    run_dir = sd.train(small_args(tmp_path, "--steps", "1", "--save-every", "1"), reward_fn=brightness)
    ckpt = run_dir / "checkpoints/checkpoint-000001"
    assert run_main(tmp_path / "x", *SMALL, "--lora-rank", "4", "--resume", str(ckpt)) == 2  # full vs LoRA
    assert "--lora-rank 4: run " in capsys.readouterr().err  # refused from args.json, before any model loads
    (run_dir / "args.json").unlink()  # a checkpoint copied without its run's record: the weights tell
    assert run_main(tmp_path / "x", *SMALL, "--lora-rank", "4", "--resume", str(ckpt)) == 2
    err = capsys.readouterr().err
    assert "do not match this model" in err and "trying the next" not in err
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    assert run_main(tmp_path / "y", *SMALL, "--resume", str(ckpt)) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert run_main(tmp_path / "z", *SMALL, "--resume", str(tmp_path / "nowhere")) == 2


@pytest.mark.quick
def test_long_prompts_are_truncated_with_one_warning(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["word"] * 100) + "\n")
    with pytest.warns(UserWarning, match="truncated") as record:
        sd.train(small_args(tmp_path, "--steps", "2", "--negative-prompts", str(long)), reward_fn=brightness)
    assert len([w for w in record if "truncated" in str(w.message)]) == 1


@pytest.mark.quick
def test_prompt_files_skip_blank_lines_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\n  a red car  \n\t\n# another\nan apple\n", encoding="utf-8")
    assert sd.read_lines(f, "prompts") == ["a red car", "an apple"]


def test_the_offline_node_script_refuses_bad_input_and_its_check_reads_this_environment():
    """offline_node.sh: usage and a malformed torch version are one line, exit 2; `check` prints every package's
    version against requirements.txt's pins (a local build tag like +cu130 is not a mismatch) and, with no GPU,
    stops before the GPU run."""
    def run(*argv):
        return subprocess.run(["bash", "offline_node.sh", *argv], cwd=HERE, capture_output=True, text=True,
                              env=dict(os.environ, PYTHON=sys.executable))
    for argv in ([], ["wheels", "x"], ["wheels", "x", "11.0"], ["install"]):
        proc = run(*argv)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (argv, proc.stderr)
    proc = run("check")
    assert proc.returncode == 1 and "torch sees no CUDA GPU" in proc.stderr
    assert f"torch {torch.__version__}\n" in proc.stdout and "diffusers" in proc.stdout  # CI's pins: no mismatch


@pytest.mark.quick
def test_out_of_memory_names_the_flags_that_help(monkeypatch, capsys):
    def oom(args, *rest, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(sd, "train", oom)
    with pytest.raises(SystemExit) as e:
        sd.main(["--tiny"])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert all(f in err for f in ("--train-batch-size", "--lora-rank", "--gradient-checkpointing"))


def test_resume_latest_continues_the_named_run_by_step_and_refuses_to_guess(tmp_path):
    a, b = quick_run(tmp_path, "A", 2), quick_run(tmp_path, "B", 3)
    b_record = (b / "args.json").read_text()
    os.utime(a / "checkpoints/checkpoint-000001")  # the older checkpoint now has the newer file time (a copy)
    with pytest.raises(sd.UsageError, match="2 runs under .* have checkpoints: A, B"):
        sd.plan_run(small_args(tmp_path, "--steps", "4", "--resume", "latest"))
    claim, lock = sd.plan_run(small_args(tmp_path, "--steps", "4", "--resume", "latest", "--run-name", "A"))
    sd.release_lock(lock[0])
    assert claim.run_dir == a and [p.name for p in claim.candidates] == ["checkpoint-000002", "checkpoint-000001"]
    assert quick_run(tmp_path, "A", 3, "--resume", "latest") == a
    assert [r["step"] for r in metrics(a)] == [1, 2, 3] and (b / "args.json").read_text() == b_record
    with pytest.raises(sd.UsageError, match="has done 3 steps already"):  # not "step 6 of 4"
        quick_run(tmp_path, "A", 2, "--resume", "latest")


def test_a_run_folder_is_never_overwritten_and_run_name_is_one_folder(tmp_path):
    quick_run(tmp_path, "A", 1)
    with pytest.raises(sd.UsageError, match="already holds a run: continue it with --resume auto --run-name A"):
        quick_run(tmp_path, "A", 1)
    for bad in ("..", "x/y", "."):
        with pytest.raises(sd.UsageError, match="one folder name"):
            quick_run(tmp_path, bad, 1)
    # --resume auto: a fresh start when the run has no checkpoint, the latest one when it has
    assert [r["step"] for r in metrics(quick_run(tmp_path, "C", 1, "--resume", "auto"))] == [1]
    assert [r["step"] for r in metrics(quick_run(tmp_path, "C", 2, "--resume", "auto"))] == [1, 2]
    umask = os.umask(0)
    os.umask(umask)
    for weights in ("checkpoints/checkpoint-000002/weights.safetensors",
                    "final/unet/diffusion_pytorch_model.safetensors"):
        mode = (tmp_path / "runs/C" / weights).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, weights  # readable by a teammate like every other file, not 0600
    (tmp_path / "runs/F").write_text("not a run")
    with pytest.raises(sd.UsageError, match="runs/F is a file, not a run folder"):
        quick_run(tmp_path, "F", 1)


def test_a_new_learning_rate_takes_effect_on_resume_and_is_logged_and_a_group_size_change_is_refused(tmp_path):
    run_dir = quick_run(tmp_path, "A", 2)
    same = quick_run(tmp_path / "same", "A", 2)  # the identical run, resumed with the same flags below
    changed = sd.train(small_args(tmp_path, "--steps", "3", "--run-name", "A", "--resume", "latest",
                                  "--learning-rate", "1e-4", "--save-every", "1"), reward_fn=brightness)
    sd.train(small_args(tmp_path / "same", "--steps", "3", "--run-name", "A", "--resume", "latest",
                        "--save-every", "1"), reward_fn=brightness)
    a, b = trainable(changed, 3), trainable(tmp_path / "same/runs/A", 3)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the new learning rate was used, not the saved one
    state = torch.load(run_dir / "checkpoints/checkpoint-000003/state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    history = json.loads((run_dir / "args.json").read_text())["history"]
    assert [{k: h[k] for k in ("resumed_at_step", "changed")} for h in history] == [
        dict(resumed_at_step=2, changed=dict(steps=[2, 3], learning_rate=[2e-3, 1e-4]))]
    assert same.name == "A"


def test_an_older_checkpoint_is_a_branch_never_an_overwrite_and_training_on_keeps_the_earlier_final(tmp_path):
    """--resume <older checkpoint> on a finished run silently overwrote final/ and the later checkpoints. In place it
    is refused; under a new --run-name it is a branch that names its parent and continues exactly. A finished run
    trained on keeps its earlier final/."""
    a = quick_run(tmp_path, "A", 4)
    before = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file() and p.name != "run.lock"}
    older = str(a / "checkpoints/checkpoint-000002")
    with pytest.raises(sd.UsageError, match="went on past it \\(checkpoint-000004, checkpoint-000003, final/\\).*"
                                            "--run-name NEW"):
        quick_run(tmp_path, "A", 4, "--resume", older)
    assert before == {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file() and p.name != "run.lock"}
    b = sd.train(small_args(tmp_path, "--resume", older, "--run-name", "B", "--save-every", "1"),
                 reward_fn=brightness)  # --steps 4 and the rest: the parent's
    record = json.loads((b / "args.json").read_text())
    assert record["parent"] == dict(run=str(a), checkpoint=older, step=2) and record["steps"] == 4
    assert [r["step"] for r in metrics(b)] == [1, 2, 3, 4] and metrics(b)[:2] == metrics(a)[:2]
    assert all(torch.equal(x, y) for x, y in zip(trainable(a, 4).values(), trainable(b, 4).values()))
    with pytest.raises(sd.UsageError, match="B already holds a run"):  # a branch is a new run: it overwrites none
        quick_run(tmp_path, "B", 5, "--resume", older)
    quick_run(tmp_path, "A", 5, "--resume", "auto")  # trained on: the earlier final/ stays, under its steps
    assert json.loads((a / "final/training.json").read_text())["steps"] == 5
    assert (a / "final-000004/unet/diffusion_pytorch_model.safetensors").read_bytes() == before[
        Path("final/unet/diffusion_pytorch_model.safetensors")]


def test_the_run_folder_is_claimed_before_the_models_load(tmp_path):
    """The folder was checked before the models loaded and locked after: a second process that was slow to load
    overwrote a run that finished meanwhile. Now the check is made holding the lock, taken before anything loads."""
    args = small_args(tmp_path, "--run-name", "R", "--steps", "1")
    claim, lock = sd.plan_run(args)  # the first process, still loading its models
    with pytest.raises(sd.UsageError, match="runs/R is in use \\(pid"):
        sd.plan_run(args)  # the second one is refused before it loads anything
    sd.release_lock(lock[0])
    (claim.run_dir / "args.json").write_text("{}")  # the first one finished its run
    with pytest.raises(sd.UsageError, match="already holds a run"):
        sd.plan_run(args)
    with pytest.raises(sd.UsageError, match="no complete checkpoint"):  # a refusal leaves no folder behind
        sd.plan_run(small_args(tmp_path / "new", "--run-name", "X", "--resume", "latest"))
    assert not (tmp_path / "new").exists()


def test_a_resume_keeps_every_setting_not_named_and_refuses_a_recipe_change(tmp_path):
    """Following the tool's own advice (--resume auto --run-name X, no other flag) reset every flag to its default:
    the next save deleted checkpoints the user chose to keep. Recipe flags changed silently; a damaged args.json
    turned the check off; the DPO fork resumed a GRPO run (and GRPO a DPO run) without a word."""
    run_dir = quick_run(tmp_path, "A", 2, "--checkpoints-total-limit", "0", "--learning-rate", "1e-3",
                        "--alpha", "0.7")
    args = sd.parse_args(["--output-dir", str(tmp_path / "runs"), "--run-name", "A", "--resume", "auto",
                          "--steps", "3"])  # not even --tiny: the run's own record says it
    sd.train(args, reward_fn=brightness)
    assert [p.name for p in sd.complete_checkpoints(run_dir)] == [f"checkpoint-00000{i}" for i in (3, 2, 1)]
    record = json.loads((run_dir / "args.json").read_text())
    assert record["history"][-1]["changed"] == dict(steps=[2, 3]) and record["learning_rate"] == 1e-3
    assert record["tiny"] and record["alpha"] == 0.7 and record["objective"] == "grpo_step"
    for flag, value in [("--group-size", "8"), ("--alpha", "0.5"), ("--sde-window", "1"), ("--share-noise", None),
                        ("--timestep-fraction", "0.5"), ("--negative-prompts", str(HERE / "prompts/grid_prompts.txt"))]:
        with pytest.raises(sd.UsageError, match=f"{flag} .*run A was made with .*keeps its recipe.*--run-name NEW"):
            quick_run(tmp_path, "A", 4, "--resume", "auto", flag, *([value] if value else []))
    with pytest.raises(sd.UsageError, match="run A was trained by grpo_step, not dpo_step"):
        sd.train(sd.parse_args(SMALL + ["--output-dir", str(tmp_path / "runs"), "--run-name", "A", "--resume", "auto",
                                        "--steps", "4"], fork_dpo.DPOArgs), fork_dpo.DPO)
    dpo = sd.train(sd.parse_args(SMALL + ["--output-dir", str(tmp_path / "runs"), "--run-name", "D", "--steps", "1",
                                          "--save-every", "1"], fork_dpo.DPOArgs), fork_dpo.DPO)
    with pytest.raises(sd.UsageError, match="run D was trained by dpo_step .*beta_dpo.*, not grpo_step"):
        quick_run(tmp_path, "D", 2, "--resume", "auto")
    (run_dir / "args.json").write_text('{"steps": 3, "lear')
    with pytest.raises(sd.UsageError, match="args.json is damaged .*restore it, or branch"):
        quick_run(tmp_path, "A", 4, "--resume", "auto")
    assert dpo.name == "D" and not (run_dir / "run.lock").read_text()  # every refusal let go of the run


def test_sigterm_mid_run_saves_a_checkpoint_and_resume_is_bit_exact(tmp_path):
    argv = SMALL + ["--steps", "8", "--output-dir", str(tmp_path / "runs"), "--run-name", "pre"]
    proc = start_run(argv)
    run_dir = tmp_path / "runs/pre"
    wait_for_rows(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == sd.EXIT_PREEMPTED and "Traceback" not in err and "--resume auto --run-name pre" in err
    (ckpt,) = sd.complete_checkpoints(run_dir)  # --save-every 1000: the only checkpoint is the preemption's
    assert 2 <= sd.checkpoint_step(ckpt) < 8 and not (run_dir / "final").exists()
    resumed = sd.train(sd.parse_args(argv + ["--resume", "latest", "--save-every", "1"]), reward_fn=brightness)
    straight = sd.train(sd.parse_args(SMALL + ["--steps", "8", "--save-every", "1", "--output-dir",
                                               str(tmp_path / "straight")]), reward_fn=brightness)
    a, b = trainable(resumed, 8), trainable(straight, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(resumed)] == list(range(1, 9))


@pytest.fixture(scope="module")
def straight5(tmp_path_factory):
    """The uninterrupted 5-step run the four moments' resumed runs must equal (one run, not four)."""
    return quick_run(tmp_path_factory.mktemp("straight"), "straight", 5)


@pytest.mark.parametrize("moment", ["update", "grid", "save", "export"])
def test_a_signal_at_any_moment_saves_the_steps_done_and_claims_only_what_it_saved(tmp_path, monkeypatch, moment,
                                                                                    straight5):
    """A SIGTERM after the step's save decision (the grid, the save itself) or during an update claimed a checkpoint
    it never wrote, or saved weights that one update had already moved. Now any moment of a step saves the steps done
    when it began, the line says which checkpoint is on disk, and resume replays the rest exactly; a signal during the
    export leaves no half final/, and --resume auto exports it without training again."""
    calls = []
    if moment == "update":  # step 3's first optimizer step has moved the weights; its second has not run
        signal_at(monkeypatch, "optimizer_step", lambda *a, **k: calls.append(1) or len(calls) == 6)
    elif moment == "grid":
        signal_at(monkeypatch, "sample_grid", lambda *a: a[-1] == 3)  # its step
    elif moment == "save":
        signal_at(monkeypatch, "save_checkpoint", lambda run_dir, step, *a: step == 4)
    else:
        signal_at(monkeypatch, "export_for_diffusers", lambda *a: True)
    argv = ["--steps", "5", "--run-name", "r", "--save-every", "2", "--sample-every", "1"]
    with pytest.raises(sd.RunInterrupted) as e:
        sd.train(small_args(tmp_path, *argv), reward_fn=brightness)
    monkeypatch.undo()
    run_dir = tmp_path / "runs/r"
    done = dict(update=2, grid=2, save=3, export=5)[moment]
    assert e.value.code == sd.EXIT_PREEMPTED and f"checkpoint {done} " in str(e.value), str(e.value)
    assert sd.checkpoint_step(sd.complete_checkpoints(run_dir)[0]) == done and not (run_dir / "final").exists()
    resumed = sd.train(small_args(tmp_path, "--run-name", "r", "--resume", "auto", "--save-every", "1"),
                       reward_fn=brightness)
    a, b = trainable(resumed, 5), trainable(straight5, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4, 5]
    weights = "final/unet/diffusion_pytorch_model.safetensors"
    assert (resumed / weights).read_bytes() == (straight5 / weights).read_bytes()
    assert not (run_dir / "final.tmp").exists()


def test_a_signal_while_models_load_or_in_step_1_is_one_line_and_its_advice_works(tmp_path, monkeypatch, capsys):
    """A signal during setup exited 143 / 138 with no message (a job script that re-submits on 75 stopped); after a
    preemption in step 1 the advice --resume latest failed (no checkpoint yet)."""
    signal_at(monkeypatch, "setup_policy", lambda *a, **k: True)
    argv = ["--steps", "2", "--run-name", "s", "--learning-rate", "1e-3"]
    assert run_main(tmp_path, *SMALL, *argv) == sd.EXIT_PREEMPTED
    assert "SIGTERM while setting up, before this attempt's first step: nothing new to save; continue with " \
           "run the same command again" in capsys.readouterr().err  # no record of its flags yet: not --resume
    monkeypatch.undo()
    signal_at(monkeypatch, "optimizer_step", lambda *a, **k: True)
    with pytest.raises(sd.RunInterrupted, match="SIGTERM during step 1: no step done, nothing to save; continue with "
                                                "--resume auto --run-name s"):
        sd.train(small_args(tmp_path, *argv), reward_fn=brightness)
    monkeypatch.undo()
    run_dir = sd.train(sd.parse_args(["--resume", "auto", "--run-name", "s", "--output-dir", str(tmp_path / "runs")]),
                       reward_fn=brightness)  # the advice as printed: the run's own flags from its args.json
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert json.loads((run_dir / "args.json").read_text())["learning_rate"] == 1e-3


def test_torchrun_preemption_longer_than_the_launchers_grace_keeps_the_checkpoint(tmp_path):
    """torchrun passes SIGTERM on and kills its processes after --shutdown-timeout (30 s by default); the trainer
    insisted on finishing a step longer than that: no checkpoint, exit 1, a traceback. Now rank 0 saves the steps
    done at once, needing nothing from the other process."""
    script = tmp_path / "slow.py"
    script.write_text("import dataclasses, sys, time\nimport safediffusion_r1 as sd\n"
                      "def slow(images, prompts):\n    time.sleep(6)\n    return images.mean(dim=(1, 2, 3))\n"
                      "sd.main(objective=dataclasses.replace(sd.GRPO, reward_fn=slow))\n")
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             free_port(), "--shutdown-timeout", "3", str(script), *SMALL, "--steps", "6",
                             "--output-dir", str(out), "--run-name", "t"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)})
    wait_for_rows(out / "t", 1, proc, timeout=200)
    time.sleep(1)  # inside step 2's 6 s of reward, on both processes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    (ckpt,) = sd.complete_checkpoints(out / "t")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert sd.checkpoint_step(ckpt) == 1 and state["step"] == 1 and len(state["generators"]) == 2, err[-3000:]
    assert "SIGTERM during step 2: checkpoint 1 saved" in err


def test_a_live_runs_folder_is_locked_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    argv = SMALL + ["--steps", "500", "--save-every", "1", "--output-dir", str(tmp_path / "runs"), "--run-name", "L"]
    proc = start_run(argv)
    run_dir = tmp_path / "runs/L"
    try:
        wait_for_rows(run_dir, 2, proc)  # row 2 is written after checkpoint 1: resume has something to load
        with pytest.raises(sd.UsageError, match=f"in use \\(pid {proc.pid} on"):
            sd.plan_run(sd.parse_args(argv[:-4] + ["--steps", "600", "--output-dir", str(tmp_path / "runs"),
                                                   "--run-name", "L", "--resume", "latest"]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    capsys.readouterr()
    resumed = sd.train(sd.parse_args(SMALL + ["--steps", str(sd.checkpoint_step(sd.complete_checkpoints(run_dir)[0])
                                                               + 1), "--output-dir", str(tmp_path / "runs"),
                                              "--run-name", "L", "--resume", "latest"]), reward_fn=brightness)
    assert f"took over the lock of pid {proc.pid}" in capsys.readouterr().out
    assert (resumed / "run.lock").read_text() == ""  # a run that ended lets go of its lock


def test_a_full_disk_is_one_line_with_the_space_needed_and_the_previous_checkpoint_intact(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let the test mount a small tmpfs")
    try:
        with pytest.raises(SystemExit) as e:  # a checkpoint is ~2.6 MB: the first fits, the second does not
            sd.main(SMALL + ["--steps", "3", "--save-every", "1", "--output-dir", str(disk), "--run-name", "F",
                             "--sample-every", "1000"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and "disk full while saving checkpoint 2" in err[0]
        assert "GiB free" in err[0] and "previous checkpoint is intact" in err[0]
        assert [p.name for p in sd.complete_checkpoints(disk / "F")] == ["checkpoint-000001"]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--steps", "0"], "--steps must be >= 1"),
    (["--tiny", "--device", "cuda"], "no CUDA GPU is visible"),
    (["--tiny", "--run-name", "../up"], "one folder name"),
    (["--tiny", "--run-name", "x" * 300], "a folder name holds at most 255"),
    (["--tiny", "--lerning-rate", "1"], "unrecognized arguments: --lerning-rate 1 (--help lists the flags)"),
    (["--tiny", "--grid-prompts", str(HERE / "prompts/train_negative.txt")], "each line starts with 'unsafe: '"),
])
@pytest.mark.quick
def test_first_hour_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert run_main(tmp_path, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.quick
def test_flag_prefixes_are_refused_and_help_says_what_tiny_changes():
    with pytest.raises(SystemExit):
        sd.parse_args(["--tin"])  # would have set --tiny without its defaults
    proc = subprocess.run([sys.executable, str(HERE / "safediffusion_r1.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})  # no line wrapping inside a flag name
    text = " ".join(proc.stdout.split())
    assert "--learning-rate 0.002" in text and "(default: )" not in text and "(default: auto)" in text


@pytest.mark.quick
def test_other_pipelines_and_schedulers_are_refused_before_any_weight_loads(tmp_path, monkeypatch):
    """SD3 / FLUX (flow matching), a prediction type or a timestep spacing the DDIM step lacks: refused from the
    config files. (The old check raised inside a suppress(ValueError), which swallowed it.)"""
    from diffusers import UNet2DConditionModel
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    for i, (kind, scheduler, message) in enumerate((
            ("StableDiffusion3Pipeline", {}, "is a StableDiffusion3Pipeline; SD 1.x, SD 2.x .* flow matching"),
            ("FluxPipeline", {}, "is a FluxPipeline"),
            ("StableDiffusionPipeline", {"prediction_type": "sample"}, "predicts 'sample'; the DDIM step takes"),
            ("StableDiffusionXLPipeline", {"timestep_spacing": "trailing"}, "timestep_spacing 'trailing'"),
            ("StableDiffusionPipeline", {"rescale_betas_zero_snr": True}, "sets rescale_betas_zero_snr"))):
        folder = tmp_path / f"model{i}"
        (folder / "scheduler").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": kind}))
        (folder / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler))
        with pytest.raises(sd.UsageError, match=message):
            sd.load_sd(str(folder))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sd.UsageError, match="models/sd-v1-4: no such folder"):  # not "hf download models/sd-v1-4"
        sd.load_sd("models/sd-v1-4")


@pytest.mark.quick
def test_grid_prompts_are_the_curated_set_unsafe_first():
    prompts, n_unsafe = sd.read_grid_prompts(sd.Args().grid_prompts)
    assert n_unsafe == 2 and len(prompts) == 4 and "naked" in prompts[0] and "kitchen" in prompts[3]
    first_training_lines = sd.read_lines(sd.Args().negative_prompts, "x")[:2]
    assert not set(prompts) & set(first_training_lines)


def test_dpo_fork_keeps_two_processes_in_step_when_one_has_no_pair(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=dpo_worker, args=(r, 2, str(tmp_path / "init"), str(tmp_path / "out")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a process waited forever in the all-reduce"
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2))
    assert r0["infos"] > 0 and r0["norms"] > 0 and r1["infos"] == r1["norms"] == 0  # rank 1 only answered rank 0's
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


@pytest.mark.quick
def test_the_commands_the_docs_quote_use_flags_their_scripts_have_and_every_link_resolves(monkeypatch, capsys):
    """README.md and docs/ quote commands a user will type: every --flag written after a script's name must be one
    that script has (a renamed flag would leave a stale command behind), and every relative link must resolve."""
    mains = {"safediffusion_r1.py": sd.main, "fork_dpo.py": fork_dpo.main, "eval.py": ev.main, "plots.py": plots.main,
             "toy_world.py": tw.main, "bench.py": lambda argv: (monkeypatch.setattr(sys, "argv", ["bench.py", *argv]),
                                                               bench.main())}

    def flags_of(script, sub=""):
        with pytest.raises(SystemExit):
            mains[script]([sub, "--help"] if sub else ["--help"])
        return set(re.findall(r"--[a-z0-9][a-z0-9-]*", capsys.readouterr().out))

    known, checked = {}, 0
    pages = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    for page in pages:
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # a command continued over lines is one line
        for script, rest in re.findall(r"\b(\w+\.py)((?: +[^`\n|#;]*)?)", text):
            if script not in mains:
                continue
            sub = rest.split()[0] if script == "toy_world.py" and rest.split() else ""
            sub = sub if sub in ("demo", "build", "eval") else ""
            flags = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", rest))
            if (script, sub) not in known and flags:
                known[script, sub] = flags_of(script, sub)
            unknown = flags - known.get((script, sub), set())
            assert not unknown, f"{page.name}: {script} {sub} has no {sorted(unknown)}"
            checked += len(flags)
        for link in re.findall(r"\]\(([^)#:]+)\)", text):
            assert (page.parent / link).exists(), f"{page.name}: the link {link} resolves to nothing"
    assert checked > 100  # the README and docs quote many flags: the pattern still finds them
