"""Datasets, input pipelines and augmentation."""
