"""The command-line tools over the `cnnjax` library, by kind (each `python -m
experiments.NAME --help` explains its flags):

- training one run: `run` (the CLI), with `cli` (flags from `TrainConfig`, one-line
  errors and exit codes) shared by every tool;
- sweeps, many runs and a report over one driver (`sweep`): `reproduce` (the book's
  table), `bn_ablation` and `degradation`;
- the book's PyTorch networks (`torch_reference`) and the check that ours compute
  what they compute (`equivalence`);
- benchmarks: `bench` (whole train steps, beside PyTorch's with `bench_torch`) and
  `bench_kernels` (each CPU kernel against the layer it replaces);
- `accelerator/`: everything on a GPU within a deadline, and `carry.sh`, which
  builds what such a machine without TensorFlow or a network needs.
"""
