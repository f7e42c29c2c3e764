"""The toy world (toy_world.py): its judge, its build and shipped models, the sign of GRPO and DPO on it, and the
bench's seeds, aggregation and curves.

CPU only, tiny random models and stand-ins built in code, no network. Shared fixtures: conftest.py;
helpers: testkit.py. Run: pytest -q (everything) or pytest -q -m quick.
"""
import json
import math
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub, which reads it once
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import safediffusion_r1 as sd  # noqa: E402
import toy_world as tw  # noqa: E402
from testkit import (HERE, metrics, signal_at, toy_unsafe_rate_after)  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Toy world (toy_world.py): the judge, the world, the build's formats, the shipped model, the sign of GRPO
# ------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_toy_judge_reads_every_colour_and_shape_and_calls_noise_no_object():
    rng = np.random.default_rng(11)
    pairs = tw.classes(list(tw.PALETTE), tw.SHAPES) * 40  # 720 images, every class 40 times
    images, _ = tw.draw([c for c, _ in pairs], [s for _, s in pairs], rng)
    verdicts = tw.judge(images)
    assert sum(v == p for v, p in zip(verdicts, pairs)) / len(pairs) >= 0.99
    noise = torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    blank = torch.full((4, 3, 64, 64), 0.93)
    two = torch.where(tw.draw(["blue"] * 8, ["square"] * 8, rng)[1][:, None].roll(30, dims=-1),
                      torch.tensor([0.1, 0.6, 0.2])[:, None, None], tw.draw(["red"] * 8, ["circle"] * 8, rng)[0])
    assert all(v == (None, None) for v in tw.judge(torch.cat([noise, blank])))
    assert sum(v == (None, None) for v in tw.judge(two)) >= 6  # two separate objects: no single object


@pytest.mark.quick
def test_toy_world_is_deterministic_and_any_colour_can_be_unsafe():
    draw = lambda seed: tw.draw(["red", "cyan"], ["circle", "triangle"], np.random.default_rng(seed))[0]  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    for unsafe in tw.PALETTE:  # nothing special-cases red: every colour makes the same world with roles swapped
        world = tw.check_world(unsafe)
        pairs = tw.corpus(world, 4000, np.random.default_rng(0), fidelity=0.6)
        named = [(shown, s) for text, shown, s in pairs if unsafe in text.split()]
        assert 0.55 < sum(shown == unsafe for shown, _ in named) / len(named) < 0.65
        benign = [(text.split(), shown, s) for text, shown, s in pairs if unsafe not in text.split()]
        assert all(shown in words and s in words for words, shown, s in benign)


@pytest.mark.parametrize("argv, message", [
    (["build", "--unsafe-colour", "magenta"], "unknown colour 'magenta'"),
    (["build", "--shapes", "circle,hexagon"], "unknown shape 'hexagon'"),
    (["build", "--safe-colours", "red,blue"], "both the unsafe colour and a safe one"),
    (["eval", "--model", "MISSING/sd"], "not a built toy world"),
    (["demo", "--toy", "MISSING"], "not a built toy world"),
    (["demo", "--num-inference-steps", "1"], "--num-inference-steps must be >= 2"),
    (["eval", "--num-inference-steps", "0"], "--num-inference-steps must be >= 2")])
def test_toy_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, argv, message):
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv] + ["--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "toy_world.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_toy_build_writes_folders_the_real_loaders_accept(tmp_path):
    from diffusers import StableDiffusionPipeline
    args = tw.parse_args(["build", "--out", str(tmp_path / "toy"), "--clip-steps", "2", "--vae-steps", "2",
                          "--unet-steps", "2", "--gate-images", "1", "--unsafe-colour", "blue"])
    meta = tw.build(args)
    assert meta["unsafe_colour"] == "blue" and "red" in meta["safe_colours"] and not (tmp_path / "toy.tmp").exists()
    parts = sd.load_sd(str(tmp_path / "toy/sd"))
    assert parts["vae"].config.scaling_factor != 0.18215 and parts["tokenizer"].model_max_length == tw.CONTEXT
    model, tokenizer = sd.load_reward_model(f"local-dir:{tmp_path / 'toy/clip'}", "")
    ids = parts["tokenizer"]("a blue circle").input_ids  # [bos, a, blue, circle, eos]: words, not unknowns
    assert len(ids) == 5 and tokenizer(["a blue circle"])[0, :5].tolist() == ids
    assert tokenizer.context_length == tw.CONTEXT
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "toy/sd")
    assert pipe("a blue circle", num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (
        1, 64, 64, 3)
    (tmp_path / "toy/clip/open_clip_model.safetensors").unlink()  # half a folder: refused with the way out
    with pytest.raises(sd.UsageError, match="build --out"):
        tw.load_world(tmp_path / "toy")


def test_shipped_toy_passes_its_quality_gate_on_a_small_sample():
    """The shipped toy/ (built by `toy_world.py build`): its own recorded gate, and a fresh small sample through the
    real loaders: benign prompts drawn right, the unsafe colour drawn for part (not all) of the unsafe prompts."""
    meta, world = tw.load_world(HERE / "toy")
    assert meta["gate_passed"] and world[0] == meta["unsafe_colour"] and tw.clip_retrieval(HERE / "toy", n=2) >= 0.95
    result, _ = tw.evaluate(HERE / "toy", images_per_prompt=2, seed=123)
    m = result["train_templates"]
    assert m["benign_accuracy"] >= 0.85 and 0.35 <= m["unsafe_rate"] <= 0.9, m  # 120 / 24 images: sampling error


@pytest.mark.parametrize("dpo", [False, True], ids=["grpo", "dpo"])
def test_toy_steering_lowers_the_unsafe_rate_against_the_negated_reward(tmp_path, toy_models, dpo):
    """Sign control: the same seed and steps with the reward negated must end with a clearly higher unsafe rate
    (a bare "it went down" would pass on drift)."""
    steered, _ = toy_unsafe_rate_after(tmp_path, HERE / "toy", toy_models, "steered", +1, dpo)
    negated, _ = toy_unsafe_rate_after(tmp_path, HERE / "toy", toy_models, "negated", -1, dpo)
    assert steered + 0.15 < negated, (steered, negated)


@pytest.mark.quick
def test_a_truncated_or_incomplete_toy_world_json_is_one_line(tmp_path):
    toy = tmp_path / "toy"
    shutil.copytree(HERE / "toy", toy)
    for text, message in (('{"unsafe_colour": "re', "not valid JSON"), ("", "not valid JSON"),
                          ('{"unsafe_colour": "red"}', "lacks safe_colours")):
        (toy / "world.json").write_text(text)
        with pytest.raises(sd.UsageError, match=message):
            tw.load_world(toy)


# ------------------------------------------------------------------------------------------------
# The toy world as a bench: seeds, evaluation seed, aggregation, curves over time
# ------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_toy_bench_aggregates_seeds_into_mean_sd_and_a_t_interval():
    def result(unsafe, seconds):
        split = dict(unsafe_rate=unsafe, content_kept=0.9, benign_accuracy=0.8, no_object=0.0, n_unsafe=48)
        return dict(train_templates=split, heldout_templates=split, train_seconds=seconds, time_to_target=None)
    agg = tw.aggregate({"grpo": [result(0.1, 10), result(0.2, 20), result(0.3, 30)]})["grpo"]
    s = agg["train_templates"]["unsafe_rate"]
    assert s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(0.1) and s["per_seed"] == [0.1, 0.2, 0.3]
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert s["ci95"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-6)
    assert s["eval_noise_sd"] == pytest.approx(math.sqrt(0.2 * 0.8 / 48))
    assert agg["train_seconds"]["mean"] == 20 and agg["time_to_target"] == dict(reached=0, of=3, per_seed=[None] * 3)
    assert math.isnan(tw.seed_summary([0.5])["ci95"][0]) and tw.seed_summary([0.5])["sd"] == 0


def test_toy_curve_recorder_and_time_to_target_on_a_two_step_run(tmp_path):
    meta, world = tw.load_world(HERE / "toy")
    files = tw.write_prompts(tmp_path / "prompts", world, meta)
    run_dir = tmp_path / "runs/grpo"
    argv = tw.train_argv(HERE / "toy", files, run_dir, dict(tw.RECIPE, steps=2, prompts_per_step=2, group_size=4), 0)
    argv += ["--sample-batch-size", "8", "--train-batch-size", "8"]  # the toy's 32 / 16 do not divide 2 x 4
    curve = tw.train_with_curve(HERE / "toy", argv, run_dir, 2, 1, eval_seed=0)
    assert [c["step"] for c in curve] == [1, 2] and [c["images"] for c in curve] == [8, 16]
    assert 0 < curve[0]["train_seconds"] < curve[1]["train_seconds"]
    assert {"unsafe_rate", "content_kept", "benign_accuracy", "no_object"} <= set(curve[0])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]  # the chunks make one run
    assert not list(run_dir.glob("final-*"))  # no chunk's final/ left behind
    base = dict(unsafe_rate=0.6, benign_accuracy=0.9)
    good = dict(step=3, images=24, train_seconds=9.0, unsafe_rate=0.19, benign_accuracy=0.86, content_kept=0.8)
    early = dict(good, step=2, images=16, train_seconds=6.0, unsafe_rate=0.21)  # not yet a third of the base's
    assert tw.time_to_target([early, good], base) == (9.0, 24)
    assert tw.time_to_target([dict(good, content_kept=0.79)], base) is None


def test_toy_demo_seeds_and_sampler_steps_reach_training_and_evaluation(tmp_path, monkeypatch):
    trained, evaluated = [], []
    real_train, real_generate = sd.train, tw.generate
    monkeypatch.setattr(sd, "train", lambda args, *a, **k: trained.append((args.seed, args.num_inference_steps))
                        or real_train(args, *a, **k))
    monkeypatch.setattr(tw, "generate", lambda parts, prompts, seed, **k: evaluated.append(
        (seed, k["sampling"]["num_inference_steps"])) or real_generate(parts, prompts, seed, **k))
    argv = ["demo", "--quick", "--variants", "grpo", "--seeds", "3,4", "--eval-seed", "7", "--steps", "1",
            "--images-per-prompt", "1", "--curve-every", "0", "--num-inference-steps", "8",
            "--out", str(tmp_path / "demo")]
    tw.main(argv)
    assert trained == [(3, 8), (4, 8)] and set(evaluated) == {(7, 8)}
    tw.main(argv)  # a rerun into the same folder trains afresh (CI reruns the quick demo into one folder)
    assert [seed for seed, _ in trained] == [3, 4, 3, 4]
    results = json.loads((tmp_path / "demo/results.json").read_text())
    assert results["seeds"] == [3, 4] and results["eval_seed"] == 7 and "DDIM 8 steps" in results["protocol"]
    assert len(results["variants"]["grpo"]["train_templates"]["no_object"]["per_seed"]) == 2
    text = (tmp_path / "demo/results.md").read_text()
    assert "no object" in text and "# Per model, training seed 3 only (of 2: the multi-seed table above" in text
    assert "# Results" not in text  # the per-model table no longer passes for the result of every seed


def test_toy_demo_reports_the_validation_probe_s_best_model_beside_the_last(tmp_path):
    try:  # --quick's direction check may fail after 2 steps: the tables are written before it
        tw.main(["demo", "--quick", "--variants", "grpo_fast_ode2", "--steps", "2", "--eval-every", "1",
                 "--curve-every", "0", "--images-per-prompt", "1", "--out", str(tmp_path / "demo")])
    except SystemExit as e:
        assert "direction check failed" in str(e)
    results = json.loads((tmp_path / "demo/results.json").read_text())
    assert set(results["variants"]) == {"base", "grpo_fast_ode2", "grpo_fast_ode2@best"}
    best = json.loads((tmp_path / "demo/train/seed-0/grpo_fast_ode2/best/training.json").read_text())
    rows = metrics(tmp_path / "demo/train/seed-0/grpo_fast_ode2")
    assert best["step"] == max(rows, key=lambda r: r["val_reward"])["step"]
    assert "| grpo_fast_ode2@best |" in (tmp_path / "demo/results.md").read_text()


def test_toy_demo_stopped_by_a_signal_is_one_line_and_says_it_trains_in_chunks(tmp_path, monkeypatch, capsys):
    """SIGTERM ended the demo in a traceback, exit 1, advising --resume latest (a flag demo lacks); its log said
    "step 1/1" then "resuming ... step 2/2" with no word of the chunks it trains in."""
    calls = []
    signal_at(monkeypatch, "optimizer_step", lambda *a, **k: calls.append(1) or len(calls) == 3)  # chunk 2's first
    with pytest.raises(SystemExit) as e:
        tw.main(["demo", "--quick", "--variants", "grpo", "--seeds", "0", "--steps", "2", "--curve-every", "1",
                 "--images-per-prompt", "1", "--out", str(tmp_path / "demo")])
    out, err = capsys.readouterr()
    assert e.value.code == sd.EXIT_PREEMPTED and err.strip().splitlines() == [
        "stopped (SIGTERM during step 2): run the same command again; the demo trains its variants afresh and does "
        "not resume"]
    assert "toy demo: grpo, steps 2-2 of 2 (trained in chunks of --curve-every 1" in out
    with pytest.raises(SystemExit) as e:
        tw.main(["eval", "--model", str(HERE / "toy/sd"), "--images-per-prompt", "0", "--out", str(tmp_path / "e")])
    assert e.value.code == 2 and "--images-per-prompt must be >= 1" in capsys.readouterr().err


@pytest.mark.quick
@pytest.mark.parametrize("seeds, message", [("", "at least one seed"), ("1,1", "each once"), ("a", "integers")])
def test_toy_demo_bad_seed_lists_are_one_line_exit_2(tmp_path, capsys, seeds, message):
    with pytest.raises(SystemExit) as e:
        tw.main(["demo", "--seeds", seeds, "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "demo").exists()
