"""Print a pip constraints file that pins every direct requirement of pyproject.toml
at the oldest release its lower bound admits: `python .ci/lower_bounds.py ".[test]"`
-> lines `name==version` (asks the package index which releases exist, since a bound
such as ninja>=1.11 names no release of its own).

Used by `.ci/setup --oldest`, so the oldest versions the project admits are the ones
tested. A requirement without a lower bound is an error: it cannot be tested."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from pip._vendor.packaging.version import Version


def oldest_release(name: str, bound: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True,
                         check=True).stdout
    listed = re.search(r"Available versions: (.*)", out)
    releases = [Version(v) for v in listed.group(1).split(", ")] if listed else []
    admitted = [v for v in releases if v >= Version(bound) and not v.is_prerelease and not v.local]
    if not admitted:
        sys.exit(f"no release of {name} >= {bound} on the index")
    return str(min(admitted))


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
    pins[name] = oldest_release(name, low.group(1))
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
