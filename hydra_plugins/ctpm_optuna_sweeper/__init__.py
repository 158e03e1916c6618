"""A small Hydra sweeper on a current Optuna.

Hydra's own Optuna sweeper plugin (hydra-optuna-sweeper 1.2/1.3) pins optuna<3, which no longer
installs beside current scientific stacks; this one keeps the same config shape (`direction`,
`n_trials`, `params` in Hydra's sweep syntax) and asks Optuna >= 3 for trials.
"""
