"""Shared set-up of the Python suite: run as `python3 -m pytest tests/python` with the
built package on PYTHONPATH (ctest's python_tests does exactly that).

torch is a hard dependency of this suite: it is imported here, so a Python without it fails
at collection instead of skipping tests. For the same reason a skipped, xfailed or xpassed
test fails the session: in a parity suite a test that did not run is not a pass.
"""
import os

import numpy as np
import pytest
import torch  # noqa: F401  (imported for the failure above, not used here)

import normkit

_not_run = []

# A clang build has no normkit.torch (python/CMakeLists.txt says why): the files that use it
# are not collected there, and the summary names them. Every other build runs them all.
_WITHOUT_TORCH_EXTENSION = os.environ.get("NORMKIT_TORCH_EXTENSION") == "0"
_not_collected = []


def pytest_ignore_collect(collection_path, config):
    if (_WITHOUT_TORCH_EXTENSION and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and "normkit.torch" in collection_path.read_text()):
        _not_collected.append(collection_path.name)
        return True
    return None


def pytest_report_header(config):
    return (f"normkit {normkit.__version__} from {os.path.dirname(normkit.__file__)}, "
            f"torch {torch.__version__}, numpy {np.__version__}, "
            f"{normkit.num_threads()} threads")


def pytest_runtest_logreport(report):
    if report.skipped or getattr(report, "wasxfail", None) is not None:
        _not_run.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and (_not_run or session.testscollected == 0):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _not_collected:
        terminalreporter.write_line(
            f"not collected: this build has no normkit.torch extension (clang): "
            f"{', '.join(sorted(_not_collected))}")
    if _not_run:
        terminalreporter.write_line(
            f"FAILED: {len(_not_run)} test(s) skipped or xfailed; every test must run:",
            red=True)
        for nodeid in _not_run:
            terminalreporter.write_line(f"  {nodeid}", red=True)


@pytest.fixture
def rng(request):
    # A generator per test, seeded by the test's name: reruns and -k subsets see the same data.
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _restore_threads():
    # Tests that change the thread count must not change it for the tests after them.
    before = normkit.num_threads()
    yield
    normkit.set_num_threads(before)
