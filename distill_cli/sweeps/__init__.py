"""The sweeps layer: Hydra's side of multiruns. Callbacks that watch a sweep and write its report
(`callbacks`), the report's results, table and plots (`results`, `report`, `plots`), and the fused
launcher's work (`fused_launcher`; the plugin class is in hydra_plugins/distill_fused_launcher).

May import: every layer below it (`runs` and under) and other `sweeps` modules.
"""
