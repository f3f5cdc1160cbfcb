"""The KD layer: the objective of a method on two networks (`objective`), how a step gets the teacher's
outputs (`teachers`), the teacher ensemble (`ensemble`) and the one wiring every command uses
(`wiring`: `wire_kd`, `check_kd`).

May import: `core`, `data`, `models`, `losses`, `training`, and other `kd` modules.
"""
