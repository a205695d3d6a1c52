#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Run by hand when a format changes (the corpora are committed):
    /usr/bin/python3 fuzz/make_seeds.py build/normkit
The checkpoints are real ones, written by `normkit train` on tiny data sets;
everything else is built here byte by byte. Each file starts with the bytes the
target reads as its mode/options (see the header comment of fuzz/fuzz_<target>.cpp).
"""
import gzip
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

SPECS = {
    "mlp-paper": "input 1 28 28; flatten;"
                 "linear 100 bias=0; batchnorm; sigmoid;"
                 "linear 100 bias=0; batchnorm; sigmoid;"
                 "linear 100 bias=0; batchnorm; sigmoid;"
                 "linear 10",
    "cnn-small": "input 1 28 28;"
                 "conv 32 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
                 "conv 64 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
                 "flatten; linear 128 bias=0; batchnorm; relu; linear 10",
    "lines": "# one layer a line\ninput 6\nlinear 16 bias=0\nbatchnorm eps=1e-3 momentum=0.2\nrelu\n"
             "dropout 0.25\nlinear 3\n",
    "variants": "input 3 8 8; conv 8 3 stride=2 pad=1; batchrenorm rmax=2 dmax=3 warmup=10; tanh;"
                "conv 8 1; ghostbatchnorm size=4 frozen=1; avgpool 2 stride=1;"
                "groupnorm groups=4 affine=0; instancenorm track_running_stats=1 affine=1;"
                "flatten; layernorm eps=1e-4; linear 5 bias=1",
    "frozen": "input 4; linear 4; batchnorm frozen=1 momentum=0.5; sigmoid; linear 2",
    "json": '{"input": [1, 4, 4], "layers": ["conv 2 3 pad=1 bias=0",'
            ' {"type": "batchnorm", "options": {"momentum": 0.1}}, "relu",'
            ' {"type": "maxpool", "args": [2]}, "flatten", {"type": "linear", "args": [10]}]}',
    "json-flat": '{"input": [6], "layers": [{"type": "linear", "args": ["16"], "options": {"bias": 0}},'
                 ' "batchnorm", "relu", "linear 3"]}',
}

TINY_IMAGE_SPEC = ("input 1 4 4; conv 2 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten;"
                   " linear 6 bias=0; groupnorm groups=3; relu; linear 10")
TINY_TABLE_SPEC = "input 3; linear 4 bias=0; batchnorm; relu; dropout 0.1; linear 2"


def write(target, name, data):
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def idx(magic_rank, dims, body):
    return bytes([0, 0, 8, magic_rank]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(body)


def table_csv(rows=20):
    lines = ["x,y,z,label"]
    for i in range(rows):
        lines.append(f"{i * 0.5:.2f},{(i % 3) - 1.5},{100 + i},{i % 2}")
    return "\n".join(lines) + "\n"


def image_files(directory, count=12):
    images = idx(3, [count, 4, 4], [(7 * i) % 256 for i in range(count * 16)])
    labels = idx(1, [count], [i % 10 for i in range(count)])
    for split in ("train", "t10k"):
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def main():
    cli = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if CORPUS.exists():
        shutil.rmtree(CORPUS)

    for name, text in SPECS.items():
        write("spec", name, text)

    for mode, (name, delimiter) in enumerate((("comma", ","), ("semicolon", ";"), ("tab", "\t"))):
        write("csv", f"table-{name}", bytes([mode, 0, 0]) + table_csv().replace(",", delimiter).encode())
    write("csv", "no-header-label-first", bytes([0, 1, 3]) + b"0,1.5,2\n2,-1e3,4\n1,0,0\n")
    write("csv", "crlf-spaces", bytes([0, 0, 0]) + b"a , b\r\n 1.0 , 0\r\n+2.5,1\r\n")

    images = idx(3, [3, 2, 2], range(12))
    labels = idx(1, [3], [0, 9, 4])
    for mode in (0, 1):
        write("idx", f"plain-{mode}", bytes([mode]) + struct.pack("<H", len(images)) + images + labels)
    gz_images, gz_labels = gzip.compress(images), gzip.compress(labels)
    write("idx", "gzip-given", bytes([0]) + struct.pack("<H", len(gz_images)) + gz_images + gz_labels)

    magic = b"NKSTD001"
    moments = [(10.0, 0.5, 2.0), (10.0, -3.0, 0.0), (1.0, 1e3, 0.0)]
    write("standardizer", "three-features",
          magic + struct.pack("<Q", len(moments)) + b"".join(struct.pack("<3d", *m) for m in moments))
    write("standardizer", "one-feature", magic + struct.pack("<Q", 1) + struct.pack("<3d", 4.0, 0.25, 1.5))

    if cli is None:
        print("no normkit executable given: checkpoint seeds not written", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "table.csv").write_text(table_csv())
        (tmp / "table.spec").write_text(TINY_TABLE_SPEC)
        (tmp / "image.spec").write_text(TINY_IMAGE_SPEC)
        (tmp / "images").mkdir()
        image_files(tmp / "images")
        runs = {
            "table-sgd": ["--model", tmp / "table.spec", "--data", tmp / "table.csv", "--batch-size", 4],
            "table-adam": ["--model", tmp / "table.spec", "--data", tmp / "table.csv", "--batch-size", 4,
                           "--optimizer", "adam", "--norm", "renorm"],
            "image-nhwc": ["--model", tmp / "image.spec", "--data", tmp / "images", "--batch-size", 4],
            "image-nchw": ["--model", tmp / "image.spec", "--data", tmp / "images", "--batch-size", 4,
                           "--format", "nchw", "--norm", "ghost"],
        }
        for name, args in runs.items():
            out = tmp / name
            subprocess.run([str(cli), "train", "--epochs", "1", "--threads", "1", "--out", str(out),
                            *map(str, args)], check=True, capture_output=True)
            data = (out / "checkpoint.nkc").read_bytes()
            write("checkpoint", f"{name}-file", bytes([0]) + data)
            write("checkpoint", f"{name}-content", bytes([1]) + data[20:-4])  # header 20, CRC 4


if __name__ == "__main__":
    main()
