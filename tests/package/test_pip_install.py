"""pip install --no-build-isolation . from a fresh clone, as a user without a package index
does it: into a virtual environment created with --system-site-packages (Debian's numpy
and torch), then normkit, normkit.torch and the `normkit` command used from there.

The clone is of the repository's committed state (NORMKIT_SOURCE_DIR, a git checkout), so
this test checks what a fresh clone gets. It builds the package's compiled parts once
(the kernel library, both extensions, the engine and the command): minutes, the slowest
test of the suite.
"""
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SOURCE = os.environ.get("NORMKIT_SOURCE_DIR",
                        os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

USE = textwrap.dedent("""
    import os, sys
    import numpy as np, torch
    import normkit, normkit.torch as nkt
    site = os.path.realpath(sys.prefix)
    for module in (normkit, nkt):
        assert os.path.realpath(module.__file__).startswith(site), module.__file__
    # The NumPy API.
    x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
    y, mean, invstd = normkit.batch_norm_forward_training(x)
    assert abs(float(y.mean())) < 1e-5
    # The PyTorch modules on the extension, against torch's.
    ref, ours = torch.nn.BatchNorm2d(3), nkt.BatchNorm2d(3)
    xt = torch.from_numpy(x).requires_grad_()
    torch.testing.assert_close(ours(xt), ref(xt))
    ours(xt).pow(2).sum().backward()
    assert xt.grad is not None
    model = nkt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                            torch.nn.ReLU()), fuse_relu=True)
    assert any(isinstance(m, nkt.BatchNormReLU2d) for m in model.modules())
    torch.jit.script(nkt.GroupNorm(1, 3))
    print("used", normkit.__version__)
""")


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_pip_install_from_a_fresh_clone():
    # Not pytest's tmp_path, which keeps the last runs: the clone holds a build tree.
    with tempfile.TemporaryDirectory(prefix="normkit-pip-") as work:
        install_and_use(Path(work))


def install_and_use(tmp_path):
    # Not named normkit: `import normkit` from tmp_path would find the clone as a namespace package.
    clone, venv = tmp_path / "source", tmp_path / "venv"
    run(["git", "clone", "--quiet", SOURCE, str(clone)])
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run([str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-index", "--quiet",
         str(clone)], env=env, cwd=tmp_path)

    # Used from elsewhere (not the clone), by the environment's interpreter.
    assert "used" in run([str(venv / "bin" / "python"), "-c", USE], env=env, cwd=tmp_path)
    # The command, as a console entry point of the package.
    command = venv / "bin" / "normkit"
    assert "train" in run([str(command), "--help"], env=env, cwd=tmp_path)
    assert "checkpoint" in run([str(command), "info", "--help"], env=env, cwd=tmp_path)

    # And out again.
    run([str(venv / "bin" / "pip"), "uninstall", "--yes", "--quiet", "normkit"], env=env)
    gone = subprocess.run([str(venv / "bin" / "python"), "-c", "import normkit"], env=env,
                          cwd=tmp_path, capture_output=True)
    assert gone.returncode != 0
