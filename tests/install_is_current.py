"""Exit 0 when this checkout is the installed, current imgaug_gen: `make install` reinstalls otherwise.

Current means: the dependencies are installed, `imgaug_gen` is imported from this checkout, and the installed entry
points and console scripts are exactly the ones pyproject.toml declares (a stale editable install keeps the
entry points of the pyproject it was made from)."""

import importlib.util
import os
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "torch torchvision pytorch_lightning diffusers transformers peft torchmetrics torch_fidelity albumentations hydra "
    "sklearn pytest xdist nbclient importlinter prdc datasets pyarrow webdataset submitit mkdocs material "
    "mkdocstrings_handlers.python"
).split()


def problems():
    for name in MODULES:  # installed (found without importing: importing them all costs more than the lint stage)
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError as e:
            found, why = False, e
        else:
            why = "not installed"
        if not found:
            yield f"{name} is not importable: {why}"
    if shutil.which("ruff") is None:
        yield "ruff is not on PATH"
    try:
        import imgaug_gen
    except ImportError as e:
        yield f"imgaug_gen does not import: {e}"
        return
    if not os.path.samefile(Path(imgaug_gen.__file__).parent.parent, ROOT):
        yield f"imgaug_gen is imported from {imgaug_gen.__file__}, not from {ROOT}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = dict(project.get("entry-points", {}), console_scripts=project.get("scripts", {}))
    for group, wanted in declared.items():
        installed = {ep.name: ep.value for ep in entry_points(group=group)}
        for name, value in wanted.items():
            if installed.get(name) != value:
                yield f"entry point {group}:{name} is {installed.get(name)!r}, pyproject.toml says {value!r}"


if __name__ == "__main__":
    found = list(problems())
    for p in found:
        print(p, file=sys.stderr)
    sys.exit(1 if found else 0)
