"""The Hydra configs of the ctpm commands: the folder conf/ at the top of the repository (design
card), installed as the package ``ctpm.conf`` so that a wheel carries them."""

from importlib import resources
from pathlib import Path


def conf_dir() -> str:
    """The config folder on disk (Hydra's config_path / initialize_config_dir want a directory)."""
    return str(Path(str(resources.files(__name__).joinpath("train.yaml"))).parent)
