"""Losses of the method: ReID (identity, triplet) and PASS self-distillation.

The cluster-contrast memory loss lives with its memory in ``passreid.cluster``.
"""
