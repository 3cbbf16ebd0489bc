"""``ModelConfig``: one frozen, hashable description of a llama / qwen2 / qwen3 decoder.

The three Hugging Face model types share one architecture (pre-norm decoder, GQA,
RoPE, RMSNorm, SwiGLU) and differ only in switches:

=========  ===============================  =========================================
type       attention projections            extras
=========  ===============================  =========================================
llama      bias iff ``attention_bias``      llama3 / linear RoPE scaling
qwen2      q/k/v bias, o_proj without       (sliding window unsupported)
qwen3      bias iff ``attention_bias``      RMSNorm over ``head_dim`` on q and k
=========  ===============================  =========================================

``from_hf`` reads a ``transformers`` config (v5 ``rope_parameters`` or the older
``rope_theta`` + ``rope_scaling``), ``to_hf`` writes the matching config class so a
saved directory loads with ``transformers.AutoModelForCausalLM``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ModelType = Literal["llama", "qwen2", "qwen3"]
_DTYPES = ("float32", "bfloat16", "float16")
#: ``scan_layers=None`` scans models with more layers than this.
SCAN_LAYERS_ABOVE = 8


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_parameters`` with ``rope_type`` != "default").

    * ``linear``: every inverse frequency is divided by ``factor``.
    * ``llama3`` (Llama 3.1): wavelengths longer than
      ``original_max_position_embeddings / low_freq_factor`` are divided by
      ``factor``, shorter than ``original / high_freq_factor`` kept, and the band in
      between interpolated smoothly (HF ``_compute_llama3_parameters``).
    """

    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a :class:`~jaxrl_geom.models.Decoder`.

    Attributes mirror the Hugging Face names. ``attention_bias`` means a bias on
    q/k/v (always on for qwen2); llama and qwen3 then also have an ``o_proj`` bias,
    as in HF (see :attr:`o_proj_bias`). ``dtype`` is the compute dtype,
    ``param_dtype`` the storage dtype of the parameters (keep it float32 for
    training). ``remat`` recomputes each layer in the backward pass, saving nothing
    (``remat_policy="nothing_saveable"``) or the matmul outputs (``"save_dots"``).
    ``scan_layers`` stacks the layers' parameters on a leading ``[L]`` axis and runs
    them under ``lax.scan`` (one compiled layer); ``None`` scans above
    :data:`SCAN_LAYERS_ABOVE` layers (see :attr:`scanned`).
    ``attention_impl`` picks the attention form (:func:`jaxrl_geom.models.attention.attend`:
    "xla" reference, "blockwise" O(T) memory, "cudnn" GPU, "auto") and
    ``attention_block_size`` its query/key block. The train step runs the LM head
    over ``logits_chunk_tokens`` positions at a time (its largest float32 array is
    ``[logits_chunk_tokens, V]``), and each layer's MLP over ``mlp_chunk_tokens``
    positions of every row at a time (``None``: whole rows); the sampler's prefill feeds the prompt
    ``prefill_chunk_tokens`` at a time. Token ids are carried only so that
    ``to_hf`` writes them back.
    """

    model_type: ModelType
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: Literal["nothing_saveable", "save_dots"] = "nothing_saveable"
    scan_layers: bool | None = None
    attention_impl: Literal["xla", "blockwise", "cudnn", "auto"] = "auto"
    attention_block_size: int = 512
    logits_chunk_tokens: int = 1024
    mlp_chunk_tokens: int | None = 1024
    prefill_chunk_tokens: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {self.model_type!r}; supported model types: "
                f"{SUPPORTED_MODEL_TYPES}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r}; use one of {_DTYPES} "
                    "(pass the dtype's name, e.g. 'bfloat16')."
                )
        if self.remat_policy not in ("nothing_saveable", "save_dots"):
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r}; use 'nothing_saveable' or "
                "'save_dots' (and remat=False for no rematerialisation)."
            )
        if self.attention_impl not in ("xla", "blockwise", "cudnn", "auto"):
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r}; use one of 'xla', "
                "'blockwise', 'cudnn', 'auto'."
            )
        if int(self.prefill_chunk_tokens) < 1:
            raise ValueError(
                f"ModelConfig.prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}."
            )
        if int(self.logits_chunk_tokens) < 1:
            raise ValueError(
                f"ModelConfig.logits_chunk_tokens must be >= 1, got {self.logits_chunk_tokens}."
            )
        if self.mlp_chunk_tokens is not None and int(self.mlp_chunk_tokens) < 1:
            raise ValueError(
                f"ModelConfig.mlp_chunk_tokens must be >= 1 (or None: unchunked), got "
                f"{self.mlp_chunk_tokens}."
            )
        if int(self.attention_block_size) < 1:
            raise ValueError(
                f"ModelConfig.attention_block_size must be >= 1, got {self.attention_block_size}."
            )
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 always has a q/k/v bias: set attention_bias=True.")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(
                f"qk_norm={self.qk_norm} does not match model_type {self.model_type!r}: "
                "q/k RMSNorm is part of qwen3 and only qwen3."
            )

    # ------------------------------------------------------------------ derived

    @property
    def o_proj_bias(self) -> bool:
        """HF llama/qwen3 put ``attention_bias`` on o_proj too; qwen2 never does."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def scanned(self) -> bool:
        """Layers stacked and scanned: ``scan_layers``, or by default more than
        :data:`SCAN_LAYERS_ABOVE` layers."""
        if self.scan_layers is None:
            return self.num_hidden_layers > SCAN_LAYERS_ABOVE
        return bool(self.scan_layers)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    # ------------------------------------------------------------------ presets

    @classmethod
    def tiny(
        cls,
        vocab_size: int,
        *,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        tie_word_embeddings: bool = False,
        dtype: str = "float32",
        param_dtype: str = "float32",
        remat: bool = False,
    ) -> ModelConfig:
        """A small llama-type model for the built-in tasks (trained from scratch).

        ``intermediate_size`` defaults to ``3 * hidden_size``; ``head_dim`` is
        ``hidden_size // num_attention_heads``.
        """
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads})."
            )
        return cls(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 3 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=hidden_size // num_attention_heads,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
        )

    # ------------------------------------------------------------------ HF interop

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> ModelConfig:
        """Read a ``transformers`` config (``PretrainedConfig`` or its ``to_dict()``).

        ``overrides`` replace fields afterwards (e.g. ``dtype="bfloat16"``).
        """
        get = (
            hf_config.get
            if isinstance(hf_config, Mapping)
            else lambda k, d=None: getattr(hf_config, k, d)
        )
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {model_type!r}; supported model types: "
                f"{SUPPORTED_MODEL_TYPES} (decoder LMs with RoPE, GQA and SwiGLU)."
            )
        if get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"Only SwiGLU (hidden_act='silu') is supported, got {get('hidden_act')!r}."
            )
        if get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported (no llama checkpoint uses it).")
        if get("use_sliding_window", False) or any(
            t != "full_attention" for t in (get("layer_types") or ())
        ):
            raise ValueError("Sliding-window attention is not supported; use full attention.")
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        rope_theta, rope_scaling = _read_rope(get)
        eos = get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = tuple(int(e) for e in eos)
        config = cls(
            model_type=model_type,
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id"),
        )
        return dataclasses.replace(config, **overrides) if overrides else config

    def to_hf(self) -> Any:
        """The matching ``transformers`` config (LlamaConfig / Qwen2Config / Qwen3Config)."""
        import transformers  # lazy: heavy, only needed at the HF boundary

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
            if self.rope_scaling.rope_type == "linear":
                for k in (
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ):
                    rope.pop(k)
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            rope_parameters=rope,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.param_dtype,
        )
        if self.model_type == "llama":
            return transformers.LlamaConfig(attention_bias=self.attention_bias, **kwargs)
        if self.model_type == "qwen2":
            return transformers.Qwen2Config(use_sliding_window=False, **kwargs)
        return transformers.Qwen3Config(attention_bias=self.attention_bias, **kwargs)


def _read_rope(get: Any) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, RopeScaling | None)`` from v5 ``rope_parameters`` or v4 fields."""
    params = get("rope_parameters") or {}
    legacy = get("rope_scaling") or {}
    if params and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("Per-layer-type RoPE parameters are not supported.")
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported.")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", float(merged["factor"]))
    if rope_type == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                merged.get("original_max_position_embeddings")
                or get("max_position_embeddings", 8192)
            ),
        )
    raise ValueError(
        f"Unsupported rope_type {rope_type!r}; supported: 'default', 'linear', 'llama3'."
    )
