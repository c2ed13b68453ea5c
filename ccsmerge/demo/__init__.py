"""The built-in demo (`ccsmerge demo`): real digits, eight fine-tuned tasks,
every merge method chosen on validation and evaluated on test."""

from .run import main, run_demo

__all__ = ["main", "run_demo"]
