"""Typed errors. Every error the library raises on bad input is a `LoraMergeError`.

Each carries what a user needs to find the problem: the file, the module, the key. The
CLI turns them into one line; Python callers can catch the subclass they care about.
"""

from __future__ import annotations


class LoraMergeError(Exception):
    """Base class of every error lora-merge raises on bad input or bad arguments."""

    def __init__(self, message: str, *, file: str | None = None, module: str | None = None,
                 key: str | None = None):
        self.file = file
        self.module = module
        self.key = key
        super().__init__(message)


class AdapterLoadError(LoraMergeError):
    """An adapter folder or file is missing, unreadable, or not a PEFT LoRA."""


class UnsafeFileError(AdapterLoadError):
    """A pickle file (adapter_model.bin) was found and the caller did not opt in."""


class ShapeMismatchError(LoraMergeError):
    """Two adapters disagree on a module's shape, or a module's tensors disagree with each other."""


class BaseModelMismatchError(LoraMergeError):
    """Adapters were trained on different base models."""


class NonFiniteError(LoraMergeError):
    """A tensor holds NaN or Inf."""


class UnsupportedAdapterError(LoraMergeError):
    """An adapter uses a feature (DoRA, lora_bias, modules_to_save, ...) that a method cannot merge correctly."""


class MethodError(LoraMergeError):
    """Unknown merge method, unknown or invalid parameter, or inputs a method cannot combine."""


class ExpressionError(LoraMergeError):
    """A composition expression such as '0.6*math - 0.3*toxic' is malformed or names an unknown adapter."""


class OutputExistsError(LoraMergeError):
    """The output folder exists and overwriting was not asked for."""


class RecipeError(LoraMergeError):
    """A YAML recipe is malformed: unknown keys, wrong types, unknown methods. Lists every problem at once."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 problems: list[tuple[int | None, str, str]] | None = None):
        super().__init__(message, file=file, key=key)
        self.problems = problems or []      # (line, key path, message)


class HubError(LoraMergeError):
    """A Hub download or upload failed (missing repo, revision or file; refused token; server error)."""
