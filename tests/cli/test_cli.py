"""The `normkit` command end to end: train, resume, eval, info, compare, and its errors.

Run by ctest (tests/CMakeLists.txt) as
    NORMKIT_CLI=<build>/normkit /usr/bin/python3 -m pytest tests/cli
Most runs use a small synthetic CSV table, so they take a fraction of a second;
one uses Fashion-MNIST (cut to a few hundred samples) for the IDX path and cnn-small.
"""
import json
import math

import pytest

from cli_support import FASHION, RESULT_KEYS, metrics, normkit, results, train_args

# ---------------------------------------------------------------- help and usage errors

def test_help_and_version():
    top = normkit("--help", check=0)
    for command in ("train", "compare", "eval", "info"):
        assert command in top.stdout
        sub = normkit(command, "--help", check=0)
        assert "Usage: normkit " + command in sub.stdout
    assert "--resume" in normkit("train", "--help", check=0).stdout
    assert normkit("--version", check=0).stdout.startswith("normkit ")
    assert "subcommand is required" in normkit(check=2).stderr


@pytest.mark.parametrize("args, words", [
    (["train", "--lr", "-1"], "--lr: must be a positive number"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--optimizer", "rmsprop"], "--optimizer"),
    (["train", "--norm", "weight"], "--norm"),
    (["train", "--batch-size", "1"], "--batch-size"),
    (["train", "--bogus"], "--bogus"),
    (["train", "--resume", "--overwrite"], "excludes"),
    (["train", "--optimizer", "adam", "--momentum", "0.5"], "sgd only"),
    (["train", "--model", "no-such-model"], "neither a preset"),
    (["eval"], "checkpoint is required"),
])
def test_usage_errors_exit_2(args, words, tmp_path):
    result = normkit(*args, "--out", tmp_path / "out") if args[0] == "train" else normkit(*args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr


def test_missing_files_exit_1(tmp_path):
    result = normkit("train", "--data", tmp_path / "nothing", "--out", tmp_path / "o", check=1)
    assert "nothing" in result.stderr and "no such file" in result.stderr
    result = normkit("info", tmp_path / "absent.nkc", check=1)
    assert "absent.nkc" in result.stderr
    result = normkit("train", "--resume", "--out", tmp_path / "empty", check=1)
    assert "no checkpoint to resume" in result.stderr


# ---------------------------------------------------------------- train, resume, repeat

def test_train_writes_metrics_and_checkpoint(table, tmp_path):
    out = tmp_path / "run"
    result = normkit(*train_args(table, out), check=0)
    assert "epoch 1/2" in result.stdout and "epoch 2/2" in result.stdout  # plain lines off a terminal
    assert "\r" not in result.stderr
    lines = metrics(out / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        for key in RESULT_KEYS + ["seconds", "norm", "model", "lr", "batch_size", "samples_per_second"]:
            assert key in m, key
        assert m["run"] == "run" and m["norm"] == "batch" and m["batch_size"] == 32
        assert 0 <= m["test_acc"] <= 1 and m["train_loss"] > 0 and m["seconds"] > 0
        assert m["train_samples"] == 480 and m["test_samples"] == 120  # 20% held out
    assert lines[-1]["test_acc"] > 0.6  # the blobs are separable
    assert (out / "checkpoint.nkc").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.nkc", "metrics.jsonl", "run.json"]

    # A second fresh run into the same directory must not silently replace it.
    result = normkit(*train_args(table, out), check=2)
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    normkit(*train_args(table, out, "--overwrite", "--norm", "none"), check=0)
    assert all(m["norm"] == "none" for m in metrics(out / "metrics.jsonl"))


def test_resume_equals_uninterrupted_run(table, tmp_path):
    normkit(*train_args(table, tmp_path / "full", epochs=3), check=0)
    normkit(*train_args(table, tmp_path / "parts", epochs=1), check=0)
    # A crash between saving the checkpoint and appending metrics could leave a
    # line the checkpoint does not know; resuming rewrites the file from the checkpoint.
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "stale": true}\n')
    result = normkit("train", "--resume", "--epochs", 3, "--out", tmp_path / "parts", check=0)
    assert "resuming after epoch 1" in result.stdout
    assert results(tmp_path / "parts" / "metrics.jsonl") == results(tmp_path / "full" / "metrics.jsonl")
    # The checkpoints hold the same weights: the same evaluation, bit for bit.
    full = json.loads(normkit("eval", tmp_path / "full" / "checkpoint.nkc", "--json", check=0).stdout)
    parts = json.loads(normkit("eval", tmp_path / "parts" / "checkpoint.nkc", "--json", check=0).stdout)
    assert (full["loss"], full["confusion"]) == (parts["loss"], parts["confusion"])

    # A resumed run keeps its settings.
    result = normkit("train", "--resume", "--epochs", 4, "--lr", 0.1, "--out", tmp_path / "parts", check=2)
    assert "--lr 0.1 differs from the checkpoint's 0.05" in result.stderr
    result = normkit("train", "--resume", "--out", tmp_path / "parts", check=0)
    assert "nothing to do" in result.stdout


def test_cosine_schedule_rates_and_resume(table, tmp_path):
    normkit(*train_args(table, tmp_path / "full", "--lr-schedule", "cosine", epochs=3), check=0)
    rates = [m["lr"] for m in metrics(tmp_path / "full" / "metrics.jsonl")]
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    assert rates == pytest.approx(expected, rel=1e-12)
    normkit(*train_args(table, tmp_path / "parts", "--lr-schedule", "cosine", epochs=1), check=0)
    normkit("train", "--resume", "--epochs", 3, "--out", tmp_path / "parts", check=0)
    assert results(tmp_path / "parts" / "metrics.jsonl") == results(tmp_path / "full" / "metrics.jsonl")
    constant = tmp_path / "constant"
    normkit(*train_args(table, constant, epochs=3), check=0)
    assert results(constant / "metrics.jsonl") != results(tmp_path / "full" / "metrics.jsonl")


def test_same_command_same_metrics(table, tmp_path):
    for name in ("a", "b"):
        normkit(*train_args(table, tmp_path / name, "--optimizer", "adam", "--lr", 0.01), check=0)
    assert results(tmp_path / "a" / "metrics.jsonl") == results(tmp_path / "b" / "metrics.jsonl")
    normkit(*train_args(table, tmp_path / "c", "--seed", 12), check=0)
    assert results(tmp_path / "c" / "metrics.jsonl") != results(tmp_path / "a" / "metrics.jsonl")


def test_non_finite_loss_keeps_the_last_good_checkpoint(table, tmp_path):
    out = tmp_path / "run"
    normkit(*train_args(table, out, epochs=1), check=0)
    before = (out / "checkpoint.nkc").read_bytes()
    # Resuming on data with values near float's maximum: the loss overflows in epoch 2.
    huge = table["dir"] / "huge.csv"
    huge.write_text("\n".join(",".join(["3e38"] * 6 + [str(i % 3)]) for i in range(100)) + "\n")
    result = normkit("train", "--resume", "--epochs", 3, "--data", huge, "--out", out, check=1)
    # The loss check or a layer's check of its input stops it, naming the epoch.
    assert "epoch 2" in result.stderr
    assert "loss became" in result.stderr or "NaN or infinite" in result.stderr
    assert "last good checkpoint (epoch 1)" in result.stderr
    assert (out / "checkpoint.nkc").read_bytes() == before
    assert len(metrics(out / "metrics.jsonl")) == 1


# ---------------------------------------------------------------- eval, info, bad checkpoints

def test_fashion_mnist_eval_and_info(tmp_path):
    # scripts/install-deps.sh installs dataset-fashion-mnist: its absence is a failure, not a skip.
    assert FASHION.is_dir(), f"{FASHION} is missing; run scripts/install-deps.sh"
    out = tmp_path / "cnn"
    normkit("train", "--model", "cnn-small", "--epochs", 1, "--limit-train", 512, "--limit-test", 256,
            "--threads", 2, "--out", out, check=0)
    checkpoint = out / "checkpoint.nkc"
    text = normkit("eval", checkpoint, check=0).stdout
    assert "256 test samples" in text and "confusion matrix" in text
    report = json.loads(normkit("eval", checkpoint, "--json", check=0).stdout)
    assert report["samples"] == 256 and report["classes"] == 10
    assert sum(map(sum, report["confusion"])) == 256
    assert report["accuracy"] == pytest.approx(metrics(out / "metrics.jsonl")[0]["test_acc"])
    info = normkit("info", checkpoint, check=0).stdout
    assert "parameters: 421866" in info and "1 epochs done of 1" in info
    assert "standardizer: 784 features" in info and "batchnorm(32" in info
    data = json.loads(normkit("info", checkpoint, "--json", check=0).stdout)
    assert data["parameters"] == 421866 and data["optimizer"]["name"] == "sgd"
    assert data["format"] == "nhwc"


def test_corrupted_checkpoints_are_rejected(table, tmp_path):
    out = tmp_path / "run"
    normkit(*train_args(table, out, epochs=1), check=0)
    good = (out / "checkpoint.nkc").read_bytes()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    (tmp_path / "flipped.nkc").write_bytes(bytes(flipped))
    result = normkit("eval", tmp_path / "flipped.nkc", check=1)
    assert "flipped.nkc" in result.stderr and "checksum mismatch" in result.stderr

    for length in (0, 10, len(good) // 2, len(good) - 1):
        (tmp_path / "cut.nkc").write_bytes(good[:length])
        result = normkit("info", tmp_path / "cut.nkc", check=1)
        assert "cut.nkc" in result.stderr
        assert ("truncated" in result.stderr) or ("empty" in result.stderr)

    (tmp_path / "text.nkc").write_text("not a checkpoint at all\n")
    assert "not a normkit checkpoint" in normkit("info", tmp_path / "text.nkc", check=1).stderr

    # --resume on a corrupted checkpoint: refused, nothing changed.
    (out / "checkpoint.nkc").write_bytes(bytes(flipped))
    before = (out / "metrics.jsonl").read_bytes()
    assert "checksum mismatch" in normkit("train", "--resume", "--out", out, check=1).stderr
    assert (out / "metrics.jsonl").read_bytes() == before


# ---------------------------------------------------------------- compare

def compare_args(table, out, *extra):
    return ["compare", "--model", table["spec"], "--data", table["csv"], "--epochs", 2,
            "--batch-size", 32, "--threads", 2, "--seed", 3, "--out", out, *extra]


def test_compare_table_report_and_plot(table, tmp_path):
    out = tmp_path / "cmp"
    result = normkit(*compare_args(table, out), check=0)
    assert "with batch norm" in result.stdout and "without batch norm" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2, result.stdout
    with_bn, without = metrics(out / "batch" / "metrics.jsonl"), metrics(out / "none" / "metrics.jsonl")
    assert [m["run"] for m in with_bn] == ["batch", "batch"] and [m["norm"] for m in without] == ["none"] * 2
    assert with_bn != without
    assert (out / "batch" / "checkpoint.nkc").is_file() and (out / "none" / "checkpoint.nkc").is_file()
    report = (out / "report.md").read_text()
    assert "| epoch |" in report and "## Settings" in report and "curves.png" in report
    assert "After 2 epochs, the model with batch normalization reached" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The BN-free run equals `train --norm none` with the same options.
    normkit(*train_args(table, tmp_path / "plain", "--norm", "none", "--seed", 3, "--lr", 0.05), check=0)
    assert [{k: m[k] for k in RESULT_KEYS[1:]} for m in without] == results(tmp_path / "plain" / "metrics.jsonl")

    # Resuming a finished comparison to a third epoch extends both runs.
    normkit("compare", "--resume", "--epochs", 3, "--out", out, check=0)
    assert len(metrics(out / "batch" / "metrics.jsonl")) == 3
    assert len(metrics(out / "none" / "metrics.jsonl")) == 3
    # --norm names the comparison's normalization, so giving it on --resume is fine.
    normkit("compare", "--resume", "--norm", "batch", "--epochs", 4, "--out", out, check=0)
    assert len(metrics(out / "none" / "metrics.jsonl")) == 4


@pytest.mark.parametrize("norm, layer", [("renorm", "batchrenorm"),
                                         ("ghost", "ghostbatchnorm"), ("layer", "layernorm"),
                                         ("group", "groupnorm")])
def test_every_norm_trains_and_resumes(table, tmp_path, norm, layer):
    out = tmp_path / norm
    normkit(*train_args(table, out, "--norm", norm, epochs=3), check=0)
    history = metrics(out / "metrics.jsonl")
    assert [m["norm"] for m in history] == [norm] * 3
    # Three overlapping blobs (chance 1/3; batch norm reaches about 0.8 in 3 epochs).
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["test_acc"] > 0.6
    info = json.loads(normkit("info", out / "checkpoint.nkc", "--json", check=0).stdout)
    assert f"; {layer}" in info["spec"] and info["norm"] == norm
    if norm == "group":  # 16 flat features: groups of two, not of one (which gives β alone)
        assert "groups=8" in info["spec"]
    # Resumed and uninterrupted runs agree for every normalization (ghost's
    # virtual batches, renorm's warm-up step count are part of the state).
    split = tmp_path / (norm + "-split")
    normkit(*train_args(table, split, "--norm", norm, epochs=1), check=0)
    normkit(*train_args(table, split, "--norm", norm, "--resume", epochs=3), check=0)
    assert results(split / "metrics.jsonl") == results(out / "metrics.jsonl")


def test_norm_instance_on_images_and_compare_with_another_norm(table, tmp_path):
    assert FASHION.is_dir(), f"{FASHION} is missing; run scripts/install-deps.sh"
    out = tmp_path / "instance"
    normkit("train", "--model", "cnn-small", "--norm", "instance", "--epochs", 1, "--limit-train", 256,
            "--limit-test", 128, "--threads", 2, "--out", out, check=0)
    spec = json.loads(normkit("info", out / "checkpoint.nkc", "--json", check=0).stdout)["spec"]
    # After each convolution an instance norm; the flat fc128's BN has no instances and is dropped.
    assert spec.count("instancenorm") == 2 and "batchnorm" not in spec and "linear 128;" in spec

    cmp = tmp_path / "cmp-layer"
    result = normkit("compare", "--model", table["spec"], "--data", table["csv"], "--norm", "layer",
                     "--epochs", 1, "--batch-size", 32, "--threads", 2, "--out", cmp, check=0)
    assert "with layer norm" in result.stdout and "without layer norm" in result.stdout
    assert (cmp / "layer" / "metrics.jsonl").is_file() and (cmp / "none" / "metrics.jsonl").is_file()
    assert "the model with layer normalization reached" in (cmp / "report.md").read_text()
    normkit("compare", "--resume", "--norm", "layer", "--epochs", 2, "--out", cmp, check=0)
    assert len(metrics(cmp / "layer" / "metrics.jsonl")) == 2
    result = normkit("compare", "--resume", "--norm", "batch", "--epochs", 3, "--out", cmp, check=2)
    assert '--norm "batch" differs from the checkpoint\'s "layer"' in result.stderr
    result = normkit("compare", "--model", table["spec"], "--data", table["csv"], "--norm", "none",
                     "--out", tmp_path / "c2", check=2)
    assert "--norm none" in result.stderr


def test_compare_without_python_still_reports(table, tmp_path):
    out = tmp_path / "cmp"
    result = normkit(*compare_args(table, out), env={"NORMKIT_PYTHON": "/nonexistent/python3"}, check=0)
    assert "normkit: warning: no plot" in result.stderr
    assert "No plot: cannot run /nonexistent/python3" in (out / "report.md").read_text()
    assert not (out / "curves.png").exists()


def test_compare_needs_batch_norm(table, tmp_path):
    plain = table["dir"] / "plain.spec"
    plain.write_text("input 6; linear 16; relu; linear 3")
    result = normkit("compare", "--model", plain, "--data", table["csv"], "--out", tmp_path / "c", check=2)
    assert "no batchnorm layer" in result.stderr


def test_json_spec_equals_text_spec(table, tmp_path):
    spec = table["dir"] / "mlp.json"
    spec.write_text(json.dumps({"input": [6], "layers": [
        {"type": "linear", "args": [16], "options": {"bias": 0}}, "batchnorm", "relu", "linear 3"]}))
    normkit(*train_args(table, tmp_path / "json", epochs=1), "--model", spec, check=0)
    normkit(*train_args(table, tmp_path / "text", epochs=1), check=0)
    assert results(tmp_path / "json" / "metrics.jsonl") == results(tmp_path / "text" / "metrics.jsonl")
    spec.write_text('{"input": [6], "layers": [{"type": "linear"}]}')
    result = normkit(*train_args(table, tmp_path / "bad", epochs=1), "--model", spec, check=2)
    assert "mlp.json" in result.stderr


# ---------------------------------------------------------------- fold

def test_fold_keeps_predictions_and_drops_batch_norm(table, tmp_path):
    assert "Usage: normkit fold" in normkit("fold", "--help", check=0).stdout
    assert "fold" in normkit("--help", check=0).stdout
    spec = table["dir"] / "fold.spec"
    # The first batchnorm follows a linear layer and folds; the second follows relu and stays.
    spec.write_text("input 6\nlinear 16 bias=0\nbatchnorm\nrelu\nbatchnorm\nlinear 3\n")
    out = tmp_path / "run"
    normkit(*train_args(table, out, "--model", spec, epochs=1), check=0)
    original = out / "checkpoint.nkc"
    folded = tmp_path / "folded.nkc"
    result = normkit("fold", original, "--out", folded, check=0)
    assert "folded layer 1 batchnorm(16" in result.stdout and "into layer 0 linear(6 -> 16" in result.stdout
    assert "kept   layer 3 batchnorm(16" in result.stdout and "follows relu" in result.stdout
    # linear 6->16 gains 16 biases, the folded batchnorm loses 32 parameters.
    assert "parameters: 211 -> 195 (-16)" in result.stdout
    assert "spec: input 6; linear 16 bias=1; relu; batchnorm; linear 3" in result.stdout

    before = json.loads(normkit("eval", original, "--json", check=0).stdout)
    after = json.loads(normkit("eval", folded, "--json", check=0).stdout)
    assert after["samples"] == before["samples"] == 120
    assert after["accuracy"] == before["accuracy"] and after["confusion"] == before["confusion"]
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
    info = json.loads(normkit("info", folded, "--json", check=0).stdout)
    assert info["parameters"] == 195 and info["optimizer"]["name"] == ""
    assert info["spec"] == "input 6; linear 16 bias=1; relu; batchnorm; linear 3"
    assert "folded from" in normkit("info", folded, check=0).stdout

    report = json.loads(normkit("fold", original, "--out", tmp_path / "f2.nkc", "--json", check=0).stdout)
    assert report["folded"] == [{"batchnorm": 1, "into": 0, "folded_index": 0}]
    assert report["kept"] == [{"batchnorm": 3, "after": "relu", "folded_index": 2}]
    assert (report["parameters_before"], report["parameters_after"]) == (211, 195)
    # A folded model has nothing left to fold, and no optimizer state to resume from.
    again = normkit("fold", folded, "--out", tmp_path / "f3.nkc", check=0)
    assert "batchnorm layers folded: 0, kept: 1" in again.stdout


def test_fold_refuses_to_overwrite_and_bad_checkpoints(table, tmp_path):
    out = tmp_path / "run"
    normkit(*train_args(table, out, epochs=1), check=0)
    original = out / "checkpoint.nkc"
    target = tmp_path / "folded.nkc"
    target.write_bytes(b"precious")
    result = normkit("fold", original, "--out", target, check=2)
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert target.read_bytes() == b"precious"
    normkit("fold", original, "--out", target, "--overwrite", check=0)
    assert "batchnorm" not in json.loads(normkit("info", target, "--json", check=0).stdout)["spec"]
    result = normkit("fold", original, "--out", tmp_path, check=2)
    assert "is a directory" in result.stderr
    assert "--out is required" in normkit("fold", original, check=2).stderr

    flipped = bytearray(original.read_bytes())
    flipped[len(flipped) // 2] ^= 0x40
    bad = tmp_path / "bad.nkc"
    bad.write_bytes(bytes(flipped))
    result = normkit("fold", bad, "--out", tmp_path / "never.nkc", check=1)
    assert "bad.nkc" in result.stderr and "checksum mismatch" in result.stderr
    result = normkit("fold", tmp_path / "absent.nkc", "--out", tmp_path / "never.nkc", check=1)
    assert "absent.nkc" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "never.nkc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nkc", "folded.nkc", "run"]  # no temporaries


def test_fold_cnn_small_on_fashion_mnist(tmp_path):
    assert FASHION.is_dir(), f"{FASHION} is missing; run scripts/install-deps.sh"
    for fmt in ("nhwc", "nchw"):
        out = tmp_path / fmt
        normkit("train", "--model", "cnn-small", "--epochs", 1, "--limit-train", 256, "--limit-test", 200,
                "--format", fmt, "--threads", 2, "--out", out, check=0)
        folded = out / "folded.nkc"
        result = normkit("fold", out / "checkpoint.nkc", "--out", folded, check=0)
        assert "batchnorm layers folded: 3, kept: 0" in result.stdout
        assert "parameters: 421866 -> 421642 (-224)" in result.stdout
        before = json.loads(normkit("eval", out / "checkpoint.nkc", "--json", check=0).stdout)
        after = json.loads(normkit("eval", folded, "--json", check=0).stdout)
        assert after["samples"] == 200
        assert after["accuracy"] == before["accuracy"] and after["confusion"] == before["confusion"]
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
        assert json.loads(normkit("info", folded, "--json", check=0).stdout)["format"] == fmt
