"""The package stands on its own: lean core imports, the data inside the wheel, files others can read."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_model
from peft import get_peft_model

import peft_lofit
from peft_lofit import LoFiTConfig
from peft_lofit.checkpoint import save_adapter
from peft_lofit.io import atomic_write_json
from peft_lofit.training.heads import HeadSelection

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = ("trl", "datasets", "gguf", "matplotlib")  # accelerate, huggingface_hub, tqdm come with peft itself

BLOCK_OPTIONAL_IMPORTS = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PIPELINE_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)


def test_the_tuner_works_without_the_pipeline_extras(tmp_path):
    code = (
        BLOCK_OPTIONAL_IMPORTS
        + f"""
import torch
from conftest import tiny_model
from peft import PeftModel, get_peft_model
import peft_lofit
from peft_lofit import LoFiTConfig
inputs = torch.randint(3, 64, (2, 5))
model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1], [1, 2]], init_weights=False)).eval()
with torch.no_grad():
    expected = model(inputs).logits
model.save_pretrained({str(tmp_path / "adapter")!r})
loaded = PeftModel.from_pretrained(tiny_model("llama"), {str(tmp_path / "adapter")!r}).eval()
merged = loaded.merge_and_unload()
with torch.no_grad():
    torch.testing.assert_close(merged(inputs).logits, expected, atol=1e-5, rtol=1e-5)
assert not set({PIPELINE_ONLY!r}) & set(sys.modules), sorted(set({PIPELINE_ONLY!r}) & set(sys.modules))
print("ok")
"""
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    code = BLOCK_OPTIONAL_IMPORTS + "from peft_lofit.app import cli\nraise SystemExit(cli.main(['localize']))"
    result = run_python(code, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "lofit: error: Training (localize, train_adapter, lofit) needs the package 'datasets', which is not installed: "
        'pip install "peft_lofit[train]"'
    )


def test_the_wheel_ships_every_data_file(tmp_path):
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the working tree
    shutil.copytree(ROOT / "peft_lofit", source / "peft_lofit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)]
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("peft_lofit-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if "/data/" in name}
    data = Path(peft_lofit.__file__).parent / "data"
    expected = {f"peft_lofit/data/{path.relative_to(data).as_posix()}" for path in data.rglob("*") if path.is_file()}
    assert expected and expected == shipped


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_are_readable_like_a_plain_save(tmp_path, umask_022):
    """Folders as save_pretrained's (0755 under umask 022), files 0644, the weights too (safetensors alone writes
    0600, which nobody else on a shared machine or in a container image can read)."""
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1]]))
    model.save_pretrained(tmp_path / "plain")
    folder = save_adapter(model, tmp_path / "atomic")
    assert mode(folder) == mode(tmp_path / "plain") == 0o755
    assert {path.name: mode(path) for path in folder.iterdir()} == {
        "adapter_config.json": 0o644,
        "adapter_model.safetensors": 0o644,
        "README.md": 0o644,
    }
    assert mode(atomic_write_json(tmp_path / "metrics.json", {"a": 1})) == 0o644
    assert mode(HeadSelection(scores=[[0.1, 0.2]]).save(tmp_path / "heads.json")) == 0o644


SUPPORT = {"io", "checkpoint", "extras", "distributed", "timing", "markdown"}  # shared helpers at the top level
# part of the package -> the parts its modules may import (app, the application, may import everything)
MAY_IMPORT = {
    "tuner": {"tuner"},
    "support": {"support"},
    "training": {"tuner", "support", "training"},
    "baselines": {"tuner", "support", "training"},
    "localize": {"training"},  # the public re-export of step 1
}


def part_of(module: str) -> str:
    """``peft_lofit.training.heads`` -> ``training``; top-level helpers are ``support``."""
    first = module.split(".")[1] if "." in module else ""
    return "support" if first in SUPPORT else first


def peft_lofit_imports(path: Path) -> list[str]:
    """The peft_lofit modules a file imports, relative imports resolved."""
    root = Path(peft_lofit.__file__).parent.parent
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # the package the file is in (for __init__.py the package itself)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                found.append(".".join(base + [node.module]))
            else:  # "from .. import app": the names are modules
                found += [".".join(base + [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peft_lofit"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("peft_lofit")]
    return found


def test_imports_go_one_way_tuner_then_training_then_application():
    """The tuner imports only itself (it could be copied to peft/tuners/lofit); training imports the tuner and the
    shared helpers; only the application (peft_lofit.app) may import everything."""
    package = Path(peft_lofit.__file__).parent
    wrong = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        part = part_of(module)
        if part in ("app", "__init__", "__main__"):
            continue
        for target in peft_lofit_imports(path):
            assert part in MAY_IMPORT, f"{module}: a new part of the package; say what it may import in MAY_IMPORT"
            if target != "peft_lofit" and part_of(target) not in MAY_IMPORT[part]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []
    tuner = package / "tuner"
    assert {path.stem for path in tuner.glob("*.py")} >= {
        "config",
        "layer",
        "model",
        "architectures",
        "merging",
        "compat",
    }
