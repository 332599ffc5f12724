"""Print the project's dependencies as requirements with their pyproject bounds, torch and torchvision left
out (they stay the installed build): what `make test-latest` upgrades to the newest allowed versions."""

import sys
from pathlib import Path

import tomllib

KEEP = {"torch", "torchvision"}
project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = req.split(";")[0].split("[")[0]
    for sep in "<>=!~ ":
        name = name.split(sep)[0]
    if name.lower() not in KEEP:
        sys.stdout.write(req + "\n")
