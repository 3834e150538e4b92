"""Package layout only; all metadata lives in pyproject.toml.

The repository keeps the design card's layout: ``qcloop/`` (the package) and ``adapters/``
(edge integrations: microscope readers, controller bridges). ``adapters/`` is installed as
``qcloop_adapters`` so the distribution adds no generic top-level name to site-packages.

The example configurations (``configs/``), the deployment files (``deploy/``) and the operator
docs (``docs/*.md``) stay where they are in the repository and are installed as package data
under ``qcloop/share/`` (``qcloop/share/configs/default.yaml``, ``qcloop/share/deploy/qcloop.service``,
...); :mod:`qcloop.share` finds them in either place and ``qcloop files`` prints their paths.
"""

from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

#: repository folder -> package that installs it (every sub-folder becomes a sub-package)
SHARED = {"configs": "qcloop.share.configs", "deploy": "qcloop.share.deploy", "docs": "qcloop.share.docs"}
#: which files of each shared folder are installed (docs: the Markdown pages, not the images)
SHARED_FILES = {"configs": ["*.yaml"], "deploy": ["*", ".*"], "docs": ["*.md"]}


def shared_packages() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    packages, dirs, data = [], {}, {}
    for folder, package in SHARED.items():
        dirs[package] = folder
        subdirs = [Path(folder)] + ([p for p in sorted(Path(folder).rglob("*")) if p.is_dir()]
                                    if folder == "deploy" else [])
        for d in subdirs:
            name = ".".join([package, *d.relative_to(folder).parts])
            packages.append(name)
            data[name] = SHARED_FILES[folder]
    return packages, dirs, data


share_packages, share_dirs, share_data = shared_packages()

setup(
    packages=find_namespace_packages(include=["qcloop", "qcloop.*"], exclude=["qcloop.share.*"])
    + ["qcloop_adapters"]
    + [f"qcloop_adapters.{p}" for p in find_packages("adapters")]
    + share_packages,
    package_dir={"qcloop_adapters": "adapters", **share_dirs},
    package_data={"qcloop": ["py.typed", "schemas/*.json"], **share_data},
)
