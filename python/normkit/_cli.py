"""The `normkit` command of a pip-installed package: the C++ executable shipped in the
package (normkit/bin/normkit, with its data in normkit/share/normkit)."""
import os
import sys


def main():
    executable = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "normkit")
    if not os.access(executable, os.X_OK):
        sys.exit(f"normkit: the command is not part of this installation ({executable} is "
                 "missing); build it with CMake (make build) or pip install the package")
    os.execv(executable, [executable, *sys.argv[1:]])
