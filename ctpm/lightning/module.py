"""The LightningModule: a CT -> perfusion network trained with a loss inside the lung ROI.

Validation and test log the paper's metrics on the network's own grid (roi_size): voxel-wise
Spearman R and the Dice of high / low functional volumes; the paper's reported numbers are
computed later at 1 mm by ``ctpm-evaluate``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ctpm.errors import CtpmError, first_line
from ctpm.metrics import FunctionalDice, SpearmanR

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": functools.partial(F.mse_loss, reduction="none"),
    "l1": functools.partial(F.l1_loss, reduction="none"),
    "smooth_l1": functools.partial(F.smooth_l1_loss, reduction="none", beta=0.1),
}


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean voxel loss over the mask only (the lung ROI): voxels outside carry no perfusion truth."""
    per_voxel = LOSSES[kind](pred, target)
    m = mask.to(per_voxel.dtype)
    return (per_voxel * m).sum() / m.sum().clamp_min(1.0)


FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # a Gaussian's sigma per unit of FWHM


def gaussian_blur3d(x: torch.Tensor, sigma_voxels: torch.Tensor) -> torch.Tensor:
    """Blur each sample of x (B, C, D, H, W) with its own anisotropic Gaussian, separably, zero
    outside the volume (the camera sees no counts from beyond the ROI's lung).

    sigma_voxels: (B, 3) standard deviations in voxels along D, H, W; a 0 leaves that axis as is.
    Kernels are truncated at 3 sigma and normalised to sum 1 (a sampled Gaussian, as
    scipy.ndimage.gaussian_filter with mode="constant"). Differentiable in x.
    """
    out = []
    for b in range(x.shape[0]):
        y = x[b : b + 1]
        for axis in range(3):
            s = float(sigma_voxels[b, axis])
            if s <= 0:
                continue
            radius = max(1, int(3.0 * s + 0.5))  # scipy.ndimage.gaussian_filter's truncate=3
            t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
            k = torch.exp(-0.5 * (t / s) ** 2)
            k = k / k.sum()
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.numel()
            padding = [0, 0, 0]
            padding[axis] = radius
            c = y.shape[1]
            y = F.conv3d(y, k.view(shape).expand(c, 1, *shape[2:]).contiguous(), padding=tuple(padding), groups=c)
        out.append(y)
    return torch.cat(out, dim=0)


def psf_sigma_voxels(fwhm_mm: torch.Tensor, roi_spacing: torch.Tensor) -> torch.Tensor:
    """(B,) FWHM in mm and (B, 3) ROI voxel sizes in mm -> (B, 3) Gaussian sigmas in ROI voxels."""
    return fwhm_mm.reshape(-1, 1) * FWHM_TO_SIGMA / roi_spacing


def masked_pearson(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) Pearson correlation of pred and target over each sample's masked voxels (differentiable)."""
    m = mask.to(pred.dtype).flatten(1)
    p, t = pred.flatten(1), target.flatten(1)
    n = m.sum(1).clamp_min(1.0)
    pc = (p - (p * m).sum(1, keepdim=True) / n[:, None]) * m
    tc = (t - (t * m).sum(1, keepdim=True) / n[:, None]) * m
    return (pc * tc).sum(1) / ((pc.square().sum(1) * tc.square().sum(1)).sqrt() + eps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of x over each sample's masked voxels."""
    m = mask.to(x.dtype).flatten(1)
    return (x.flatten(1) * m).sum(1) / m.sum(1).clamp_min(1.0)


def check_checkpoint_file(path: str | Path, *, archive: bool = False) -> Path:
    """A checkpoint file that exists and is not empty (and, with `archive`, is a torch zip archive,
    as every checkpoint Lightning writes is: what a resume needs before it starts), else a
    CtpmError naming it."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise CtpmError("checkpoint does not exist", path=path)
    if path.stat().st_size == 0:
        raise CtpmError("the checkpoint file is empty (0 bytes: a save that was cut off?); "
                        "use another checkpoint of the run", path=path)
    if archive and not zipfile.is_zipfile(path):
        raise CtpmError("not a PyTorch checkpoint (not a torch.save zip archive; truncated or another format)", path=path)
    return path


def load_state_dict_safely(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents with ``torch.load(weights_only=True)``: tensors and plain containers
    only, so a crafted pickle cannot run code. Errors name the file."""
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors, truncated zip, refused globals
        raise CtpmError(f"cannot load the checkpoint safely ({type(exc).__name__}: {first_line(exc)})", path=path) from None
    if not isinstance(ckpt, dict):
        raise CtpmError(f"not a checkpoint (it holds a {type(ckpt).__name__}, not a dict of weights)", path=path)
    return ckpt


def network_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights from a Lightning checkpoint (``net.*``) or a bare state dict."""
    state = ckpt.get("state_dict", ckpt)
    if any(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # torch.compile prefix
    return state


class CTPMModule(pl.LightningModule):
    """net(ct, lung) -> perfusion in [0, 1]; loss inside the evaluation mask.

    init_from: a pretrain checkpoint whose network weights (only: not the optimiser) start this
    run, strict about names and shapes; checked here, before training starts.
    freeze_encoder: keep the pretrained encoder fixed (fine-tune the decoder only).
    net_config / preprocessing: JSON of the network's and the preprocessing's configs, stored in every
    checkpoint, so that ``ctpm-predict`` can rebuild both from the checkpoint file alone.

    Loss options (all off by default, which is the paper's masked voxel loss):

    psf: the PSF-aware loss. The network predicts perfusion *before* the camera; the voxel loss
    (and the terms below) compare the prediction blurred by the patient's SPECT point spread
    function with the SPECT. The PSF is a Gaussian of FWHM ``batch["spect_fwhm_mm"]`` (the
    manifest's ``spect_fwhm_mm``; where unknown, ``psf.fwhm_mm``), converted to ROI voxels with
    ``batch["roi_spacing"]`` (a lung's ROI voxel size differs per axis because of the resize; the
    thorax's, roi_mode thorax, is the same on every axis).
    Metrics and predictions stay the unblurred map. ``{enabled: bool, fwhm_mm: float | null}``.
    correlation_weight: adds ``w * (1 - Pearson r)`` over each ROI's masked voxels (a lung's, or
    both lungs' in the thorax's ROI).
    mean_weight: adds ``w * (mean(pred) - mean(target))**2`` over each ROI's mask (the lung's
    density level, which a per-lung standardisation would otherwise leave unconstrained).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: str = "mse",
        threshold: float = 0.66,
        init_from: str | None = None,
        freeze_encoder: bool = False,
        compile: bool = False,
        net_config: str | None = None,
        preprocessing: str | None = None,
        log_images: bool = True,
        psf: dict[str, Any] | None = None,
        correlation_weight: float = 0.0,
        mean_weight: float = 0.0,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise CtpmError(f"model.loss must be one of {', '.join(LOSSES)}, not {loss!r}")
        psf = {str(k): v for k, v in dict(psf or {}).items()}  # a DictConfig from Hydra -> plain values
        unknown = sorted(set(psf) - {"enabled", "fwhm_mm"})
        if unknown:
            raise CtpmError(f"unknown model.psf option(s): {', '.join(unknown)} (enabled, fwhm_mm)")
        self.psf_enabled, self.psf_fwhm_mm = bool(psf.get("enabled", False)), psf.get("fwhm_mm")
        if correlation_weight < 0 or mean_weight < 0:
            raise CtpmError("model.correlation_weight and model.mean_weight must be >= 0")
        self.correlation_weight, self.mean_weight = float(correlation_weight), float(mean_weight)
        # Plain values only in the checkpoint's hyper-parameters (the optimiser and scheduler are
        # partials of classes): checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler", "psf"])
        self.hparams["psf"] = {k: (None if v is None else bool(v) if k == "enabled" else float(v))
                               for k, v in psf.items()}
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.net = net
        self.loss_kind = loss
        if preprocessing:  # the ROIs it will be given: refuse a size or channel count the net cannot take now
            from ctpm.data.transforms import PreprocessConfig
            from ctpm.models import check_fits

            prep = PreprocessConfig.from_any(json.loads(preprocessing))
            check_fits(net, prep.roi_size, 1 + len(prep.context_channels))
        if init_from:
            self.load_pretrained(init_from)
        if freeze_encoder:
            encoder = getattr(net, "encoder", None)
            if encoder is None:
                raise CtpmError(f"freeze_encoder: {type(net).__name__} has no 'encoder' to freeze")
            for p in encoder.parameters():
                p.requires_grad_(False)
        self.val_r, self.val_dice = SpearmanR(), FunctionalDice(threshold=threshold)
        self.test_r, self.test_dice = SpearmanR(), FunctionalDice(threshold=threshold)
        self._panel: dict[str, torch.Tensor] | None = None

    # ---- weights ----
    def load_pretrained(self, path: str | Path) -> None:
        state = network_weights(load_state_dict_safely(path))
        own = self.net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            parts = []
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
            if missing:
                parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
            raise CtpmError(
                "pretrain checkpoint does not fit this network (" + "; ".join(parts) + "); was it trained with another model config?",
                path=path,
            )
        self.net.load_state_dict(state, strict=True)

    def configure_model(self) -> None:
        if self.hparams.compile and not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):  # type: ignore[attr-defined]
            self.net = torch.compile(self.net)

    # ---- steps ----
    def forward(self, ct: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
        return self.net(ct, lung)

    def camera(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The prediction as the SPECT camera would see it (the PSF-aware loss), or as is."""
        if not self.psf_enabled:
            return pred
        n = pred.shape[0]
        fwhm = batch.get("spect_fwhm_mm")
        if fwhm is None:
            fwhm = torch.full((n,), float("nan"), device=pred.device)
        fwhm = fwhm.to(pred.device).float().reshape(n)
        if self.psf_fwhm_mm is not None:
            fwhm = torch.where(torch.isfinite(fwhm), fwhm, torch.full_like(fwhm, float(self.psf_fwhm_mm)))
        if not torch.all(torch.isfinite(fwhm)):
            raise CtpmError("model.psf: the SPECT's FWHM is unknown for some patients (no spect_fwhm_mm in the "
                            "manifest); set model.psf.fwhm_mm to the camera's resolution")
        if "roi_spacing" not in batch:
            raise CtpmError("model.psf needs the ROI voxel size (batch['roi_spacing']) from the dataset")
        return gaussian_blur3d(pred, psf_sigma_voxels(fwhm, batch["roi_spacing"].to(pred.device).float()))

    def objective(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The configured loss of a prediction (B, 1, D, H, W) against batch["spect"] in batch["mask"]."""
        seen = self.camera(pred.float(), batch)
        target, mask = batch["spect"].float(), batch["mask"]
        loss = masked_loss(seen, target, mask, self.loss_kind)
        if self.correlation_weight:
            loss = loss + self.correlation_weight * (1.0 - masked_pearson(seen, target, mask)).mean()
        if self.mean_weight:
            loss = loss + self.mean_weight * (masked_mean(seen, mask) - masked_mean(target, mask)).square().mean()
        return loss

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self(batch["ct"], batch["lung"])
        return pred, self.objective(pred, batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss = self._step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["ct"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred, loss = self._step(batch)
        n = batch["ct"].shape[0]
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.val_r.update(pred.float(), batch["spect"], batch["mask"] > 0)
        self.val_dice.update(pred.float(), batch["spect"], batch["mask"] > 0)
        if batch_idx == 0:
            self._panel = {k: batch[k][0, 0].detach().float().cpu() for k in ("ct", "spect")}
            self._panel["pred"] = pred[0, 0].detach().float().cpu()

    def on_validation_epoch_end(self) -> None:
        dice = self.val_dice.compute()
        self.log("val/spearman_r", self.val_r.compute(), prog_bar=True)
        self.log("val/dice_high", dice["high"])
        self.log("val/dice_low", dice["low"])
        self.val_r.reset()
        self.val_dice.reset()
        if self.hparams.log_images and self._panel is not None and not self.trainer.sanity_checking:
            self._log_panel(self._panel)
        self._panel = None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred, loss = self._step(batch)
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=batch["ct"].shape[0])
        self.test_r.update(pred.float(), batch["spect"], batch["mask"] > 0)
        self.test_dice.update(pred.float(), batch["spect"], batch["mask"] > 0)

    def on_test_epoch_end(self) -> None:
        dice = self.test_dice.compute()
        self.log("test/spearman_r", self.test_r.compute())
        self.log("test/dice_high", dice["high"])
        self.log("test/dice_low", dice["low"])
        self.test_r.reset()
        self.test_dice.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        pred = self(batch["ct"], batch["lung"]).float()
        return {"patient_id": list(batch["patient_id"]), "side": list(batch["side"]), "pred": pred.cpu()}

    # ---- optimisation ----
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- checkpoints carry what prediction needs ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import json

        checkpoint["ctpm"] = {
            "net_config": json.loads(self.hparams.net_config) if self.hparams.net_config else None,
            "preprocessing": json.loads(self.hparams.preprocessing) if self.hparams.preprocessing else None,
        }

    # ---- images ----
    def _log_panel(self, panel: dict[str, torch.Tensor]) -> None:
        """A coronal slice of CT, SPECT and prediction, to the loggers that take images."""
        from ctpm.evaluation.figures import slice_panel

        fig = slice_panel(panel["ct"].numpy(), panel["spect"].numpy(), panel["pred"].numpy())
        for logger in self.loggers:
            try:
                name = type(logger).__name__
                if name == "WandbLogger":
                    import wandb

                    logger.experiment.log({"val/panel": wandb.Image(fig), "epoch": self.current_epoch})
                elif name == "TensorBoardLogger":
                    logger.experiment.add_figure("val/panel", fig, global_step=self.current_epoch)
                elif getattr(logger, "log_dir", None):  # CSV: a PNG beside the metrics
                    out = Path(logger.log_dir) / "panels"
                    out.mkdir(parents=True, exist_ok=True)
                    fig.savefig(out / f"epoch_{self.current_epoch:04d}.png", dpi=80)
            except Exception:  # noqa: BLE001 - an image must never stop training
                pass
        import matplotlib.pyplot as plt

        plt.close(fig)
