"""The predictor: a patient's CT -> perfusion map and functional volumes in the CT's geometry.

Checkpoints carry the network and preprocessing configs (``CTPMModule.on_save_checkpoint``), so a
checkpoint file is all it takes. Several checkpoints (the fold models) are averaged and their
standard deviation is written as an uncertainty map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch

from ctpm.data.io import DESCRIPTIONS, save_nifti
from ctpm.data.manifest import check_patient_id
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.record import PatientRecord, restore, to_ct
from ctpm.data.transforms import PreprocessConfig
from ctpm.errors import CtpmError, first_line
from ctpm.lightning.module import load_state_dict_safely, network_weights
from ctpm.models import check_fits

LOW, HIGH = 1, 2  # labels of the functional-volume map


@dataclass
class Prediction:
    patient_id: str
    perfusion: np.ndarray  # CT grid, standardised perfusion (1.0 = normal-functioning lung)
    std: np.ndarray | None  # CT grid, SD over models (and flips)
    functional: np.ndarray  # CT grid, 0 outside the evaluation mask, 1 low, 2 high
    affine: np.ndarray
    lungs: np.ndarray  # CT grid, 1 right, 2 left
    voxel_ml: float

    def volumes_ml(self) -> dict[str, float]:
        return {"low_ml": float((self.functional == LOW).sum() * self.voxel_ml),
                "high_ml": float((self.functional == HIGH).sum() * self.voxel_ml)}


def load_network(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Network (eval mode) and preprocessing config from a ctpm checkpoint, loaded weights-only."""
    ckpt = load_state_dict_safely(path)
    meta = ckpt.get("ctpm") if isinstance(ckpt, dict) else None
    if not meta or not meta.get("net_config"):
        raise CtpmError("not a ctpm checkpoint (no network config inside); use a last.ckpt written by ctpm-train", path=path)
    net = hydra.utils.instantiate(meta["net_config"])
    state = network_weights(ckpt)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CtpmError(f"checkpoint weights do not fit its own network config ({first_line(exc)})", path=path) from None
    net.eval()
    return net, dict(meta.get("preprocessing") or {})


class Predictor:
    def __init__(self, checkpoints: Sequence[str | Path], *, device: str = "auto", flip_tta: bool = False,
                 threshold: float = 0.66, preprocessing: dict | None = None):
        if isinstance(checkpoints, (str, Path)):
            checkpoints = [checkpoints]
        if not checkpoints:
            raise CtpmError("give at least one checkpoint: ckpt=PATH or ckpt=[PATH,PATH]")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.nets, configs = [], []
        for c in checkpoints:
            net, prep = load_network(c)
            self.nets.append(net.to(self.device))
            configs.append(prep)
        first = PreprocessConfig.from_any(configs[0]).to_dict()
        for c, prep in zip(checkpoints[1:], configs[1:]):
            if PreprocessConfig.from_any(prep).to_dict() != first:
                raise CtpmError("checkpoints were trained with different preprocessing (roi_size, spacing ...); "
                                "average only models of one experiment", path=c)
        merged = dict(configs[0])
        merged.update(preprocessing or {})  # e.g. another lung backend at prediction time
        self.cfg = PreprocessConfig.from_any(merged)
        for c, net in zip(checkpoints, self.nets):
            try:
                check_fits(net, self.cfg.roi_size, 1 + len(self.cfg.context_channels))
            except CtpmError as err:
                raise err.with_context(path=c) from None
        self.flip_tta, self.threshold = flip_tta, threshold

    @torch.no_grad()
    def roi_maps(self, pre: PatientRecord) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Mean and SD over models (and the left-right flip) of each ROI's prediction (each lung's,
        or the thorax's)."""
        # the enhanced CT and the context channels the preprocessing made: what training gave the network
        ct = torch.from_numpy(pre.network_input()).to(self.device)
        lung = torch.from_numpy(pre.lung[:, None].astype(np.float32)).to(self.device)
        outs = []
        for net in self.nets:
            outs.append(net(ct, lung).float())
            if self.flip_tta:  # W is the left-right axis of the ROI
                outs.append(torch.flip(net(torch.flip(ct, [-1]), torch.flip(lung, [-1])), [-1]).float())
        stack = torch.stack(outs)[:, :, 0].cpu().numpy()  # (models, sides, D, H, W)
        mean = {s: stack[:, i].mean(0) for i, s in enumerate(pre.sides)}
        std = {s: stack[:, i].std(0) for i, s in enumerate(pre.sides)} if len(outs) > 1 else None
        return mean, std

    def predict(self, patient: dict) -> Prediction:
        """patient: {"patient_id", "ct", optional "lung_mask"}."""
        rec = preprocess_patient(patient, self.cfg, with_spect=False)
        mean, std = self.roi_maps(rec)
        perf = to_ct(restore(mean, rec), rec)
        sd = to_ct(restore(std, rec), rec) if std is not None else None
        mask = rec.ct_mask
        functional = mask.astype(np.uint8)  # LOW in the evaluated lung ...
        functional += mask & (perf >= self.threshold)  # ... HIGH at or above the threshold
        return Prediction(rec.patient_id, perf, sd, functional, rec.ct_grid.affine, rec.ct_lungs, rec.ct_grid.voxel_ml)


def write_prediction(pred: Prediction, out: Path) -> dict[str, Path]:
    """<id>.nii.gz (perfusion), <id>_functional.nii.gz (1 low, 2 high), <id>_lungs.nii.gz (1 right,
    2 left: the lungs the maps were made in, e.g. for ctpm-flart) and <id>_std.nii.gz, in the CT's
    geometry; the header's descrip says which map a file is (``ctpm.data.io.DESCRIPTIONS``).

    The files are written by parallel threads: zlib compresses without holding the GIL, so on 2
    cores the compression of the float map overlaps that of the label maps."""
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True, exist_ok=True)
    pid = check_patient_id(pred.patient_id)
    jobs = {
        "perfusion": (pred.perfusion, f"{pid}.nii.gz", np.float32),
        "functional": (pred.functional, f"{pid}_functional.nii.gz", np.uint8),
        "lungs": (pred.lungs, f"{pid}_lungs.nii.gz", np.uint8),
    }
    if pred.std is not None:
        jobs["std"] = (pred.std, f"{pid}_std.nii.gz", np.float32)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(save_nifti, array, pred.affine, out / name, dtype, description=DESCRIPTIONS[key],
                                    patient=pid)
                   for key, (array, name, dtype) in jobs.items()}
        return {key: f.result() for key, f in futures.items()}
