"""The runs layer: the commands that train, as plain functions tests call without Hydra. `train`
(`run_train`), `kd` (`run_kd`) with its modes (`modes/`: the plain student in `student`, mutual learning,
born-again, assistants), where teachers and baselines come from (`teachers`, `teacher_cache`), fused
groups (`fused`) and their memory plan (`memory`), `bench`, and the command runners (`commands`).

May import: every layer below (`core`, `data`, `models`, `losses`, `training`, `kd`, `ship`) and other `runs` modules.
"""
