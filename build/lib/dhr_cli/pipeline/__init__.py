"""The library functions behind each command (`run_cams`, `run_seed`, `run_propagate`, ...):
they read stores and datasets, call the kernels and write stores. No Typer in here."""
