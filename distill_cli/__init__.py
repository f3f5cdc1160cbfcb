"""distill: a config-driven command-line runner for knowledge-distillation experiments.

Layers, bottom to top; a module imports only from its own layer or the ones below (docs/architecture.md,
checked by tests/test_architecture.py): core, data, models, losses, training, kd, ship, runs, sweeps, cli.
"""

__version__ = "0.1.0"
