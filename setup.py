"""Package list for setuptools (everything else is in pyproject.toml).

conf/ sits at the top of the repository (the design card's layout) and is installed as the package
``ctpm.conf``, so that a wheel carries the YAML the command-line tools compose; pyproject.toml's
package finder cannot add a mapped folder beside the packages it finds.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["ctpm*", "hydra_plugins*"]), "ctpm.conf"],
    package_dir={"ctpm.conf": "conf"},
)
