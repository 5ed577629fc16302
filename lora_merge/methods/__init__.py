"""Merge methods, one file per family, all listed in `METHODS`."""

from . import dare, fisher, linear, prune, regmean, ties  # noqa: F401  (registers the methods)
from .registry import METHODS, MergeMethod, Param, get_method, register

__all__ = ["METHODS", "MergeMethod", "Param", "get_method", "register"]
