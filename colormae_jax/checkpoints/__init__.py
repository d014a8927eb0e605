"""Verified, atomic checkpoints; checksums; the workdir lock."""
