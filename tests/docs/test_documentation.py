"""The documentation test: every fenced code block of README.md and docs/*.md runs as written,
so that an example can never rot. The rules (also at the top of README.md's source and in
docs/documentation-tests.md):

- Blocks run in the order of their file, in one scratch directory per file, which holds a
  link `build` to the build directory, links to the source tree's top-level entries (read
  them, do not write them) and an installed copy of normkit in `prefix/` (the CMake package).
- ```sh      a bash script (set -euo pipefail); `build/normkit` is the command.
- ```python  a program for /usr/bin/python3 with PYTHONPATH=build/python (as the README says).
- ```cpp     a complete program (with main), built against the installed package
             (find_package(normkit), normkit::normkit and normkit::engine) and run.
- ```cmake   a CMakeLists.txt, configured and built against the installed package; each source
             file it names is a stub that includes normkit's headers.
- ```json    must parse.  ```text  is output or notation: not run.
- Any other tag, or none, fails: code must say what it is.
- Before a block, `<!-- doc-test: skip: REASON -->` leaves it out (only for `make` targets:
  `make test` runs this test, `make demo` trains for minutes), and `<!-- doc-test: instead:
  COMMANDS -->` runs COMMANDS (bash) in its place: a cheaper equivalent of a long command,
  which the visible text must call long.

Keep examples cheap (--limit-train, --epochs 1 or 2): the whole test should take a minute or
two. Set NORMKIT_DOC_FILE=README.md to run one file; NORMKIT_DOC_KEEP=1 keeps the scratch
directories.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SOURCE = Path(os.environ.get("NORMKIT_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD = Path(os.environ.get("NORMKIT_BUILD_DIR", SOURCE / "build"))
CMAKE = os.environ.get("NORMKIT_CMAKE", "cmake")
TIMEOUT = 600  # per block
LANGUAGES = {"sh", "python", "cpp", "cmake", "json", "text"}
MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|instead)\s*:\s*(.*?)-->", re.S)


def documents():
    files = [SOURCE / "README.md"] + sorted((SOURCE / "docs").glob("**/*.md"))
    only = os.environ.get("NORMKIT_DOC_FILE")
    return [f for f in files if not only or f.relative_to(SOURCE).as_posix() == only]


def blocks(path):
    """(line, language, code, marker) for every fenced block; marker is (kind, text) of a
    doc-test comment right before the block (blank lines between are fine)."""
    text = path.read_text()
    out = []
    fence = re.compile(r"^(```+|~~~+)[ \t]*([^\s`]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
    for match in fence.finditer(text):
        before = text[:match.start()].rstrip()
        marker = None
        if before.endswith("-->"):
            start = before.rfind("<!--")
            found = MARKER.fullmatch(before[start:]) if start >= 0 else None
            if found:
                marker = (found.group(1), found.group(2).strip())
        line = text.count("\n", 0, match.start()) + 1
        out.append((line, match.group(2).lower(), match.group(3), marker))
    return out


def run(command, cwd, env=None, what="", input_text=None):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT, input=input_text)
    assert result.returncode == 0, (
        f"{what} failed (exit {result.returncode})\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def prefix(tmp_path_factory):
    """normkit installed as a user would install it (the CMake package)."""
    directory = tmp_path_factory.mktemp("prefix")
    run([CMAKE, "--install", str(BUILD), "--prefix", str(directory)], cwd=directory, what="cmake --install")
    return directory


def scratch_for(path, prefix):
    directory = Path(tempfile.mkdtemp(prefix="doc-" + path.stem + "-"))
    (directory / "build").symlink_to(BUILD)
    (directory / "prefix").symlink_to(prefix)
    for entry in SOURCE.iterdir():
        if entry.name not in ("build", "prefix", "runs") and not entry.name.startswith("."):
            (directory / entry.name).symlink_to(entry)
    return directory


def environment():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the blocks set what they need, as a reader would
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


CPP_PROJECT = """cmake_minimum_required(VERSION 3.25)
project(doc_snippets LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 20)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
find_package(normkit REQUIRED)
"""
STUB = "#include <normkit/normkit.hpp>\n#include <normkit/engine/nn.hpp>\nint main() { return 0; }\n"


def build_project(directory, prefix, what):
    """Configures and builds the CMake project in `directory` against the installed package."""
    run([CMAKE, "-S", str(directory), "-B", str(directory / "out"), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"], cwd=directory, what=what + ": configure")
    run([CMAKE, "--build", str(directory / "out"), "-j", "2"], cwd=directory, what=what + ": build")


def check_document(path, prefix):
    name = path.relative_to(SOURCE).as_posix()
    found = blocks(path)
    scratch = scratch_for(path, prefix)
    env = environment()
    try:
        # C++ programs first, all in one project (one configure, parallel compiles); they
        # run in their place in the order below.
        cpp = [(line, code) for line, language, code, marker in found if language == "cpp" and not marker]
        executables = {}
        if cpp:
            project = scratch / "cpp-snippets"
            project.mkdir()
            cmake = CPP_PROJECT
            for line, code in cpp:
                target = f"snippet_line_{line}"
                (project / f"{target}.cpp").write_text(code)
                cmake += (f"add_executable({target} {target}.cpp)\n"
                          f"target_link_libraries({target} PRIVATE normkit::normkit normkit::engine)\n")
                executables[line] = project / "out" / target
            (project / "CMakeLists.txt").write_text(cmake)
            build_project(project, prefix, f"{name}: the C++ blocks")
        for line, language, code, marker in found:
            what = f"{name}, the {language or 'untagged'} block at line {line}"
            assert language in LANGUAGES, (
                f"{what}: every code block needs one of the tags {sorted(LANGUAGES)} "
                "(tests/docs/test_documentation.py says what each means)")
            if marker and marker[0] == "skip":
                commands = [c for c in code.splitlines() if c.strip() and not c.strip().startswith("#")]
                assert marker[1], f"{what}: 'doc-test: skip:' needs a reason"
                assert all(c.split("#")[0].strip().startswith("make ") for c in commands), (
                    f"{what}: only `make` targets may be skipped; give a cheaper equivalent with "
                    "'doc-test: instead:' and call the command long in the text")
                continue
            if marker and marker[0] == "instead":
                run(["bash", "-euo", "pipefail", "-c", marker[1]], scratch, env, what + " (its stand-in)")
                continue
            if language == "sh":
                run(["bash", "-euo", "pipefail", "-c", code], scratch, env, what, input_text="")
            elif language == "python":
                script = scratch / f"block_line_{line}.py"
                script.write_text(code)
                run(["/usr/bin/python3", script.name], scratch, dict(env, PYTHONPATH="build/python"), what)
            elif language == "cpp":
                run([str(executables[line])], scratch, env, what)
            elif language == "cmake":
                project = scratch / f"cmake-line-{line}"
                project.mkdir()
                (project / "CMakeLists.txt").write_text(code)
                for source in set(re.findall(r"[\w./-]+\.(?:cpp|cc|cxx)\b", code)):
                    (project / source).parent.mkdir(parents=True, exist_ok=True)
                    (project / source).write_text(STUB)
                build_project(project, prefix, what)
            elif language == "json":
                try:
                    json.loads(code)
                except json.JSONDecodeError as e:
                    pytest.fail(f"{what}: not JSON ({e})")
    finally:
        if not os.environ.get("NORMKIT_DOC_KEEP"):
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"{name}: scratch directory {scratch}", file=sys.stderr)


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.relative_to(SOURCE).as_posix())
def test_every_block_runs(path, prefix):
    check_document(path, prefix)


def test_the_rules_are_stated_where_examples_are_written():
    readme = (SOURCE / "README.md").read_text()
    assert readme.startswith("<!--") and "tests/docs/test_documentation.py" in readme.split("-->")[0]
    assert "tests/docs/test_documentation.py" in (SOURCE / "docs" / "documentation-tests.md").read_text()


def test_the_block_reader(tmp_path):
    """The parser finds what the runner relies on: tags, markers, line numbers."""
    page = (tmp_path / "page").with_suffix(".md")  # a scratch page
    page.write_text("# t\n\n```sh\necho 1\n```\n\n<!-- doc-test: skip: slow -->\n\n```sh\nmake demo\n```\n"
                    "<!-- doc-test: instead: echo cheap\n -->\n```sh\nlong --command\n```\n"
                    "```\nuntagged\n```\n````python\nprint('```')\n````\n")
    got = [(line, language, code, marker) for line, language, code, marker in blocks(page)]
    assert got == [(3, "sh", "echo 1\n", None),
                   (9, "sh", "make demo\n", ("skip", "slow")),
                   (14, "sh", "long --command\n", ("instead", "echo cheap")),
                   (17, "", "untagged\n", None),
                   (20, "python", "print('```')\n", None)]
