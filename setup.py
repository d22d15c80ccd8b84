"""Package discovery (everything else is in pyproject.toml).

setuptools' declarative ``packages.find`` cannot map a folder onto another import name, so the
packages are found here: every package under ``cure_eval/``, and every package under ``plugins/``
installed as ``cure_eval_plugins.*`` (``package-dir`` in pyproject.toml does the mapping).
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["cure_eval", "cure_eval.*"]),
        "cure_eval_plugins",
        *(f"cure_eval_plugins.{name}" for name in find_packages("plugins")),
    ]
)
