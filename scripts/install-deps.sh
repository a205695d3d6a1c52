#!/usr/bin/env bash
# Installs every Debian 12 package normkit needs. Idempotent: when everything is
# present it prints nothing and touches nothing. Runs apt-get as root directly,
# through sudo otherwise.
set -euo pipefail

packages=(
  # build
  cmake ninja-build g++ make pkg-config
  # threads, SIMD, data
  libgomp1 zlib1g-dev
  # matrix multiply and convolution (training engine), oneDNN side-by-side benchmarks
  libopenblas-dev libdnnl-dev
  # CLI, JSON, formatting; PNG images for `normkit predict`
  libcli11-dev nlohmann-json3-dev libfmt-dev libpng-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev
  # Python bindings and their tests; PyTorch 1.13 is the reference we match
  pybind11-dev python3-dev python3-numpy python3-pytest python3-torch libtorch-dev
  # normkit.Standardizer is tested inside scikit-learn's Pipeline
  python3-sklearn
  # normkit.torch's export tests (ONNX graphs) and convert() example (torchvision's ResNet-18)
  python3-onnx python3-torchvision
  # pip install --no-build-isolation . into a virtual environment (no package index needed)
  python3-pip python3-setuptools python3-wheel python3-venv
  # plots and the real data set
  python3-matplotlib dataset-fashion-mnist
  # the claims lab: t quantiles for its verdicts; scikit-learn's bundled tables
  python3-scipy python3-sklearn
  # data-parallel training: MPI for the engine and the CLI (torch.distributed's gloo
  # ships with python3-torch)
  libopenmpi-dev openmpi-bin
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install-deps: missing packages (${missing[*]}) and neither root nor sudo is available" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
