"""Datasets that need no download: seeded data generated on the fly, with the right answers planted in it."""

from scsuperweight.data.synthetic import synthetic_ad

__all__ = ["synthetic_ad"]
