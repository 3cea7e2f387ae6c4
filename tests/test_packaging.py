"""Packaging: every module the app imports is a declared dependency, and the Docker image's
requirements are generated from pyproject.toml, never copied by hand."""

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("common", "server_app", "client_app", "fl_dp")


def _declared() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    return {re.split(r"[\[<>=;! ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in dependencies}


def _imported_top_level_modules() -> set[str]:
    names = set()
    for package in APP_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(APP_PACKAGES) - {"__future__"}


def test_every_imported_library_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        provided_by = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if module == "tomli":  # the Python 3.10 fallback of tomllib, declared with its marker
            provided_by = {"tomli"}
        if not provided_by & _declared():
            missing[module] = sorted(provided_by)
    assert not missing, f"imported but not declared in pyproject.toml [project] dependencies: {missing}"


def test_the_image_requirements_are_generated_from_pyproject():
    spec = importlib.util.spec_from_file_location("docker_requirements", ROOT / "scripts" / "docker_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docker" / "requirements.txt").read_text() == module.image_requirements(), (
        "docker/requirements.txt is stale: run python scripts/docker_requirements.py"
    )
    pins = [line for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert "flwr[dp]==1.41.0" in pins and not any("simulation" in pin for pin in pins)  # no Ray in the image
