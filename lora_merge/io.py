"""Reading and writing PEFT LoRA folders.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys look like
`base_model.model.<module path>.lora_A.weight`; we strip the prefix and the suffix so that the same module is
the same string in every adapter. Pickle files (`adapter_model.bin`) are refused unless the caller opts in,
and then read with `torch.load(weights_only=True)`, which cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import __version__, stfile
from .adapter import Adapter, LoraWeight
from .config import finalize, module_alpha, module_rank, peft_pattern, scaling
from .errors import (
    AdapterLoadError,
    LoraMergeError,
    NonFiniteError,
    OutputExistsError,
    ShapeMismatchError,
    UnsafeFileError,
)
from .lazy import from_safetensors, to_meta

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
# suffix -> (field, embedding?)
_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".lora_magnitude_vector": ("magnitude", None),
    ".lora_magnitude_vector.weight": ("magnitude", None),
    ".lora_B.bias": ("bias", None),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(source: str | os.PathLike, revision: str | None = None,
            allow_pickle: bool = False) -> tuple[Path, str | None]:
    """A local folder for `source`: the folder itself, or a Hub snapshot of `org/name[@revision]`.

    Returns (folder, revision or None). Only adapter files are downloaded (the pickle only if allowed).
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterLoadError(f"{path}: expected a PEFT adapter folder, found a file", file=str(path))
        return path, None
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise AdapterLoadError(f"{text}: no such adapter folder", file=text)
    repo_id, _, rev = text.partition("@")
    revision = rev or revision
    from .hub import download
    return download(repo_id, revision, allow_pickle=allow_pickle), revision


def load(source: str | os.PathLike, *, name: str | None = None, revision: str | None = None,
         allow_pickle: bool = False, lazy: bool = True) -> Adapter:
    """Load a PEFT LoRA adapter from a folder or a Hub repo id (`org/name` or `org/name@revision`).

    Every module becomes a `LoraWeight` (A, B, scale) with its own rank and alpha (rank_pattern,
    alpha_pattern and rsLoRA resolved as PEFT resolves them). Tensors keep their stored dtype.

    Every tensor is read and checked here (one at a time), so that a bad file fails now, naming its module.
    With `lazy=True` (the default; safetensors files only) the values are then dropped and read again from
    the file when a module is used, so a merge holds one module of each input at a time (`lora_merge.lazy`).
    """
    folder, revision = resolve(source, revision, allow_pickle)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{cfg_path}: missing; a PEFT adapter folder needs {CONFIG}", file=str(cfg_path))
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"{cfg_path}: not valid JSON ({e})", file=str(cfg_path)) from e
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{cfg_path}: expected a JSON object", file=str(cfg_path))
    _validate_config(config, str(cfg_path))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(f"{cfg_path}: peft_type is {peft_type}; only LORA adapters can be merged",
                               file=str(cfg_path), key="peft_type")

    tensors, weights_path = _read_tensors(folder, allow_pickle, lazy)
    files = {CONFIG: _sha256(cfg_path), weights_path.name: _sha256(weights_path)}
    modules, extra, keys = _parse(tensors, config, str(weights_path))
    if not modules:
        raise AdapterLoadError(f"{weights_path}: holds no LoRA tensors (keys like "
                               f"'{PREFIX}<module>.lora_A.weight')", file=str(weights_path))
    hub = str(source) != str(folder) and not Path(source).expanduser().exists()
    commit = folder.name if hub and re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    if lazy and weights_path.name == SAFETENSORS:
        modules = from_safetensors(weights_path, modules, keys)
    return Adapter(modules, config, name=name or _default_name(source), source=str(source), files=files,
                   extra=extra, revision=revision, commit=commit)


def _validate_config(config: dict, file: str) -> None:
    """The fields that decide ranks and scales must be what PEFT expects; say which one is not."""
    def bad(key: str, why: str):
        raise AdapterLoadError(f"{file}: {key} {why}", file=file, key=key)

    def positive_int(key: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(key, f"must be a positive integer, got {value!r}")

    def number(key: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(key, f"must be a finite number, got {value!r}")

    positive_int("r", config.get("r", 8))
    number("lora_alpha", config.get("lora_alpha", 8))
    for field, check in (("rank_pattern", positive_int), ("alpha_pattern", number)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            bad(field, f"must be an object mapping module patterns to values, got {type(patterns).__name__}")
        for key, value in patterns.items():
            try:
                peft_pattern(key)
            except re.error as e:
                bad(f"{field}[{key!r}]", f"is not a valid regular expression ({e})")
            check(f"{field}[{key!r}]", value)


def _default_name(source: str | os.PathLike) -> str:
    text = str(source).rstrip("/").split("@")[0]
    return Path(text).name or text


def _split_key(key: str) -> tuple[str, str, bool | None] | None:
    """(module path, slot, embedding?) of a LoRA tensor's key; None for any other tensor."""
    path = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, (slot, emb) in _SUFFIXES.items():
        if path.endswith(suffix):
            return path[: -len(suffix)], slot, emb
    return None


def _check_values(key: str, t: torch.Tensor, file: str) -> None:
    """A LoRA tensor must be floating point and finite."""
    module = _split_key(key)[0]
    if not torch.is_floating_point(t):
        raise AdapterLoadError(f"{file}: {key} has dtype {t.dtype}, expected floating point",
                               file=file, module=module, key=key)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{file}: module {module} holds NaN or Inf values ({key})",
                             file=file, module=module, key=key)


def _read_tensors(folder: Path, allow_pickle: bool, lazy: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The file's tensors, read and checked one at a time; with `lazy`, LoRA tensors are kept as meta tensors."""
    st, pkl = folder / SAFETENSORS, folder / PICKLE
    if st.is_file():
        try:
            tensors = {}
            with safe_open(str(st), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    lora = _split_key(key) is not None
                    if lora:
                        _check_values(key, t, str(st))
                    # get_tensor maps the file: keep a copy (or only the shape), so the file may change later
                    tensors[key] = to_meta(t) if lazy and lora else t.clone()
            return tensors, st
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterLoadError(f"{st}: not a readable safetensors file ({e})", file=str(st)) from e
    if pkl.is_file():
        if not allow_pickle:
            raise UnsafeFileError(
                f"{pkl}: this adapter is stored as a pickle, and unpickling an untrusted file can run arbitrary "
                f"code; convert it to {SAFETENSORS}, or opt in with allow_pickle=True (--allow-pickle; read with "
                "torch.load(weights_only=True))", file=str(pkl))
        try:
            data = torch.load(str(pkl), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - weights_only refusals come as several exception types
            raise AdapterLoadError(f"{pkl}: refused by torch.load(weights_only=True): {e}", file=str(pkl)) from e
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterLoadError(f"{pkl}: expected a dict of tensors", file=str(pkl))
        for key, t in data.items():
            if _split_key(key) is not None:
                _check_values(key, t, str(pkl))
        return data, pkl
    raise AdapterLoadError(f"{folder}: no {SAFETENSORS} (nor {PICKLE}) in this folder", file=str(folder / SAFETENSORS))


def _parse(tensors: dict[str, torch.Tensor], config: dict, file: str
           ) -> tuple[dict[str, LoraWeight], dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    """Modules (with their tensors, real or meta), the other tensors, and each module's key per slot."""
    parts: dict[str, dict] = {}
    keys: dict[str, dict[str, str]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        split = _split_key(key)
        if split is None:
            extra[key] = t
            continue
        module, slot, emb = split                        # values were checked as they were read
        entry = parts.setdefault(module, {})
        entry[slot] = t
        keys.setdefault(module, {})[slot] = key
        if emb is not None:
            entry["embedding"] = emb

    modules = {}
    use_rslora = bool(config.get("use_rslora"))
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            missing = "lora_A" if "A" not in p else "lora_B"
            raise AdapterLoadError(f"{file}: module {module} has no {missing} tensor", file=file, module=module)
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterLoadError(f"{file}: module {module} has {A.dim()}-d/{B.dim()}-d factors; only Linear "
                                   "and Embedding LoRAs are supported (not Conv)", file=file, module=module)
        if A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(f"{file}: module {module}: lora_A is {tuple(A.shape)} but lora_B is "
                                     f"{tuple(B.shape)}; their ranks differ", file=file, module=module)
        rank = A.shape[0]
        expected = module_rank(config, module)
        if rank != expected:
            raise ShapeMismatchError(f"{file}: module {module} has rank {rank} but adapter_config.json gives it "
                                     f"rank {expected} (r / rank_pattern)", file=file, module=module, key="r")
        for slot in ("magnitude", "bias"):
            if slot in p and p[slot].shape != (B.shape[0],):
                raise ShapeMismatchError(f"{file}: module {module}: {slot} has shape {tuple(p[slot].shape)}, "
                                         f"expected ({B.shape[0]},)", file=file, module=module)
        scale = scaling(module_alpha(config, module), rank, use_rslora)
        modules[module] = LoraWeight(A=A, B=B, scale=scale, embedding=bool(p.get("embedding")),
                                     magnitude=p.get("magnitude"), bias=p.get("bias"))
    return modules, extra, keys


def _dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise LoraMergeError(f"unknown dtype {dtype!r}; use one of {sorted(names)}", key="dtype")
    return names[dtype]


def state_dict(adapter: Adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names, in `dtype`."""
    out = {}
    for module, w in adapter.modules.items():
        a, b = (".lora_embedding_A", ".lora_embedding_B") if w.embedding else (".lora_A.weight", ".lora_B.weight")
        out[PREFIX + module + a] = w.A.to(dtype).contiguous()
        out[PREFIX + module + b] = w.B.to(dtype).contiguous()
        if w.magnitude is not None:
            out[PREFIX + module + ".lora_magnitude_vector"] = w.magnitude.to(dtype).contiguous()
        if w.bias is not None:
            out[PREFIX + module + ".lora_B.bias"] = w.bias.to(dtype).contiguous()
    out.update({k: v.contiguous() for k, v in adapter.extra.items()})
    return out


def peft_config(adapter: Adapter) -> dict:
    """adapter_config.json for the adapter: r, lora_alpha and patterns such that PEFT applies each module's scale."""
    modules = adapter.metas
    ranks = {m: w.rank for m, w in modules.items()}
    scales = {m: w.scale for m, w in modules.items()}
    any_bias = any(w.bias is not None for w in modules.values())
    cfg = finalize(adapter.config, ranks, scales, lora_bias=any_bias)
    cfg.setdefault("peft_type", "LORA")
    cfg["use_dora"] = any(w.magnitude is not None for w in modules.values())
    return cfg


def save(adapter: Adapter, path: str | os.PathLike, *, force: bool = False,
         dtype: torch.dtype | str | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write `adapter` as a PEFT folder at `path` that `PeftModel.from_pretrained(base, path)` loads.

    Everything is written to a temporary folder beside `path` and renamed into place, so a failure leaves
    nothing half-written. An existing `path` is replaced only with `force=True`.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass force=True (--force) to overwrite it",
                                file=str(path))
    if path.exists() and not (path.is_dir() and (path / CONFIG).is_file()):
        raise OutputExistsError(f"{path}: exists and is not an adapter folder (no {CONFIG}); lora-merge replaces "
                                "only adapter folders, even with --force: choose a new folder", file=str(path))
    out_dtype = _dtype(dtype, adapter.dtype)
    modules = adapter.metas
    if not modules:
        raise LoraMergeError(f"{adapter.name}: the adapter has no modules (all terms cancelled?); nothing to save")
    tensors = state_dict(adapter, out_dtype)
    for key, t in tensors.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            module = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
            raise NonFiniteError(f"{adapter.name}: module {module} of the result holds NaN or Inf in {out_dtype} "
                                 f"({key}); a larger dtype (dtype='float32') may hold it", module=module, key=key)
    if not all(math.isfinite(w.scale) for w in modules.values()):
        raise NonFiniteError(f"{adapter.name}: a module of the result has a non-finite scale")
    config = peft_config(adapter)
    from .card import model_card

    created = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes 0700; a saved adapter is as readable as any new folder
    old = None
    try:
        stfile.write(tmp / SAFETENSORS, tensors, metadata={"format": "pt", "lora_merge_version": __version__})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(adapter, config))
        for name, text in (extra_files or {}).items():     # e.g. lorahub.json, in the same atomic rename
            (tmp / name).write_text(text)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)           # put the previous folder back
        for p in reversed(created):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
    if old is not None:
        _remove(old)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
