"""`normkit predict` (PNG images, IDX files and directories, CSV rows with and without labels),
class names and per-class precision/recall/F1 in `eval`, residual networks from text and JSON
specs trained end to end, and `normkit.load_checkpoint`: a trained checkpoint loaded into the
same network built from torch.nn modules gives the engine's predictions."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import normkit
from cli_support import FASHION, normkit as run_normkit

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
RESNET = """input 1 28 28
conv 8 3 pad=1 bias=0; batchnorm; relu
residual
  conv 8 3 pad=1 bias=0; batchnorm; relu
  conv 8 3 pad=1 bias=0; batchnorm
end
residual
  conv 16 3 stride=2 pad=1 bias=0; batchnorm
shortcut
  conv 16 1 stride=2 bias=0; batchnorm
end
maxpool 2
flatten
linear 10
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """cnn-small and a small residual net, one short epoch each on Fashion-MNIST."""
    assert FASHION.is_dir(), f"{FASHION} is missing; run scripts/install-deps.sh"
    directory = tmp_path_factory.mktemp("runs")
    spec = directory / "resnet.spec"
    spec.write_text(RESNET)
    out = {}
    for name, model, fmt in (("cnn", "cnn-small", "nhwc"), ("resnet", spec, "nchw")):
        run_normkit("train", "--model", model, "--epochs", 1, "--limit-train", 1024, "--limit-test", 300,
                    "--format", fmt, "--threads", 2, "--out", directory / name, check=0)
        out[name] = directory / name / "checkpoint.nkc"
    out["dir"] = directory
    return out


def test_eval_names_the_classes_with_precision_recall_f1(runs):
    report = json.loads(run_normkit("eval", runs["cnn"], "--json", check=0).stdout)
    assert report["class_names"] == FASHION_CLASSES
    confusion = np.array(report["confusion"], dtype=float)
    predicted, truly = confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(np.diag(confusion) / predicted)
        recall = np.nan_to_num(np.diag(confusion) / truly)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    np.testing.assert_allclose(report["precision"], precision, rtol=1e-12)
    np.testing.assert_allclose(report["recall"], recall, rtol=1e-12)
    np.testing.assert_allclose(report["f1"], f1, rtol=1e-12)
    assert report["support"] == truly.astype(int).tolist() and sum(report["support"]) == 300
    assert report["macro_f1"] == pytest.approx(f1.mean())
    text = run_normkit("eval", runs["cnn"], check=0).stdout
    for c, name in enumerate(FASHION_CLASSES):
        assert f"{c} {name}" in text
    assert "macro mean" in text and "precision  recall      F1  support" in text
    assert "classes: T-shirt/top, Trouser" in run_normkit("info", runs["cnn"], check=0).stdout


def test_predict_idx_png_and_csv(runs, tmp_path):
    result = json.loads(run_normkit("predict", runs["cnn"], FASHION, "--limit", 20, "--json", check=0).stdout)
    predictions = result["predictions"]
    assert len(predictions) == 20 and result["classes"] == FASHION_CLASSES
    for p in predictions:
        assert abs(sum(p["probabilities"]) - 1) < 1e-9 and len(p["probabilities"]) == 10
        assert p["class"] == int(np.argmax(p["probabilities"])) and p["name"] == FASHION_CLASSES[p["class"]]
        assert 0 <= p["label"] < 10
    # The first test images as PNG files: the same classes and probabilities (pixels are bytes
    # either way, so the inputs are identical).
    import gzip
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:3]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"image{i}.png")
        Image.fromarray(image).save(files[-1])
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.stack([images[0]] * 3, axis=-1)).save(rgb)  # colour: converted to grey
    from_png = json.loads(run_normkit("predict", runs["cnn"], *files, rgb, "--json", check=0).stdout)["predictions"]
    for png, idx in zip(from_png, predictions[:3] + predictions[:1]):
        assert png["class"] == idx["class"]
        np.testing.assert_allclose(png["probabilities"], idx["probabilities"], rtol=1e-5, atol=1e-7)
        assert "label" not in png
    text = run_normkit("predict", runs["cnn"], files[0], "--top", 2, check=0).stdout
    assert text.startswith(f"{files[0]}: {predictions[0]['name']} (") and text.count("(") == 2
    # Wrong sizes and bad files are errors that name them.
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(tmp_path / "small.png")
    result = run_normkit("predict", runs["cnn"], tmp_path / "small.png", check=2)
    assert "small.png': the image is 28x20 (width x height), the model takes 28x28" in result.stderr
    (tmp_path / "fake.png").write_text("not an image")
    assert "fake.png': not a readable PNG image" in run_normkit("predict", runs["cnn"], tmp_path / "fake.png",
                                                                 check=1).stderr


def test_predict_csv_rows_with_and_without_labels(tmp_path):
    rows = ["a,b,label"] + [f"{i % 5},{(i * 7) % 5},{int(i % 5 > 2)}" for i in range(100)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    spec = tmp_path / "m.spec"
    spec.write_text("input 2; linear 8; relu; linear 2")
    run_normkit("train", "--model", spec, "--data", tmp_path / "t.csv", "--epochs", 2, "--batch-size", 16,
                "--out", tmp_path / "run", check=0)
    (tmp_path / "features.csv").write_text("a,b\n4,1\n0,3\n")
    (tmp_path / "labelled.csv").write_text("a,b,label\n4,1,1\n0,3,0\n")
    plain = json.loads(run_normkit("predict", tmp_path / "run" / "checkpoint.nkc", tmp_path / "features.csv",
                                   "--json", check=0).stdout)["predictions"]
    labelled = json.loads(run_normkit("predict", tmp_path / "run" / "checkpoint.nkc", tmp_path / "labelled.csv",
                                      "--json", check=0).stdout)["predictions"]
    assert [p["probabilities"] for p in plain] == [p["probabilities"] for p in labelled]
    assert [p["label"] for p in labelled] == [1, 0] and "label" not in plain[0]
    text = run_normkit("predict", tmp_path / "run" / "checkpoint.nkc", tmp_path / "labelled.csv", check=0).stdout
    assert "[true: 1]" in text and "of 2 labelled inputs predicted correctly" in text


def test_residual_nets_from_text_and_json_specs(runs, tmp_path):
    info = json.loads(run_normkit("info", runs["resnet"], "--json", check=0).stdout)
    assert "residual; conv 8 3 bias=0 pad=1; batchnorm; relu; conv 8 3 bias=0 pad=1; batchnorm; end" in info["spec"]
    assert "shortcut; conv 16 1 bias=0 stride=2; batchnorm; end" in info["spec"]
    text = run_normkit("info", runs["resnet"], check=0).stdout
    assert "+ add + relu, fused" in text and "shortcut conv(8 -> 16, 1x1, stride 2" in text
    report = json.loads(run_normkit("eval", runs["resnet"], "--json", check=0).stdout)
    assert report["accuracy"] > 0.5  # ten classes, one short epoch
    spec = {"input": [1, 28, 28], "layers": [
        "conv 8 3 pad=1 bias=0", "batchnorm", "relu",
        {"type": "residual", "body": ["conv 8 3 pad=1 bias=0", "batchnorm", "relu",
                                      {"type": "conv", "args": [8, 3], "options": {"pad": 1, "bias": 0}},
                                      "batchnorm"]},
        {"type": "residual", "body": ["conv 16 3 stride=2 pad=1 bias=0", "batchnorm"],
         "shortcut": ["conv 16 1 stride=2 bias=0", "batchnorm"]},
        "maxpool 2", "flatten", {"type": "linear", "args": [10]}]}
    (tmp_path / "resnet.json").write_text(json.dumps(spec))
    run_normkit("train", "--model", tmp_path / "resnet.json", "--epochs", 1, "--limit-train", 1024,
                "--limit-test", 300, "--format", "nchw", "--threads", 2, "--out", tmp_path / "json", check=0)
    from_json = json.loads(run_normkit("eval", tmp_path / "json" / "checkpoint.nkc", "--json", check=0).stdout)
    assert from_json["loss"] == report["loss"] and from_json["confusion"] == report["confusion"]
    # --norm none and a layer norm reach inside the blocks; fold keeps what is in them.
    spec_file = runs["dir"] / "resnet.spec"
    for norm, present, absent in (("none", "residual", "batchnorm"), ("layer", "layernorm", "batchnorm")):
        run_normkit("train", "--model", spec_file, "--norm", norm, "--epochs", 1, "--limit-train", 256,
                    "--limit-test", 64, "--threads", 2, "--out", tmp_path / norm, check=0)
        got = json.loads(run_normkit("info", tmp_path / norm / "checkpoint.nkc", "--json", check=0).stdout)["spec"]
        assert present in got and absent not in got, got
    folded = run_normkit("fold", runs["resnet"], "--out", tmp_path / "folded.nkc", check=0)
    assert "batchnorm layers folded: 1" in folded.stdout
    before = json.loads(run_normkit("eval", runs["resnet"], "--json", check=0).stdout)
    after = json.loads(run_normkit("eval", tmp_path / "folded.nkc", "--json", check=0).stdout)
    assert after["confusion"] == before["confusion"]


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_load_checkpoint_gives_the_engine_predictions_in_torch(runs, name):
    ckpt = normkit.load_checkpoint(runs[name])
    assert ckpt.class_names == FASHION_CLASSES and ckpt.epochs_done == 1
    assert ckpt.memory_format == ("nhwc" if name == "cnn" else "nchw")
    model = ckpt.torch_model()
    assert isinstance(model, torch.nn.Sequential) and not model.training
    assert set(model.state_dict()) == set(ckpt.state)
    if name == "cnn":
        assert ckpt.state["0.weight"].shape == (32, 1, 3, 3) and ckpt.state["1.running_var"].shape == (32,)
        assert ckpt.state["9.weight"].shape == (128, 3136) and ckpt.state["12.weight"].shape == (10, 128)
    else:
        assert ckpt.state["3.body.4.running_mean"].shape == (8,)
        assert ckpt.state["4.shortcut.0.weight"].shape == (16, 8, 1, 1)
    engine = json.loads(run_normkit("predict", runs[name], FASHION, "--limit", 300, "--json", check=0).stdout)
    import gzip
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:300]
    x = ckpt.standardize(images.astype(np.float32) / 255)
    with torch.no_grad():
        probabilities = model(torch.from_numpy(x)).softmax(dim=1).double().numpy()
    ours = np.array([p["probabilities"] for p in engine["predictions"]])
    np.testing.assert_allclose(probabilities, ours, atol=2e-5)
    assert (probabilities.argmax(axis=1) == ours.argmax(axis=1)).all()


def test_load_checkpoint_refuses_bad_files(runs, tmp_path):
    good = runs["cnn"].read_bytes()
    cases = {"empty.nkc": (b"", "empty file"), "text.nkc": (b"hello", "not a normkit checkpoint"),
             "cut.nkc": (good[:len(good) // 2], "truncated"),
             "flip.nkc": (good[:100] + bytes([good[100] ^ 1]) + good[101:], "checksum mismatch")}
    for file_name, (data, words) in cases.items():
        (tmp_path / file_name).write_bytes(data)
        with pytest.raises(RuntimeError, match=words) as error:
            normkit.load_checkpoint(tmp_path / file_name)
        assert file_name in str(error.value)
    with pytest.raises(RuntimeError, match="cannot read"):
        normkit.load_checkpoint(tmp_path / "absent.nkc")
