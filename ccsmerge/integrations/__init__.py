"""Integrations of ccsmerge into other merging tools."""
