"""Hydra sweeper plugin `hydra/sweeper=ctpm_optuna` (see __init__ for why it exists).

Search space in Hydra's sweep syntax, under hydra.sweeper.params:
    model.optimizer.lr: tag(log, interval(1e-4, 3e-3))   -> suggest_float(log=True)
    model.net.depth: range(3, 5)                         -> suggest_categorical over the range
    model.loss: choice(mse, l1)                          -> suggest_categorical
    trainer.max_epochs: interval(5, 20)                  -> suggest_int (integer bounds)
Every trial is one job of the configured launcher (basic, or SLURM via submitit); the job's return
value (ctpm-train returns `optimized_metric`) is what Optuna optimises. A failed job is told to
Optuna as a failed trial and the sweep goes on. With ``pruner: median`` each job reports its
validation value every epoch (ctpm.lightning.callbacks.OptunaPruning, through a storage the jobs
share: ``storage``, or a journal file in the sweep folder) and stops when Optuna's MedianPruner
prunes it; it is told as a pruned trial. The best trial is written to
<sweep dir>/optimization_results.yaml: its parameters and value, its run folder (`best_run_dir`)
and the final checkpoint that run's provenance.json records (`best_checkpoint`), so that
`ctpm-train experiment=finetune model.init_from=<sweep dir>` starts from the best trial.
"""


import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from ctpm.provenance import SWEEP_RESULTS, read_provenance, relative_to, resolve_in

log = logging.getLogger(__name__)


@dataclass
class CtpmOptunaSweeperConf:
    _target_: str = "hydra_plugins.ctpm_optuna_sweeper.optuna_sweeper.CtpmOptunaSweeper"
    direction: str = "maximize"
    n_trials: int = 20
    n_jobs: int = 1  # trials launched together (parallel with a parallel launcher)
    seed: int | None = None
    sampler: str = "tpe"  # tpe | random
    study_name: str | None = None
    storage: str | None = None  # e.g. sqlite:///optuna.db to resume a study
    # median: prune a trial whose validation value (reported each epoch by the OptunaPruning
    # callback) is below the median of the earlier trials at that epoch; none: no pruning
    pruner: str = "none"
    pruner_startup_trials: int = 3  # trials run to the end before any is pruned
    pruner_warmup_epochs: int = 1  # epochs of each trial before it can be pruned
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="ctpm_optuna", node=CtpmOptunaSweeperConf, provider="ctpm")


def suggest(trial, name: str, override: Override) -> Any:
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        choices = list(override.sweep_iterator(transformer=lambda x: x))
        return trial.suggest_categorical(name, choices)
    if isinstance(sweep, RangeSweep):
        return trial.suggest_categorical(name, list(override.sweep_iterator()))
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        lo, hi = sweep.start, sweep.end
        if isinstance(lo, int) and isinstance(hi, int):
            return trial.suggest_int(name, lo, hi, log=log_scale)
        return trial.suggest_float(name, float(lo), float(hi), log=log_scale)
    raise ValueError(f"{name}: not a sweep ({override.input_line})")


def _final_checkpoint(run_dir: str | None) -> str | None:
    """The final checkpoint a trial's run folder records in its provenance.json (None without one)."""
    if run_dir is None:
        return None
    record = read_provenance(run_dir)
    ckpt = resolve_in(run_dir, record.get("checkpoint")) if record else None
    return str(ckpt) if ckpt is not None else None


class CtpmOptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, seed: int | None, sampler: str,
                 study_name: str | None, storage: str | None, params: dict[str, str], pruner: str = "none",
                 pruner_startup_trials: int = 3, pruner_warmup_epochs: int = 1):
        self.direction, self.n_trials, self.n_jobs = direction, int(n_trials), max(1, int(n_jobs))
        self.seed, self.sampler_name, self.study_name, self.storage = seed, sampler, study_name, storage
        self.params = dict(params or {})
        if pruner not in ("none", "median"):
            raise ValueError(f"hydra.sweeper.pruner must be none or median, not {pruner!r}")
        self.pruner_name, self.startup, self.warmup = pruner, int(pruner_startup_trials), int(pruner_warmup_epochs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = config.hydra.sweep.dir

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        parser = OverridesParser.create()
        given = parser.parse_overrides(arguments)
        fixed = [o.input_line for o in given if not o.is_sweep_override()]
        space = {o.get_key_element(): o for o in given if o.is_sweep_override()}
        searched = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()])
        space.update({o.get_key_element(): o for o in searched})
        if not space:
            raise ValueError("hydra.sweeper.params is empty: nothing to search")
        sampler = (optuna.samplers.RandomSampler(seed=self.seed) if self.sampler_name == "random"
                   else optuna.samplers.TPESampler(seed=self.seed))
        pruner = optuna.pruners.NopPruner()
        storage_spec = self.storage
        if self.pruner_name == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=self.startup, n_warmup_steps=self.warmup)
            # the trials' jobs report to the study from their own processes: a storage they share
            storage_spec = storage_spec or str(Path(self.sweep_dir).absolute() / "optuna.journal")
            Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        from ctpm.lightning.callbacks import open_optuna_storage

        storage = open_optuna_storage(storage_spec) if storage_spec else None
        study = optuna.create_study(direction=self.direction, sampler=sampler, study_name=self.study_name,
                                    storage=storage, pruner=pruner, load_if_exists=storage is not None)
        log.info("Optuna study: %d trials, %s, space %s", self.n_trials, self.direction, sorted(space))
        run_dirs: dict[int, str] = {}
        done = 0
        while done < self.n_trials:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [tuple(fixed + [f"{k}={suggest(t, k, o)}" for k, o in space.items()]
                           + self._trial_overrides(t, study, storage_spec)) for t in trials]
            results = self.launcher.launch(batch, initial_job_idx=done)
            for trial, ret in zip(trials, results):
                try:
                    value = float(ret.return_value)
                except optuna.TrialPruned as exc:
                    log.info("trial %d pruned: %s", trial.number, exc)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                except Exception as exc:  # noqa: BLE001 - a failed job is a failed trial
                    log.warning("trial %d failed: %s", trial.number, exc)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                study.tell(trial, value)
                if ret.hydra_cfg is not None:
                    run_dirs[trial.number] = str(ret.hydra_cfg.hydra.runtime.output_dir)
            done += len(trials)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise RuntimeError("no trial of the sweep completed")
        best = study.best_trial
        sweep_dir = Path(self.sweep_dir)
        run_dir = run_dirs.get(best.number)
        results_cfg = OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value,
                                        "best_trial": best.number, "n_complete": len(complete),
                                        "n_trials": len(study.trials),
                                        "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED
                                                        for t in study.trials),
                                        "best_run_dir": relative_to(sweep_dir, run_dir),
                                        "best_checkpoint": relative_to(sweep_dir, _final_checkpoint(run_dir))})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(results_cfg, sweep_dir / SWEEP_RESULTS)
        log.info("best trial %d: %s = %.4f", best.number, best.params, best.value)

    def _trial_overrides(self, trial, study, storage_spec: str | None) -> list[str]:
        """What a trial's job needs to report to its trial (the OptunaPruning callback)."""
        if self.pruner_name == "none":
            return []
        return [f"++optuna_trial.id={trial._trial_id}", f"++optuna_trial.storage='{storage_spec}'",
                f"++optuna_trial.study='{study.study_name}'", f"++optuna_trial.startup={self.startup}",
                f"++optuna_trial.warmup={self.warmup}"]
