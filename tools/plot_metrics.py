#!/usr/bin/python3
"""Plot per-epoch training curves from normkit metrics.jsonl files.

    plot_metrics.py --out curves.png [--title T] LABEL=PATH [LABEL=PATH ...]

Each PATH is a metrics.jsonl written by `normkit train` or `normkit compare`
(one JSON object per epoch). The figure has two panels: the training loss
(solid) and test loss (dashed) per epoch, and the test accuracy per epoch,
one colour per run. `normkit compare` runs this with Debian's /usr/bin/python3
(python3-matplotlib) and carries on without a plot if it fails.
"""
import argparse
import json
import sys


def read_metrics(path):
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
        runs.append((label, read_metrics(path)))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"matplotlib is not available ({e}); install python3-matplotlib")

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, epochs) in enumerate(runs):
        colour = colours[i % len(colours)]
        x = [m["epoch"] for m in epochs]
        loss_ax.plot(x, [m["train_loss"] for m in epochs], "-o", color=colour, label=f"{label}, train")
        loss_ax.plot(x, [m["test_loss"] for m in epochs], "--s", color=colour, label=f"{label}, test")
        acc_ax.plot(x, [m["test_acc"] for m in epochs], "-o", color=colour, label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    epochs = sorted({m["epoch"] for _, run in runs for m in run})
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
