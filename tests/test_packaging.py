"""pyproject.toml's dependencies against the code and the environment the tests run in: every
package the code imports is declared, the installed versions (the ones tested) lie inside the
declared ranges, and timm / torchvision stay out (they live in `make interop-env`'s venv)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = ("pipeline", "eval", "jobs", "infra")
# Imported by the code, installed by the declared dependency that the code uses them through.
COMES_WITH = {"botocore": "boto3"}          # boto3 pins its botocore
OPTIONAL = {"transformers"}                 # jobs/demo.py: only when installed (dev extra)


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]
    return [Requirement(r) for r in listed]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    found = set()
    for package in RUNTIME:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - set(RUNTIME)


def test_every_package_the_code_imports_is_declared():
    declared = {canonical(r.name) for r in requirements()}
    dists = packages_distributions()
    missing = []
    for module in sorted(imported_modules() - OPTIONAL):
        names = {canonical(d) for d in dists.get(module, [module])}
        if not names & declared and COMES_WITH.get(module) not in declared:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_the_installed_versions_are_inside_the_declared_ranges():
    outside = []
    for req in requirements() + requirements("dev"):
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            outside.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(Version(installed).base_version, prereleases=True):
            outside.append(f"{req} (installed {installed})")
    assert not outside, outside


def test_the_torch_floor_is_fsdp2s_public_import():
    """FSDP2's `from torch.distributed.fsdp import fully_shard` exists from torch 2.6 on."""
    code = (ROOT / "pipeline").rglob("*.py")
    assert any("from torch.distributed.fsdp import" in p.read_text() and "fully_shard" in
               p.read_text() for p in code)
    torch = next(r for r in requirements() if r.name == "torch")
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0")


def test_ray_is_a_range_not_a_pin_and_timm_is_no_dependency():
    ray = next(r for r in requirements() if r.name == "ray")
    assert ray.specifier.contains("2.60.0") and ray.specifier.contains("2.60.3")
    assert not any(s.operator == "==" for s in ray.specifier)
    every = {canonical(r.name) for r in requirements()}
    for extra in PROJECT["optional-dependencies"]:
        every |= {canonical(r.name) for r in requirements(extra)}
    assert not every & {"timm", "torchvision"}
