"""A regular (non-editable) install works: the wheel built from this checkout (distribution
`tokenflow-toolkit`) carries every package, every recipe of the top-level recipes/ folder (as
tokenflow_cli/recipes) and every asset file (nested folders included), declares its license as an SPDX
expression without setuptools' deprecation warning, and, installed into a fresh virtual
environment, its `tokenflow` command trains from a folder that is not the repository.

The fresh venv has no pip and no dependencies of its own: a .pth file puts this interpreter's
site-packages (torch, open_clip, ...) after its own, so only tokenflow_cli comes from the wheel.
Everything runs offline (pip --no-index --no-build-isolation, HF_HUB_OFFLINE)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tokenflow_cli"

# found, not imported: importing setuptools here would fight the distutils already loaded
pytestmark = [
    pytest.mark.skipif(os.name == "nt", reason="venv layout (bin/) and console script are POSIX here"),
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("pip", "setuptools")),
                       reason="building the wheel offline needs pip and setuptools in this environment"),
]


def shipped_files() -> list[str]:
    """Data files the package must carry, relative to tokenflow_cli/ in the wheel: recipes/*.yaml
    (from the top-level recipes/ folder) and all of assets/."""
    out = [f"recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")]
    out += [p.relative_to(SOURCE).as_posix() for p in (SOURCE / "assets").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
    return sorted(out)


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in SOURCE.rglob("__init__.py")}
    assert found | {"tokenflow_cli.recipes"} == listed


def run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv dir, venv site-packages, clean env, work dir outside the repo)."""
    root = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "TOKENFLOW_ASSETS", "TOKENFLOW_TOKENIZER", "TOKENFLOW_GENERATOR",
                        "TOKENFLOW_LLAVA", "TOKENFLOW_TEACHER", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENFLOW_HOME=str(root / "home"),
               TORCH_HOME=str(root / "torch_home"), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")

    # Build from a copy of the project: an in-tree build would write build/ and *.egg-info into the
    # checkout, and a stale build/lib there would put deleted files into the wheel.
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(SOURCE, src / "tokenflow_cli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copytree(REPO / "recipes", src / "recipes")
    dist = root / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", dist, src], cwd=root, env=env)
    wheels = list(dist.glob("tokenflow_toolkit-*.whl"))
    assert len(wheels) == 1, built.stdout

    # A fresh venv without pip; this interpreter's site-packages come after its own.
    target = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    python = target / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       cwd=root, env=env).stdout.strip())
    parents = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib")]) if os.path.isdir(p)]
    (purelib / "zz_parent_site_packages.pth").write_text("".join(f"{p}\n" for p in parents))
    # pip is the parent's (via the .pth) but runs as the new interpreter, so it installs there;
    # --ignore-installed: the parent's editable tokenflow-cli is seen but never uninstalled.
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheels[0]], cwd=root, env=env)

    work = root / "work"
    work.mkdir()
    return wheels[0], target, purelib, env, work, built.stdout


def test_wheel_carries_recipes_and_every_asset_and_an_spdx_license(installed):
    wheel, _, _, _, _, build_log = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    expected = shipped_files()
    assert any(f.startswith("recipes/") for f in expected) and any(f.startswith("assets/") for f in expected)
    missing = [f for f in expected if f"tokenflow_cli/{f}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "License-Expression: Apache-2.0" in metadata
    warnings = [line for line in build_log.splitlines() if "licen" in line.lower()
                and ("deprecat" in line.lower() or "warning" in line.lower())]
    assert not warnings, "\n".join(warnings)


def test_installed_cli_trains_from_outside_the_repo(installed):
    _, target, purelib, env, work, _ = installed
    python, tokenflow = target / "bin" / "python", target / "bin" / "tokenflow"
    assert str(python) in "".join(tokenflow.read_text().splitlines()[:3])  # the console script runs the new venv

    # Where the package, its recipes and its assets resolve from, as the installed code sees them.
    probe = (
        "import json, tokenflow_cli\n"
        "from importlib import resources\n"
        "from tokenflow_cli.config import recipe_path\n"
        "from tokenflow_cli.weights import ASSETS_DIR\n"
        "def walk(t, pre=''):\n"
        "    for c in t.iterdir():\n"
        "        yield from walk(c, pre + c.name + '/') if c.is_dir() else [pre + c.name]\n"
        "root = resources.files('tokenflow_cli')\n"
        "files = [f'recipes/{f}' for f in walk(root / 'recipes') if f.endswith('.yaml')]\n"
        "files += [f'assets/{f}' for f in walk(root / 'assets') if '__pycache__' not in f]\n"
        "print(json.dumps({'module': tokenflow_cli.__file__, 'files': sorted(files), 'assets': str(ASSETS_DIR),\n"
        "                  'recipes': [str(recipe_path(n)) for n in ('tiny', 'generator-tiny')]}))\n"
    )
    seen = json.loads(run([python, "-c", probe], cwd=work, env=env).stdout.strip().splitlines()[-1])
    package = purelib / "tokenflow_cli"
    assert Path(seen["module"]) == package / "__init__.py", seen["module"]
    assert Path(seen["assets"]).resolve() == package.resolve() / "assets"
    assert [Path(p) for p in seen["recipes"]] == [package / "recipes" / "tiny.yaml",
                                                  package / "recipes" / "generator-tiny.yaml"]
    assert seen["files"] == shipped_files()

    run([tokenflow, "data", "shapes", "-n", "12", "-o", "shapes"], cwd=work, env=env)
    result = run([tokenflow, "train-tokenizer", "tiny", "--device", "cpu", "-o", "RUN", "--set", "train.steps=1",
                  "--set", "data.train=shapes/images", "--set", "data.val_limit=4", "--set", "train.batch_size=4"],
                 cwd=work, env=env)
    assert "finished step 1" in result.stdout, result.stdout
    assert (work / "RUN" / "model.safetensors").is_file() and (work / "RUN" / "recipe.yaml").is_file()
