#!/usr/bin/python3
"""Plot training curves from normkit metrics.jsonl files (and their steps.jsonl).

    plot_metrics.py --out curves.png [--title T] LABEL=PATH [LABEL=PATH ...]

Each PATH is a metrics.jsonl written by `normkit train` or `normkit compare`
(one JSON object per epoch). The figure has two panels, one colour per run: the
loss per epoch (training solid, validation dotted, test dashed: each where the
run evaluated it) and, when a steps.jsonl beside the metrics.jsonl has training
losses (--log-every), the training loss per logged step as a thin line; and the
validation and test accuracy per epoch. `normkit train` and `normkit compare`
run this with Debian's /usr/bin/python3 (python3-matplotlib) and carry on
without a plot if it fails.
"""
import argparse
import json
import os
import sys


def read_metrics(path):
    """The JSON objects of a .jsonl file, one per line."""
    epochs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                epochs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not JSON ({e})")
    return epochs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the PNG file to write")
    parser.add_argument("--title", default="", help="a title above both panels")
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="a run's label and metrics.jsonl")
    args = parser.parse_args()

    runs = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=PATH, got {item!r}")
        steps_path = os.path.join(os.path.dirname(path), "steps.jsonl")
        steps = read_metrics(steps_path) if os.path.isfile(steps_path) else []
        runs.append((label, read_metrics(path), [m for m in steps if "train_loss" in m]))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"matplotlib is not available ({e}); install python3-matplotlib")

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def curve(ax, epochs, key, style, colour, label):
        """`key` per epoch where the run has it (a test set evaluated only at the end: one point)."""
        points = [(m["epoch"], m[key]) for m in epochs if key in m]
        if points:
            ax.plot(*zip(*points), style, color=colour, label=label)

    for i, (label, epochs, steps) in enumerate(runs):
        colour = colours[i % len(colours)]
        if steps:
            loss_ax.plot([m["epoch"] for m in steps], [m["train_loss"] for m in steps], "-", color=colour,
                         linewidth=0.7, alpha=0.45, label=f"{label}, train per step")
        curve(loss_ax, epochs, "train_loss", "-o", colour, f"{label}, train")
        curve(loss_ax, epochs, "val_loss", ":^", colour, f"{label}, validation")
        curve(loss_ax, epochs, "test_loss", "--s", colour, f"{label}, test")
        curve(acc_ax, epochs, "val_acc", ":^", colour, f"{label}, validation")
        curve(acc_ax, epochs, "test_acc", "-o", colour, f"{label}, test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    epochs = sorted({m["epoch"] for _, run, _ in runs for m in run})
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
