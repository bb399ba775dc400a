"""Input and output: HDF5 stores (store), output checks and locks (outputs), provenance and resume
checks (provenance), dataset readers, parallel loading, torchrun sharding, palettes, progress bars and
the run-time device. No numerical work and no command-line parsing."""
