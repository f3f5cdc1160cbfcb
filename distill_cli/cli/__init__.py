"""The top layer: the `distill` command line. `main` parses the command, hands it to Hydra (or to the
ship, report and resume handlers) and turns every error into one line; `torchrun` starts and joins
data-parallel processes. Thin: the logic lives in the layers below.

May import: every layer. Imports of the heavy layers (torch, models, runs) are deferred into the
functions that need them, so that `distill --help` stays fast.
"""
