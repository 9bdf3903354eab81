"""The package version, in the bottom layer: the mask and stats files record it."""

__version__ = "0.1.0"
