"""Print the requirements of clipforge extras, one per line, read from pyproject.toml.

The images install their dependencies in layers shared between stages (`python3 deps.py download`
and so on) before the source is copied in, so pyproject.toml stays the one list of what each stage
needs and a source change rebuilds only the thin top layers.
"""

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path("pyproject.toml")  # run from the folder holding it: the repository root or /opt/clipforge


def requirements(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional = project["optional-dependencies"]
    unknown = [e for e in extras if e not in optional and e != "core"]
    if unknown:
        raise SystemExit(f"deps.py: unknown extra(s) {', '.join(unknown)}; known: core, {', '.join(optional)}")
    wanted = list(project["dependencies"]) if "core" in extras else []
    for extra in extras:
        wanted += optional.get(extra, [])
    return list(dict.fromkeys(wanted))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
