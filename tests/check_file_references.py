"""Every repository file that a doc or a comment names must exist.

Run as the ctest `file_references` (tests/CMakeLists.txt), or by hand:
    /usr/bin/python3 tests/check_file_references.py [repository root]

It reads the repository's own text files (git ls-files; without git, every
file outside build trees) and collects the names of files they mention:
`src/cpu/leaf_loops.hpp`, `kernels/batch_norm.hpp`, `leaf_loops.hpp`. A name
with a directory must resolve from the repository root, from the mentioning
file's folder, or (when it does not start with a top-level folder) from an
include root (src/, src/engine/, include/, include/normkit/, tests/cpp/); a
bare file name must be the name of some file in the repository. Not checked,
so that nothing outside the repository is reported: build outputs (build/,
runs/, <build>, ${...}), absolute paths, URLs, #include lines (the compiler
checks them), and the short list below of files that are named on purpose but
live elsewhere. Exits 1 and lists every missing name with the lines that
mention it.
"""
import os
import re
import subprocess
import sys

TEXT_SUFFIXES = (".cpp", ".hpp", ".h", ".py", ".md", ".txt", ".cmake", ".in", ".sh")
TEXT_NAMES = ("Makefile", "run")
# A file name: word characters, dots and dashes, optionally after folders, with
# an extension this repository uses for its own files.
NAME = re.compile(
    r"(?<![\w./$<{-])((?:[\w.-]+/)*[\w-]+(?:\.[\w-]+)*\.(?:cpp|hpp|py|md|cmake|sh|txt|in))\b")
INCLUDE_ROOTS = ("src", "src/engine", "include", "include/normkit", "tests/cpp")
SKIP_PREFIXES = ("build/", "build-", "runs/", "/", "http", "<", "$", "~")
# Files that are named on purpose but are not in the repository: written by the
# build (from cmake/*.in), written by a run of the CLI, or other projects'.
NOT_IN_REPOSITORY = {
    "version.hpp", "normkitConfig.cmake", "normkitConfigVersion.cmake",  # the build
    "report.md", "LAB.md",                                               # normkit compare, lab
    "classes.txt",                                         # an IDX dataset's class names
    "TorchConfig.cmake", "dnnl-config.cmake", "dnnl.hpp",                # other projects
    "batchnorm.md", "plot_scaling_importance.py",  # sources the lab cites (docs/lab/LAB.md)
}
IGNORED_FILES = {"tests/golden/before.txt"}


def repository_files(root):
    try:
        out = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True,
                             check=True).stdout
        return [line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith((".", "build", "runs", "__pycache__"))]
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names]
        return files


def is_text(path):
    return path.endswith(TEXT_SUFFIXES) or os.path.basename(path) in TEXT_NAMES


def mentioned_names(line):
    if re.match(r"\s*#\s*include\b", line):  # the compiler checks those
        return []
    return [m.group(1) for m in NAME.finditer(line)]


def exists(name, mentioning_file, root, basenames):
    if name.startswith(SKIP_PREFIXES) or os.path.basename(name) in NOT_IN_REPOSITORY:
        return True
    if "/" not in name:
        return name in basenames
    # From the root or the mentioning file's folder; a path that does not start
    # with a top-level folder may also be an include path ("core/check.hpp").
    bases = ["", os.path.dirname(mentioning_file)]
    if not os.path.isdir(os.path.join(root, name.split("/")[0])):
        bases += INCLUDE_ROOTS
    return any(os.path.isfile(os.path.join(root, base, name)) for base in bases)


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                           os.path.join(os.path.dirname(__file__), ".."))
    files = repository_files(root)
    basenames = {os.path.basename(f) for f in files}
    missing = {}
    for path in files:
        if path in IGNORED_FILES or not is_text(path):
            continue
        try:
            with open(os.path.join(root, path), encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError):
            continue
        for number, line in enumerate(lines, 1):
            for name in mentioned_names(line):
                if not exists(name, path, root, basenames):
                    missing.setdefault(name, []).append(f"{path}:{number}")
    for name, places in sorted(missing.items()):
        print(f"{name}: no such file, named in {', '.join(places)}")
    if missing:
        print(f"{len(missing)} file name(s) in docs and comments name no file of the repository")
        return 1
    print(f"file references: {len(files)} files read, every named repository file exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
