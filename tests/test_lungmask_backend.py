"""The optional lungmask (R231) backend: a clear message without weights; a real run only where the
package and a local weights file are given (CTPM_LUNGMASK_WEIGHTS) — nothing is downloaded."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from ctpm.data.lungs import segment_lungs
from ctpm.errors import CtpmError


def test_lungmask_without_weights_says_what_to_give(tmp_path):
    ct = np.full((8, 8, 8), -1000.0, np.float32)
    with pytest.raises(CtpmError, match="lungmask_weights"):
        segment_lungs(ct, (1, 1, 1), backend="lungmask", patient="P1")
    with pytest.raises(CtpmError, match="does not exist"):
        segment_lungs(ct, (1, 1, 1), backend="lungmask", patient="P1", lungmask_weights=str(tmp_path / "none.pth"))


def test_unknown_backend():
    with pytest.raises(CtpmError, match="unknown lung segmentation backend"):
        segment_lungs(np.zeros((4, 4, 4), np.float32), (1, 1, 1), backend="magic")


@pytest.mark.skipif(not os.environ.get("CTPM_LUNGMASK_WEIGHTS"), reason="set CTPM_LUNGMASK_WEIGHTS to a local R231 weights file")
def test_lungmask_on_the_real_ct(real_ct):
    pytest.importorskip("lungmask")
    from ctpm.data.io import load_image

    vol = load_image(real_ct, kind="ct")
    img = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    ct = img.get_fdata(dtype=np.float32)
    labels = segment_lungs(ct, img.header.get_zooms()[:3], backend="lungmask", lungmask_weights=os.environ["CTPM_LUNGMASK_WEIGHTS"])
    classical = segment_lungs(ct, img.header.get_zooms()[:3])
    for side in (1, 2):
        a, b = labels == side, classical == side
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9  # the two backends agree on each lung
