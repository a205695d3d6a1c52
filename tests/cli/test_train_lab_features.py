"""The `normkit train` features the claims lab runs on (they are users' features
too): the validation split and when the test set is evaluated, per-step lines
in steps.jsonl, probes, the divergence outcome in run.json, raw inputs,
per-class subsets, mlp: models, noisy BN and frozen BN after an epoch.

    NORMKIT_CLI=<build>/normkit /usr/bin/python3 -m pytest tests/cli
"""
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

CLI = os.environ.get("NORMKIT_CLI", "")
FASHION = Path("/usr/share/datasets/fashion-mnist")

if not CLI or not Path(CLI).is_file():
    pytest.exit("set NORMKIT_CLI to the normkit executable (ctest does)", returncode=2)


def normkit(*args, check=0):
    result = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == check, (f"normkit {' '.join(map(str, args))}: exit {result.returncode}\n"
                                        f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Three classes of Gaussian blobs in 6 features of very different scales, 600 rows."""
    path = tmp_path_factory.mktemp("data") / "blobs.csv"
    rng = random.Random(3)
    rows = ["a,b,c,d,e,f,label"]
    for i in range(600):
        label = i % 3
        rows.append(",".join(f"{rng.gauss(1.0 + label * (j % 2), 0.7) * 10 ** j:.6g}" for j in range(6))
                    + f",{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def train(table, out, *extra, epochs=2, model="mlp:depth=2,width=16"):
    return normkit("train", "--model", model, "--data", table, "--epochs", epochs, "--batch-size", 32,
                   "--lr", 0.05, "--threads", 1, "--seed", 4, "--out", out, *extra)


def test_validation_split_is_stratified_and_the_test_set_waits_for_the_end(table, tmp_path):
    train(table, tmp_path / "r", "--val-fraction", 0.25, epochs=3)
    lines = jsonl(tmp_path / "r" / "metrics.jsonl")
    # 480 training rows (the CSV's fixed 20% is the test set), 160 per class: 40 per class held out.
    assert [m["val_samples"] for m in lines] == [120] * 3
    assert [m["train_samples"] for m in lines] == [360] * 3
    assert all("val_acc" in m for m in lines)
    assert ["test_acc" in m for m in lines] == [False, False, True]
    train(table, tmp_path / "n", "--val-fraction", 0.25, "--test-eval", "never")
    assert not any("test_acc" in m for m in jsonl(tmp_path / "n" / "metrics.jsonl"))
    train(table, tmp_path / "e", "--val-fraction", 0.25, "--test-eval", "epoch")
    assert all("test_acc" in m for m in jsonl(tmp_path / "e" / "metrics.jsonl"))
    err = normkit("train", "--data", table, "--model", "mlp:depth=1", "--test-eval", "end", "--out", tmp_path / "x",
                  check=2)
    assert "needs --val-fraction" in err.stderr


def test_the_split_follows_data_seed_not_seed(table, tmp_path):
    for name, extra in (("a", []), ("b", ["--data-seed", 9])):
        train(table, tmp_path / name, "--val-fraction", 0.25, "--test-eval", "never", "--eval-every", 1000,
              "--probe-every", 1000, "--probe-samples", 5, "--probe-units", 1, *extra, epochs=1)
    # The probe batch is the first validation samples: the same split gives the same probe at step 0.
    pa = jsonl(tmp_path / "a" / "steps.jsonl")[0]["probe"]
    pb = jsonl(tmp_path / "b" / "steps.jsonl")[0]["probe"]
    assert pa["activations"][0]["percentiles"] != pb["activations"][0]["percentiles"]


def test_steps_lines_and_their_resume(table, tmp_path):
    args = ["--val-fraction", 0.2, "--log-every", 5, "--eval-every", 10, "--probe-every", 10, "--probe-ics"]
    train(table, tmp_path / "whole", *args, epochs=3)
    steps = jsonl(tmp_path / "whole" / "steps.jsonl")
    per_epoch = (480 - 96 + 31) // 32  # 384 rows in batches of 32
    assert per_epoch == 12
    assert steps[0]["step"] == 0 and "probe" in steps[0] and "train_loss" not in steps[0]
    logged = [s["step"] for s in steps]
    assert logged == sorted(set(logged)) and logged[-1] == 35  # 36 steps; the last multiple of 5
    for s in steps[1:]:
        assert ("train_loss" in s) == (s["step"] % 5 == 0)
        assert ("val_acc" in s) == (s["step"] % 10 == 0)
        assert ("probe" in s) == (s["step"] % 10 == 0)
    probe = steps[2]["probe"]  # step 10
    assert [w["type"] for w in probe["weights"]] == ["linear"] * 3
    assert all("ics_distance" in w for w in probe["weights"])
    assert [a["type"] for a in probe["activations"]] == ["relu", "relu"]
    assert len(probe["activations"][0]["percentiles"][0]) == 3
    # Interrupted after epoch 2 and resumed: the same lines, the same numbers.
    train(table, tmp_path / "split", *args, epochs=2)
    with open(tmp_path / "split" / "steps.jsonl", "a") as f:
        f.write('{"step": 30, "cut')  # a crash in epoch 3 left half a line
    normkit("train", "--out", tmp_path / "split", "--resume", "--epochs", 3)
    strip = lambda lines: [{k: v for k, v in s.items() if k != "seconds"} for s in lines]  # noqa: E731
    assert strip(jsonl(tmp_path / "split" / "steps.jsonl")) == strip(steps)


def test_probes_and_evaluations_do_not_change_training(table, tmp_path):
    train(table, tmp_path / "plain", "--val-fraction", 0.2)
    train(table, tmp_path / "probed", "--val-fraction", 0.2, "--probe-every", 3, "--probe-ics", "--eval-every", 4,
          "--log-every", 2)
    keys = ["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"]
    a = [{k: m.get(k) for k in keys} for m in jsonl(tmp_path / "plain" / "metrics.jsonl")]
    b = [{k: m.get(k) for k in keys} for m in jsonl(tmp_path / "probed" / "metrics.jsonl")]
    assert a == b


def test_divergence_ends_the_run_with_an_outcome(table, tmp_path):
    # Raw inputs up to 1e5 at lr 1: the loss explodes.
    result = normkit("train", "--model", "mlp:depth=2,width=16,bn=none", "--data", table, "--epochs", 5,
                     "--batch-size", 32, "--lr", 1, "--inputs", "raw", "--diverge-factor", 2, "--threads", 1,
                     "--out", tmp_path / "d", check=1)
    assert "diverged" in result.stderr or "loss became" in result.stderr
    outcome = json.loads((tmp_path / "d" / "run.json").read_text())
    assert outcome["status"] == "diverged"
    assert outcome["divergence"]["reason"]
    assert outcome["epochs_done"] < 5
    train(table, tmp_path / "ok", epochs=1)
    outcome = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert outcome["status"] == "finished" and outcome["divergence"] is None
    assert outcome["last"]["epoch"] == 1 and outcome["steps_done"] == 15


def test_raw_inputs_keep_no_standardizer(table, tmp_path):
    train(table, tmp_path / "raw", "--inputs", "raw", "--lr", 1e-6, epochs=1)
    assert "standardizer: none" in normkit("info", tmp_path / "raw" / "checkpoint.nkc").stdout
    train(table, tmp_path / "std", epochs=1)
    assert "standardizer: 6 features" in normkit("info", tmp_path / "std" / "checkpoint.nkc").stdout


def test_mlp_models_noisy_bn_and_frozen_bn(table, tmp_path):
    train(table, tmp_path / "after", model="mlp:depth=2,width=16,act=tanh,bn=after", epochs=1)
    spec = json.loads(normkit("info", tmp_path / "after" / "checkpoint.nkc", "--json").stdout)["spec"]
    assert spec == ("input 6; flatten; linear 16; tanh; batchnorm; linear 16; tanh; batchnorm; linear 3")
    train(table, tmp_path / "noisy", "--norm", "noisy", epochs=1)
    spec = json.loads(normkit("info", tmp_path / "noisy" / "checkpoint.nkc", "--json").stdout)["spec"]
    assert spec.count("noise=1") == 2
    noisy = jsonl(tmp_path / "noisy" / "metrics.jsonl")[0]["train_loss"]
    train(table, tmp_path / "bn", epochs=1)
    assert jsonl(tmp_path / "bn" / "metrics.jsonl")[0]["train_loss"] != noisy
    train(table, tmp_path / "frozen", "--freeze-bn-after", 1, epochs=2)
    spec = json.loads(normkit("info", tmp_path / "frozen" / "checkpoint.nkc", "--json").stdout)["spec"]
    assert spec.count("frozen=1") == 2
    err = normkit("train", "--model", "mlp:depth=2,act=gelu", "--data", table, "--out", tmp_path / "bad", check=2)
    assert "act must be relu, sigmoid or tanh" in err.stderr


def test_per_class_subset_of_fashion_mnist(tmp_path):
    normkit("train", "--model", "mlp:depth=1,width=8", "--data", FASHION, "--per-class", 20, "--val-fraction",
            0.01, "--epochs", 1, "--inputs", "raw", "--lr", 1e-5, "--limit-test", 100, "--threads", 1,
            "--out", tmp_path / "f")
    m = jsonl(tmp_path / "f" / "metrics.jsonl")[0]
    assert m["train_samples"] == 200 and m["val_samples"] == 600  # 20 per class; 1% of 60k held out
    assert "standardizer: none" in normkit("info", tmp_path / "f" / "checkpoint.nkc").stdout
