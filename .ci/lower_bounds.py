"""Print a pip constraints file that pins every direct requirement of pyproject.toml
at its lower bound: `python .ci/lower_bounds.py ".[test]"` -> lines `name==version`.

Used by `.ci/setup --oldest`, so the oldest versions the project admits are the ones
tested. A requirement without a lower bound is an error: it cannot be tested."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
extras = re.findall(r"[\w-]+", sys.argv[1].partition("[")[2]) if len(sys.argv) > 1 else []
requirements = list(project["dependencies"])
for extra in extras:
    requirements += project["optional-dependencies"][extra]
pins = {}
for req in requirements:
    spec = req.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
    low = re.search(r"(?:>=|==|~=)\s*([\w.]+)", spec)
    if low is None:
        sys.exit(f"pyproject.toml: {req!r} has no lower bound (>=, == or ~=), so its oldest version cannot be tested")
    pins[name] = low.group(1)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
