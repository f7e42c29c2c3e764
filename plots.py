"""Training curves, drawn with matplotlib: a run's metrics and the toy bench's curves over training time.

Run:
  python plots.py runs/X        # runs/X/metrics.jsonl -> runs/X/curves.png: reward, KL, approx_kl (log), clipfrac
toy_world.py draws its time curves with line_panels. Evaluation itself is eval.py's.
"""
import json
from pathlib import Path

import safediffusion_r1 as sd


def line_panels(path, panels, xlabel):
    """One panel per (title, series, log_y), side by side; series = {label: (colour, [(x, y)], band)}, where band, if
    not None, is [(x, low, high)] shaded behind the line. log_y: a log axis (approx_kl falls by decades after the
    first step, which a linear axis would flatten). Missing values (None) and, on a log axis, values <= 0 are left
    out. -> path."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.4), squeeze=False)
    for ax, (title, series, log_y) in zip(axes[0], panels):
        for label, (colour, points, band) in series.items():
            if band:
                ax.fill_between(*zip(*band), color=colour, alpha=0.2, linewidth=0)
            points = [(x, y) for x, y in points if y is not None and (y > 0 or not log_y)]
            if points:
                ax.plot(*zip(*points), color=colour, label=label, marker="." if len(points) < 20 else None)
        ax.set(title=title, xlabel=xlabel, yscale="log" if log_y else "linear")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_run(run_dir):
    """A training run's curves from metrics.jsonl -> run_dir/curves.png: the reward (overall, unsafe and benign
    prompts), the KL to the reference, approx_kl on a log axis, clipfrac, each on its own axis."""
    rows = [json.loads(x) for x in sd.metrics_up_to(Path(run_dir, "metrics.jsonl"), float("inf")).splitlines()]
    line = lambda k, c: (c, [(r["step"], r.get(k)) for r in rows], None)  # noqa: E731
    panels = [("reward", {k: line(k, c) for k, c in (("reward_mean", "black"), ("reward_negative", "firebrick"),
                                                      ("reward_positive", "royalblue"))}, False),
              ("KL to the reference", {"kl": line("kl", "black")}, False),
              ("approx_kl", {"approx_kl": line("approx_kl", "black")}, True),
              ("clipfrac", {"clipfrac": line("clipfrac", "black")}, False)]
    return line_panels(Path(run_dir, "curves.png"), panels, "step")


def main(argv=None):
    """python plots.py RUN_DIR: bad input is one line and exit code 2."""
    p = sd.OneLineErrors(description="Draw a training run's curves to RUN_DIR/curves.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's folder (it holds metrics.jsonl)")
    args = p.parse_args(argv)
    with sd.exit_2_on_usage_error():
        if not Path(args.run_dir, "metrics.jsonl").is_file():
            raise sd.UsageError(f"{args.run_dir}: not a training run (no metrics.jsonl)")
        print(plot_run(args.run_dir))


if __name__ == "__main__":
    main()
