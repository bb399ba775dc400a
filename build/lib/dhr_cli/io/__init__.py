"""Input and output: HDF5 stores, dataset readers, parallel loading, torchrun sharding, palettes,
progress bars and the run-time device. No numerical work and no command-line parsing."""
