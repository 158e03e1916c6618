"""Shared fixtures: a tiny synthetic two-cohort set, its preprocessing cache, the real chest CT."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Small enough for tests on 2 cores: a 4 mm evaluation grid and 32 x 16 x 16 per lung.
TINY_PREPROCESSING = {"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 16, 16]}


def synth_settings() -> dict:
    """presets and physics from conf/synth.yaml (what ctpm-synth uses)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "synth.yaml"), resolve=False)
    return {"presets": cfg["presets"], "physics": cfg["physics"], "cancer_institutions": cfg["cancer_institutions"]}


def real_ct_dir() -> Path | None:
    """The de-identified chest CT of ../shared/data (read-only, never copied into the repo).
    CTPM_REAL_CT points elsewhere when the checkout is not beside ../shared."""
    candidates = [os.environ.get("CTPM_REAL_CT", ""), REPO.parent / "shared/data/real-chest-ct-cptac-c3n-00249/dicom",
                  Path("/work/shared/data/real-chest-ct-cptac-c3n-00249/dicom")]
    for c in candidates:
        if c and Path(c).is_dir() and any(Path(c).glob("*.dcm")):
            return Path(c)
    return None


@pytest.fixture(scope="session")
def real_ct() -> Path:
    path = real_ct_dir()
    if path is None:
        pytest.skip("the real chest CT (../shared/data) is not beside this checkout; set CTPM_REAL_CT")
    return path


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """manifest.csv of 4 non-cancer and 6 cancer patients (3 A, 3 B), tiny preset, seed 0."""
    from ctpm.synth import synthesise

    out = tmp_path_factory.mktemp("cohort")
    return synthesise(out, preset="tiny", n_noncancer=4, n_cancer=6, seed=0, progress=False, **synth_settings())


@pytest.fixture(scope="session")
def tiny_cache(tiny_cohort, tmp_path_factory) -> Path:
    """The tiny cohort preprocessed at TINY_PREPROCESSING."""
    from ctpm.data.cache import PreprocessCache
    from ctpm.data.manifest import load_manifest

    out = tmp_path_factory.mktemp("cache")
    result = PreprocessCache(out, TINY_PREPROCESSING).ensure(load_manifest(tiny_cohort).patients, progress=False)
    assert not result.failed and all(s == "built" for s, _ in result.ok.values()), result
    return out


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A copy of the tiny cache without splits.json: fold splits drawn by a test stay in it."""
    import shutil

    dst = tmp_path / "cache_copy"
    shutil.copytree(tiny_cache, dst)
    (dst / "splits.json").unlink(missing_ok=True)
    return dst


@pytest.fixture(autouse=True)
def _quiet_library_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Setting affine, but the applied meta contains an affine.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
