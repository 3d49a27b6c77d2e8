"""The build phases, one module per `dive-ds` step: calibrate, mine, reconstruct, fit_router, evaluate,
compare (and demo, which runs them in order). Each step module holds the step's entry function and the
logic that is its own; the math it shares lives beside it (affinity, expert_plan, router_math),
the channel statistics in dive_ds/stats.py and the calibration folder's reader in dive_ds/io/calibration.py."""
