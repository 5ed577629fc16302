"""lora-merge: load LoRA adapters and combine them into new adapters, in factored form.

    import lora_merge as lm
    math, code = lm.load("adapters/math"), lm.load("adapters/code")
    merged = lm.merge([math, code], weights=[0.6, 0.4], method="ties", density=0.5)
    merged.save("out/merged")
    lm.push("out/merged", "me/merged-lora")

    recipe = lm.load_recipe("recipes/ties.yaml")       # the YAML recipes the CLI runs
    adapter, folder = lm.run_recipe(recipe, "out/ties")
"""

__version__ = "0.1.0"

from . import fisher, lorahub  # noqa: E402
from .adapter import Adapter, LoraWeight  # noqa: E402
from .errors import (  # noqa: E402
                     AdapterLoadError,
                     BaseModelMismatchError,
                     ExpressionError,
                     HubError,
                     LoraMergeError,
                     MethodError,
                     NonFiniteError,
                     OutputExistsError,
                     RecipeError,
                     ShapeMismatchError,
                     UnsafeFileError,
                     UnsupportedAdapterError,
)
from .expr import compose, parse  # noqa: E402
from .hub import push  # noqa: E402
from .io import load, save  # noqa: E402
from .merge import merge  # noqa: E402
from .methods import METHODS, get_method  # noqa: E402
from .recipe import load_recipe, parse_recipe  # noqa: E402
from .runner import plan as plan_recipe  # noqa: E402
from .runner import run as run_recipe  # noqa: E402

__all__ = [
    "Adapter", "LoraWeight", "load", "save", "merge", "compose", "parse", "METHODS", "get_method", "push",
    "load_recipe", "parse_recipe", "run_recipe", "plan_recipe", "RecipeError", "HubError", "lorahub", "fisher",
    "LoraMergeError", "AdapterLoadError", "UnsafeFileError", "ShapeMismatchError", "BaseModelMismatchError",
    "NonFiniteError", "UnsupportedAdapterError", "MethodError", "ExpressionError", "OutputExistsError",
]
