"""Launchers for the trainer: local, multi-process, TPU pod, SLURM; sweep expansion and result reports.

Each launcher is a module run as `python -m launch.<name> [flags] [--dry_run] -- <trainer args>` and exposes a pure
function that returns the commands, so tests check them without running anything.
"""
