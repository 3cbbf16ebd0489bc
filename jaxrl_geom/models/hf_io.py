"""Hugging Face checkpoints (safetensors) in and out, through one declarative key map.

Each row of :data:`GLOBAL_KEYS` / :data:`LAYER_KEYS` pairs a Hugging Face tensor
name with our parameter path and whether the tensor is transposed (HF ``nn.Linear``
stores ``[out, in]``, our kernels ``[in, out]``). The rows whose path exists in a
model form that model's map (:func:`key_map`); loading and saving both read it, so
they cannot drift apart.

Loading builds the model abstractly (``nnx.eval_shape``, no parameter memory), then
reads each tensor on the host and ``device_put``s it straight to its sharding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrl_geom.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxrl_geom.models.decoder import Decoder

PathParts = tuple[Any, ...]


class KeySpec(NamedTuple):
    path: PathParts  # our parameter path, e.g. ("layers", 0, "self_attn", "q_proj", "kernel")
    transpose: bool  # HF stores the transpose ([out, in])
    layer: int | None = None  # scanned layout: row ``layer`` of the stacked [L, ...] array


# (HF name, our path, transpose). Layer rows are under "model.layers.{i}." / ("layers", i).
GLOBAL_KEYS: tuple[tuple[str, PathParts, bool], ...] = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
    ("model.norm.weight", ("norm", "scale"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),
)
LAYER_KEYS: tuple[tuple[str, PathParts, bool], ...] = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False),
    *(
        row
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        for row in (
            (f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), True),
            (f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), False),
        )
    ),
    ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), False),
    ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), False),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
)
# Checkpoint entries that carry no parameters (old non-persistent RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def key_map(
    param_paths: set[PathParts], num_layers: int, scanned: bool = False
) -> dict[str, KeySpec]:
    """``{hf_name: KeySpec}`` for the parameters that exist (``param_paths``).

    With ``scanned`` (``ModelConfig.scan_layers``) every ``model.layers.{i}.*`` tensor
    is row ``i`` of the stacked parameter at ``("layers", ...)``.
    """
    rows = [(name, path, t, None) for name, path, t in GLOBAL_KEYS]
    for i in range(num_layers):
        rows += [
            (f"model.layers.{i}.{n}", ("layers", *p) if scanned else ("layers", i, *p), t, i)
            for n, p, t in LAYER_KEYS
        ]
    mapping = {
        name: KeySpec(path, t, layer if scanned else None)
        for name, path, t, layer in rows
        if path in param_paths
    }
    unmapped = param_paths - {s.path for s in mapping.values()}
    if unmapped:
        raise ValueError(
            f"Parameters without a Hugging Face name: {sorted(map(str, unmapped))[:5]}."
        )
    return mapping


# --------------------------------------------------------------------------- load


def load_pretrained(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    **overrides: Any,
) -> Decoder:
    """Load a Hugging Face llama / qwen2 / qwen3 checkpoint directory as a :class:`Decoder`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards listed
        in ``model.safetensors.index.json``).
      mesh: place each parameter directly on this ``("data", "fsdp", "tensor")`` mesh
        by its logical axes (:mod:`jaxrl_geom.sharding`); ``None``: default device.
      dtype: compute dtype (default float32, whatever the checkpoint's dtype).
      param_dtype: parameter storage dtype (default float32).
      overrides: other :class:`ModelConfig` fields (e.g. ``attention_impl="blockwise"``).

    Raises:
      ValueError: missing directory/config, pickle-only (``.bin``) checkpoints,
        unsupported model types, or missing / unexpected / misshapen tensors.
    """
    from jaxrl_geom import sharding  # lazy: sharding is optional at this boundary

    root = Path(path).expanduser()
    config = _read_config(root, dtype, param_dtype, overrides)
    files = _safetensors_files(root)

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abstract_state))
    mapping = key_map(set(flat), config.num_hidden_layers, config.scanned)
    shardings = (
        dict(nnx.to_flat_state(sharding.param_shardings(abstract_state, mesh)))
        if mesh is not None
        else None
    )

    # Pass 1, metadata only: which file holds each tensor, and do the shapes fit?
    sources: dict[PathParts, dict[int | None, tuple[Path, str, bool]]] = {}
    found: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with _safetensors(file) as f:
            for name in f.keys():
                spec = mapping.get(name)
                if spec is None:
                    if not _ignorable(name, config):
                        unexpected.append(name)
                    continue
                variable = flat[spec.path]
                shape = tuple(f.get_slice(name).get_shape())
                shape = shape[::-1] if spec.transpose else shape
                want = variable.shape if spec.layer is None else variable.shape[1:]
                if shape != want:
                    raise ValueError(
                        f"{name}: checkpoint shape {shape} (after transpose={spec.transpose})"
                        f" != model shape {want}; config.json does not match the weights."
                    )
                found.add(name)
                sources.setdefault(spec.path, {})[spec.layer] = (file, name, spec.transpose)
    missing = sorted(n for n in mapping if n not in found)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {root} does not match a {config.model_type} Decoder: missing "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. Check that config.json "
            "belongs to these weights."
        )
    # Pass 2: each variable from the regions its (addressable) shards need.
    loaded: dict[PathParts, nnx.Variable] = {}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_safetensors(file)) for file in files}
        for path, layers in sources.items():
            variable = flat[path]
            read = functools.partial(_read_region, handles, layers, variable.dtype)
            target = shardings[path].get_value() if shardings else None
            if target is None:
                value = jnp.asarray(read((slice(None),) * variable.ndim))
            else:  # only the shards this process holds are read (safetensors slices)
                value = jax.make_array_from_callback(variable.shape, target, read)
            loaded[path] = variable.replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _read_region(
    handles: dict[Path, Any],
    layers: dict[int | None, tuple[Path, str, bool]],
    dtype: Any,
    index: tuple[slice, ...],
) -> np.ndarray:
    """``variable[index]`` read from the checkpoint: one tensor, or rows of the stacked
    ``[L, ...]`` layout (one HF tensor per layer), transposed and cast as the model wants."""
    if None in layers:
        return _read_slice(handles, *layers[None], index, dtype)
    rows = range(len(layers))[index[0]]
    return np.stack([_read_slice(handles, *layers[i], index[1:], dtype) for i in rows])


def _read_slice(
    handles: dict[Path, Any],
    file: Path,
    name: str,
    transpose: bool,
    index: tuple[slice, ...],
    dtype: Any,
) -> np.ndarray:
    """A region of one tensor (``index`` in the model's orientation); non-finite values are
    an error naming the tensor and the file."""
    try:
        part = handles[file].get_slice(name)[tuple(index[::-1] if transpose else index)]
    except Exception as err:
        raise ValueError(
            f"{file}: tensor {name} cannot be read ({' '.join(str(err).split())[:200]}); the "
            "file is truncated: save or copy it again."
        ) from None
    part = np.asarray(part)
    if jnp.issubdtype(part.dtype, jnp.inexact):
        bad = int(np.size(part) - np.count_nonzero(np.isfinite(part.astype(np.float32))))
        if bad:
            raise ValueError(
                f"{file}: tensor {name} holds {bad} non-finite values (NaN/inf); the "
                "checkpoint is damaged: load an earlier or the original checkpoint."
            )
    return np.ascontiguousarray((part.T if transpose else part).astype(dtype))


@contextlib.contextmanager
def _safetensors(file: Path) -> Any:
    """``safe_open`` whose errors name the file (truncated or not a safetensors file)."""
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as err:  # SafetensorError, OSError
        raise ValueError(
            f"{file} cannot be read as safetensors ({' '.join(str(err).split())[:200]}); the "
            "file is truncated or not a safetensors file: save or copy it again."
        ) from None
    with handle as f:
        yield f


def _read_config(
    root: Path, dtype: Any, param_dtype: Any, overrides: dict[str, Any] | None = None
) -> ModelConfig:
    if not (root / "config.json").is_file():
        raise ValueError(
            f"{root} has no config.json; pass a Hugging Face model directory (saved with "
            "save_pretrained), not a file or hub id."
        )
    try:
        model_type = json.loads((root / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{root / 'config.json'} is not a JSON object: {err}.") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {model_type!r} in {root / 'config.json'}; supported model "
            f"types: {SUPPORTED_MODEL_TYPES}."
        )
    import transformers  # lazy: heavy import, only at the HF boundary

    hf_config = transformers.AutoConfig.from_pretrained(root)
    return ModelConfig.from_hf(
        hf_config,
        dtype=_dtype_name(dtype),
        param_dtype=_dtype_name(param_dtype),
        **(overrides or {}),
    )


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [root / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"Shards listed in {index} are missing: {absent}.")
        return files
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    pickles = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"{root} holds only pickle weights ({pickles[:3]}); only safetensors checkpoints "
            "(model.safetensors or model.safetensors.index.json) are supported. Convert with "
            "transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)."
        )
    raise ValueError(
        f"{root} has no model.safetensors or model.safetensors.index.json; only safetensors "
        "checkpoints are supported."
    )


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Tied models may still store lm_head.weight (a copy of the embedding): HF ignores it.
    return name.endswith(_IGNORED_SUFFIXES) or (
        name == "lm_head.weight" and config.tie_word_embeddings
    )


def _dtype_name(dtype: Any) -> str:
    return "float32" if dtype is None else jnp.dtype(dtype).name


# --------------------------------------------------------------------------- save


def save_pretrained(model: Decoder, path: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``transformers``.

    Tensors are written in the parameter dtype. Tied models store no
    ``lm_head.weight`` (HF ``tie_word_embeddings``).
    """
    if not isinstance(model, Decoder):
        raise ValueError(
            f"save_pretrained expects a jaxrl_geom Decoder, got {type(model).__name__}."
        )
    root = Path(path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = config.to_hf()
    hf_config.architectures = [type(hf_config).__name__.replace("Config", "ForCausalLM")]
    hf_config.save_pretrained(root)

    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    host: dict[PathParts, np.ndarray] = {}  # one transfer per (stacked) parameter
    for name, spec in key_map(set(flat), config.num_hidden_layers, config.scanned).items():
        if spec.path not in host:
            host[spec.path] = np.asarray(jax.device_get(flat[spec.path].get_value()))
        array = host[spec.path] if spec.layer is None else host[spec.path][spec.layer]
        tensors[name] = np.ascontiguousarray(array.T if spec.transpose else array)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
