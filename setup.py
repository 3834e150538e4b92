"""Package layout only; all metadata lives in pyproject.toml.

The repository keeps the design card's layout: ``qcloop/`` (the package) and ``adapters/``
(edge integrations: microscope readers, controller bridges). ``adapters/`` is installed as
``qcloop_adapters`` so the distribution adds no generic top-level name to site-packages.
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=find_namespace_packages(include=["qcloop", "qcloop.*"])
    + ["qcloop_adapters"]
    + [f"qcloop_adapters.{p}" for p in find_packages("adapters")],
    package_dir={"qcloop_adapters": "adapters"},
)
