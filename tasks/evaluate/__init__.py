"""The evaluate stage: ParaBench items, sampling a checkpoint on them, judges (exact, VLM, CLIP), reports.

flows/evaluate.py drives it (and flows/ablate.py through it).
"""
