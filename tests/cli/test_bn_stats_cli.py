"""`normkit recalibrate`, `adapt`, `shift`, `eval --bn-stats/--shift` and `train
--eval-bn-stats` end to end: what they write, that the original checkpoint is never
touched, that the CLI paths agree with each other (a recalibrated checkpoint evaluates
as `eval --bn-stats precise:N`; a shifted data set on disk as `eval --shift`), and that
bad input is a clear error that writes nothing. The exactness of the statistics is
tested in C++ (tests/cpp/test_bn_stats.cpp) and Python (tests/python/test_bn_stats.py).

    NORMKIT_CLI=<build>/normkit /usr/bin/python3 -m pytest tests/cli
"""
import json
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

CLI = os.environ.get("NORMKIT_CLI", "")
if not CLI or not Path(CLI).is_file():
    pytest.exit("set NORMKIT_CLI to the normkit executable (ctest does)", returncode=2)


def normkit(*args, check=None):
    result = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode >= 0, f"normkit crashed (signal {-result.returncode}): {result.stderr}"
    if check is not None:
        assert result.returncode == check, (
            f"normkit {' '.join(map(str, args))}: exit {result.returncode}, expected {check}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    if result.returncode != 0:
        assert result.stderr.startswith("normkit: error: "), result.stderr
    return result


def evaluate(*args):
    return json.loads(normkit("eval", *args, "--json", check=0).stdout)


def write_idx(directory, prefix, images, labels, side):
    """IDX files of unsigned bytes: images (magic 0x803) and labels (0x801)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x803, len(labels), side, side) + bytes(images))
    (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(labels)) + bytes(labels))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A CSV table with a BN model trained on it, and a small IDX image set with a CNN."""
    d = tmp_path_factory.mktemp("bnstats")
    rng = random.Random(3)
    rows = ["a,b,c,d,label"]
    for i in range(400):
        label = i % 3
        rows.append(",".join(f"{rng.gauss(5.0 + 2.0 * label * (j % 2), 1.5):.5f}" for j in range(4)) + f",{label}")
    (d / "t.csv").write_text("\n".join(rows) + "\n")
    (d / "mlp.spec").write_text("input 4\nlinear 12 bias=0\nbatchnorm\nrelu\nlinear 8 bias=0\nbatchnorm\nrelu\nlinear 3\n")
    normkit("train", "--model", d / "mlp.spec", "--data", d / "t.csv", "--epochs", 2, "--batch-size", 4,
            "--lr", 0.02, "--threads", 1, "--seed", 3, "--out", d / "mlp", check=0)
    # 10x10 "images": class k is bright in band k (rows 3k..3k+2), plus noise.
    for prefix, count in (("train", 150), ("t10k", 60)):
        images, labels = [], []
        for i in range(count):
            k = i % 3
            for r in range(10):
                for c in range(10):
                    base = 180 if 3 * k <= r < 3 * k + 3 else 40
                    images.append(max(0, min(255, base + rng.randint(-30, 30))))
            labels.append(k)
        write_idx(d / "img", prefix, images, labels, 10)
    (d / "cnn.spec").write_text("input 1 10 10\nconv 4 3 pad=1 bias=0\nbatchnorm\nrelu\nflatten\nlinear 10\n")
    normkit("train", "--model", d / "cnn.spec", "--data", d / "img", "--epochs", 2, "--batch-size", 8,
            "--lr", 0.02, "--threads", 1, "--seed", 4, "--out", d / "cnn", check=0)
    return d


def test_recalibrated_checkpoint_evaluates_as_eval_precise(setup, tmp_path):
    ckpt = setup / "mlp" / "checkpoint.nkc"
    before = ckpt.read_bytes()
    out = tmp_path / "precise.nkc"
    report = json.loads(normkit("recalibrate", ckpt, "--samples", 200, "--seed", 5, "--out", out, "--json",
                                check=0).stdout)
    assert ckpt.read_bytes() == before
    assert report["samples"] == 200 and report["pass"] == "eval"
    assert [l["layer"] for l in report["layers"]] == [1, 4]
    assert all(l["values_per_channel"] == 200 for l in report["layers"])
    # The same statistics by either path: the same evaluation, bit for bit.
    written = evaluate(out)
    on_the_fly = evaluate(ckpt, "--bn-stats", "precise:200", "--seed", 5)["results"][0]
    assert (written["loss"], written["accuracy"]) == (on_the_fly["loss"], on_the_fly["accuracy"])
    assert written["loss"] != evaluate(ckpt)["loss"]
    # Only the running statistics changed; the checkpoint says where they came from.
    info = json.loads(normkit("info", out, "--json", check=0).stdout)
    assert info["spec"] == json.loads(normkit("info", ckpt, "--json", check=0).stdout)["spec"]
    assert info["bn_statistics"][-1]["command"] == "recalibrate"
    assert info["bn_statistics"][-1]["samples"] == 200
    # The train pass is another estimate.
    normkit("recalibrate", ckpt, "--samples", 200, "--batch-size", 4, "--out", tmp_path / "train.nkc", check=0)
    assert evaluate(tmp_path / "train.nkc")["loss"] != written["loss"]
    text = normkit("recalibrate", ckpt, "--samples", 50, "--out", tmp_path / "t.nkc", check=0).stdout
    assert "batchnorm" in text and "saved" in text


def test_eval_statistics_sources(setup):
    ckpt = setup / "mlp" / "checkpoint.nkc"
    r = evaluate(ckpt, "--bn-stats", "running", "--bn-stats", "batch:8", "--bn-stats", "adapt:40",
                 "--bn-stats", "precise:100:4")["results"]
    assert [x["bn_stats"] for x in r] == ["running", "batch:8", "adapt:40", "precise:100:4"]
    assert r[0]["loss"] == evaluate(ckpt)["loss"]  # running is plain eval
    assert len({x["loss"] for x in r}) == 4
    # batch statistics depend on the shuffle's seed, and only on it
    a = evaluate(ckpt, "--bn-stats", "batch:4", "--seed", 1)["results"][0]
    assert a["loss"] == evaluate(ckpt, "--bn-stats", "batch:4", "--seed", 1)["results"][0]["loss"]
    assert a["loss"] != evaluate(ckpt, "--bn-stats", "batch:4", "--seed", 2)["results"][0]["loss"]
    table = normkit("eval", ckpt, "--bn-stats", "running", "--bn-stats", "batch:8", check=0).stdout
    assert "bn statistics" in table and "batch:8" in table


@pytest.mark.parametrize("value, words", [
    ("precise", "expected running, precise:N"), ("precise:0", "whole number >= 1"), ("batch:1", ">= 2"),
    ("ema", "expected running"), ("precise:9999", "only"), ("adapt:500", "only"), ("precise:10:1", ">= 2"),
])
def test_eval_bad_statistics_sources(setup, value, words):
    result = normkit("eval", setup / "mlp" / "checkpoint.nkc", "--bn-stats", value, check=2)
    assert words in result.stderr


def test_errors_write_nothing(setup, tmp_path):
    ckpt = setup / "mlp" / "checkpoint.nkc"
    out = tmp_path / "out.nkc"
    # A corrupted and a truncated checkpoint.
    bad = tmp_path / "bad.nkc"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = normkit("recalibrate", bad, "--samples", 10, "--out", out, check=1)
    assert "bad.nkc" in result.stderr
    short = tmp_path / "short.nkc"
    short.write_bytes(ckpt.read_bytes()[:100])
    assert "short.nkc" in normkit("adapt", short, "--data", setup / "t.csv", "--out", out, check=1).stderr
    # More samples than the training set holds; --out is the checkpoint; --out exists.
    assert "--samples 100000" in normkit("recalibrate", ckpt, "--samples", 100000, "--out", out, check=2).stderr
    assert "checkpoint itself" in normkit("recalibrate", ckpt, "--out", ckpt, "--overwrite", check=2).stderr
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    out.write_text("keep me")
    assert "--overwrite" in normkit("recalibrate", ckpt, "--samples", 10, "--out", out, check=2).stderr
    assert out.read_text() == "keep me"
    out.unlink()
    # A model without batch norm; data of another shape.
    normkit("train", "--model", setup / "mlp.spec", "--norm", "none", "--data", setup / "t.csv", "--epochs", 1,
            "--out", tmp_path / "plain", check=0)
    result = normkit("recalibrate", tmp_path / "plain" / "checkpoint.nkc", "--samples", 10, "--out", out, check=2)
    assert "no batch-norm layers" in result.stderr
    result = normkit("adapt", ckpt, "--data", setup / "img", "--samples", 10, "--out", out, check=2)
    assert "shape" in result.stderr
    assert "--shift" in normkit("adapt", ckpt, "--data", setup / "t.csv", "--shift", "noise:0.1", "--samples", 10,
                                "--out", out, check=2).stderr
    assert not out.exists()


def test_shift_on_disk_equals_shift_on_the_fly(setup, tmp_path):
    ckpt = setup / "cnn" / "checkpoint.nkc"
    normkit("shift", "--data", setup / "img", "--shift", "noise:0.3", "--seed", 7, "--out", tmp_path / "noisy", check=0)
    assert sorted(p.name for p in (tmp_path / "noisy").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    on_disk = evaluate(ckpt, "--data", tmp_path / "noisy")
    on_the_fly = evaluate(ckpt, "--shift", "noise:0.3", "--seed", 7)["results"][0]
    assert (on_disk["loss"], on_disk["accuracy"]) == (on_the_fly["loss"], on_the_fly["accuracy"])
    assert on_disk["loss"] != evaluate(ckpt)["loss"]
    # Reproducible: the same seed the same bytes, another seed others.
    normkit("shift", "--data", setup / "img", "--shift", "noise:0.3", "--seed", 7, "--out", tmp_path / "again", check=0)
    normkit("shift", "--data", setup / "img", "--shift", "noise:0.3", "--seed", 8, "--out", tmp_path / "other", check=0)
    image = "t10k-images-idx3-ubyte"
    assert (tmp_path / "again" / image).read_bytes() == (tmp_path / "noisy" / image).read_bytes()
    assert (tmp_path / "other" / image).read_bytes() != (tmp_path / "noisy" / image).read_bytes()
    assert "--overwrite" in normkit("shift", "--data", setup / "img", "--shift", "noise:0.3", "--out",
                                    tmp_path / "noisy", check=2).stderr
    assert "noise:S" in normkit("shift", "--data", setup / "img", "--shift", "blur:2", "--out",
                                tmp_path / "x", check=2).stderr
    assert not (tmp_path / "x").exists()
    # Adapting on the shifted images: written, and the same as eval's adapt:N.
    adapted = tmp_path / "adapted.nkc"
    normkit("adapt", ckpt, "--data", tmp_path / "noisy", "--samples", 40, "--seed", 2, "--out", adapted, check=0)
    a = evaluate(adapted, "--data", tmp_path / "noisy")
    assert a["loss"] != on_disk["loss"]
    # adapt draws its 40 samples with --seed 2, eval with --seed 7: compare like with like
    c = evaluate(ckpt, "--data", tmp_path / "noisy", "--bn-stats", "adapt:40", "--seed", 2)["results"][0]
    assert (a["loss"], a["accuracy"]) == (c["loss"], c["accuracy"])
    # The train split of the new data is another sample of it.
    normkit("adapt", ckpt, "--data", tmp_path / "noisy", "--split", "train", "--samples", 100, "--out",
            tmp_path / "adapted-train.nkc", check=0)


def test_train_evaluates_other_statistics_each_epoch(setup, tmp_path):
    out = tmp_path / "run"
    normkit("train", "--model", setup / "mlp.spec", "--data", setup / "t.csv", "--epochs", 2, "--batch-size", 4,
            "--lr", 0.02, "--seed", 3, "--threads", 1, "--eval-bn-stats", "precise:100,batch:16", "--out", out, check=0)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert set(m["bn_stats"]) == {"precise:100", "batch:16"}
        assert set(m["bn_stats"]["precise:100"]) == {"test_loss", "test_acc"}
    # The training itself is the same as without (the model keeps its statistics).
    plain = [json.loads(l) for l in (setup / "mlp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in plain]
    assert [m["test_loss"] for m in lines] == [m["test_loss"] for m in plain]
    assert "precise:x" in normkit("train", "--data", setup / "t.csv", "--eval-bn-stats", "running,precise:x",
                                  "--out", tmp_path / "bad", check=2).stderr
