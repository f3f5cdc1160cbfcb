"""The bottom layer: what every other layer uses, with no torch model code. Config schemas (`config`), the
command table (`commands`), errors and their one-line messages (`errors`), atomic files (`files`),
checkpoints (`checkpoint`), the console and results table (`console`), run folders and resume
(`run_folders`), registries (`registry`), the torchrun environment (`processes`), and this process's place among
the data-parallel training processes with their collectives (`world`).

May import: only the standard library, third-party packages and other `core` modules.
"""
