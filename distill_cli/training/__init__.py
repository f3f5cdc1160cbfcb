"""The training layer: the loop that trains any network with any step (`loop`: `fit`, `fit_together`),
where and how it computes (`compute`), the memory a device has free (`device_memory`), seeding and
RNG state (`rng`), the optimiser (`optim`), metrics (`metrics`), the student in DDP and a method's
gradients averaged over the processes (`data_parallel`), the run's data set-up (`setup`), experiment
trackers (`trackers`) and students stacked into one network (`stacked`). It knows no KD method: it is
handed a step.

May import: `core`, `data`, `models`, and other `training` modules (not `losses`, `kd` or anything above).
"""
