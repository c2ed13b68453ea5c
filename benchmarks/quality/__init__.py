"""Real-model quality benchmark: all-MiniLM-L6-v2 fine-tuned on several text
classification tasks, then merged with every ccsmerge method.

    python -m benchmarks.quality --out DIR

Needs the benchmark-only extras (see README.md beside this file); nothing here
imports them at package import time."""
