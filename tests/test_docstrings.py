"""The examples in the package's docstrings run as written (``>>>`` lines, checked with :mod:`doctest`)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import posepriors

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(posepriors.__path__, prefix="posepriors.")
    if name not in ("posepriors.plots",)  # matplotlib is optional; plots.py has no examples
)


def test_every_module_is_collected():
    assert {"posepriors.skeleton", "posepriors.priors.base", "posepriors.train"} <= set(MODULES)


@pytest.mark.parametrize("name", ["posepriors", *MODULES])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, name) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see above)"


def test_the_package_docstring_has_a_runnable_example():
    tests = doctest.DocTestFinder().find(posepriors, "posepriors")
    assert sum(len(t.examples) for t in tests if t.name == "posepriors") >= 3


def test_the_package_ships_its_type_annotations():
    """PEP 561: ``py.typed`` sits in the package and the wheel's package data lists it (type checkers read the
    annotations of an installed posepriors only then)."""
    from pathlib import Path

    root = Path(posepriors.__file__).parent
    assert (root / "py.typed").is_file()
    lines = (root.parent / "pyproject.toml").read_text().splitlines()
    data = lines[lines.index("[tool.setuptools.package-data]") + 1]
    assert data.startswith("posepriors = [") and '"py.typed"' in data


def test_submodules_are_attributes_of_the_package():
    """``posepriors.fitting.fit_keypoints`` works after a bare ``import posepriors`` (a fresh process)."""
    import subprocess
    import sys

    code = (
        "import sys, posepriors\n"
        "assert 'posepriors.fitting' not in sys.modules\n"
        "print(posepriors.fitting.fit_keypoints.__name__, posepriors.kinematics.__name__, posepriors.data.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["fit_keypoints", "posepriors.kinematics", "posepriors.data"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        posepriors.nothing  # noqa: B018
