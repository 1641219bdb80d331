"""Datasets for KaoLRM training: on-disk layouts, the synthetic generator, grain
sources and transforms."""
