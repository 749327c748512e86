"""`GrinConfig`: every choice GRIN makes, documented, defaulted and validated in one place."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .errors import GrinError
from .registration import GRIN_PEFT_TYPE

SCORES = (
    "gradient_ratio",
    "random",
    "magnitude",
    "forget_gradient",
    "ssd",
    "wagle",
    "squared_ratio",
)
# Scores that need no data: selection happens when the adapter is injected.
DATA_FREE_SCORES = ("random", "magnitude")
GRAD_STATISTICS = ("abs_sum", "sum_abs", "sum_sq")
GRAD_UNITS = ("example", "batch")
EPS_MODES = ("absolute", "quantile")
NORMALIZATIONS = ("none", "tokens", "batches")
NOISE_SCALES = ("absolute", "weight", "tensor_std")
SELECTIONS = ("global", "per_module")
FINGERPRINT_CHECKS = ("error", "warn", "off")

DEFAULT_DENSITY = 1e-3


@dataclass
class GrinConfig(PeftConfig):
    """Configuration of a GRIN adapter: which weights may change, how many, how they are chosen and initialised.

    GRIN (Anjarlekar & Pombra, 2025) scores every candidate weight entry by how much it matters for the data to
    forget versus the data to keep, selects a sparse set of the top-scored entries, writes Gaussian noise into a
    sparse delta on exactly those entries and trains only that delta. The paper's exact statistic, epsilon, noise
    scale and budget are not public: each is a field here with a documented default, never a claim about the paper.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Module names or a regex to adapt, or 'all-linear' for every linear layer except the output head. "
                "Default None means 'all-linear'."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave alone even if target_modules matches them."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in LoRA). Default: all layers."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer stack for layers_to_transform, e.g. 'layers' or 'h'."}
    )
    density: float | None = field(
        default=None,
        metadata={
            "help": (
                "Fraction of all targeted weight entries to train, in (0, 1]. Default 1e-3 (0.1%) when neither "
                "density nor num_entries is given, meant for LLMs where that is millions of entries; on a 1.3M-"
                "parameter model 1-5% unlearned with far less collateral damage (BENCHMARKS.md 5.10). Mutually "
                "exclusive with num_entries."
            )
        },
    )
    num_entries: int | None = field(
        default=None,
        metadata={"help": "Absolute budget of trained entries over all targeted weights; exclusive with density."},
    )
    selection: Literal["global", "per_module"] = field(
        default="global",
        metadata={
            "help": (
                "'global': one ranking over all targeted entries, so density differs per module (the paper's "
                "figure of per-module densities suggests this). 'per_module': every module gets the same density."
            )
        },
    )
    score: str = field(
        default="gradient_ratio",
        metadata={
            "help": (
                "How entries are scored. 'gradient_ratio' (GRIN: A_f / (A_r + eps)), 'random', 'magnitude' (|w|), "
                "'forget_gradient' (SalUn), 'ssd' (Fisher ratio with alpha threshold), 'wagle', 'squared_ratio' "
                "(LoKU/FILA). 'random' and 'magnitude' select when the adapter is created; the others select in "
                "`model.localize(forget, retain)`."
            )
        },
    )
    grad_statistic: Literal["abs_sum", "sum_abs", "sum_sq"] = field(
        default="sum_sq",
        metadata={
            "help": (
                "Per-entry gradient statistic A accumulated over batches: 'abs_sum' = |sum of gradients|, "
                "'sum_abs' = sum of |gradient|, 'sum_sq' = sum of squared gradients (Fisher-style). Default "
                "'sum_sq': summed gradients of a converged model cancel on retain data, so 'abs_sum' mostly "
                "selects tiny denominators (research notes, section 8)."
            )
        },
    )
    eps: float = field(
        default=1e-2,
        metadata={
            "help": (
                "Denominator guard of the ratio A_f / (A_r + eps). With eps_mode='quantile' it is relative: "
                "eps * quantile(A_r, eps_quantile). Default 1e-2 (0.01 x the median of A_r). eps=1.0 was more "
                "selective on planted-memory tests, but two-process selection did not yet match one process with "
                "it, so it is not the default (see BENCHMARKS.md)."
            )
        },
    )
    grad_unit: Literal["example", "batch"] = field(
        default="example",
        metadata={
            "help": (
                "The unit whose gradient is squared/absolute-valued before summing: 'example' (default; per-example "
                "gradients, twice as selective on planted-memory tests) or 'batch' (cheaper)."
            )
        },
    )
    eps_mode: Literal["absolute", "quantile"] = field(
        default="quantile", metadata={"help": "'absolute' eps, or eps relative to a quantile of A_r (default)."}
    )
    eps_quantile: float = field(
        default=0.5, metadata={"help": "Quantile of A_r used by eps_mode='quantile', in [0, 1]. Default the median."}
    )
    normalization: Literal["none", "tokens", "batches"] = field(
        default="tokens",
        metadata={
            "help": (
                "Divide A_f and A_r by the number of answer tokens ('tokens', default) or batches seen, so forget "
                "and retain sets of different sizes are comparable."
            )
        },
    )
    ssd_alpha: float = field(
        default=10.0, metadata={"help": "SSD's selection threshold: only entries with F_f > alpha * F_r are eligible."}
    )
    wagle_mu: float = field(default=1e-6, metadata={"help": "WAGLE's mu in S = |(w - g_r / mu) * g_f|."})
    noise_std: float = field(
        default=0.1,
        metadata={
            "help": (
                "Standard deviation of the Gaussian noise written into the delta after selection, before training, "
                "in the units of noise_scale. 0 disables noise."
            )
        },
    )
    noise_scale: Literal["absolute", "weight", "tensor_std"] = field(
        default="tensor_std",
        metadata={
            "help": (
                "Units of noise_std: 'absolute', 'weight' (times |w| of each entry) or 'tensor_std' (times the std "
                "of the whole weight tensor, default)."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for random selection and for the injected noise."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: the delta starts at zero (plus the configured noise). False: random non-zero values, which is "
                "only useful for tests."
            )
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True when the weight is stored (in, out), like GPT-2's Conv1D; set automatically for it."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter (PEFT semantics)."}
    )
    forget_description: str | None = field(
        default=None, metadata={"help": "What this delta makes the model forget; written into the model card."}
    )
    base_model_fingerprint: str | None = field(
        default=None,
        metadata={"help": "Set automatically: fingerprint of the base weights the delta was made for."},
    )
    base_model_architecture: str | None = field(
        default=None, metadata={"help": "Set automatically: model_type and class of the base model."}
    )
    fingerprint_check: Literal["error", "warn", "off"] = field(
        default="error",
        metadata={
            "help": (
                "What to do when a saved delta is loaded onto a base whose fingerprint differs: 'error' (default), "
                "'warn' or 'off'. Set it on the loaded config to override explicitly."
            )
        },
    )
    dense_threshold: float = field(
        default=0.05,
        metadata={
            "help": (
                "Per layer: when an adapter's density there (its entries / the weight's entries) is above this "
                "fraction, the layer computes x @ (W + D)^T with the delta merged into a temporary dense copy of the "
                "weight (one matmul, gradients only to the values, the same output as after a merge) instead of the "
                "sparse kernels, whose cost grows with the entries. In [0, 1]: 0 = dense whenever there are "
                "entries, 1 = always sparse. Default 0.05, the measured float32 crossover on a 2048x5504 layer on "
                "CPU: equal cost at 5%, dense 1.2x / 2x / 3.3x faster at 10% / 25% / 50%. In bfloat16 on CPU dense "
                "won at every density from 0.1% (benchmarks/results/density_regime.md). The dense regime keeps one "
                "out x in copy of the weight per layer until backward; quantized (bitsandbytes) base layers and "
                "base layers with hooks always stay sparse."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GRIN_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise GrinError(f"GrinConfig.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")

        choice("score", SCORES)
        choice("grad_statistic", GRAD_STATISTICS)
        choice("eps_mode", EPS_MODES)
        choice("grad_unit", GRAD_UNITS)
        choice("normalization", NORMALIZATIONS)
        choice("noise_scale", NOISE_SCALES)
        choice("selection", SELECTIONS)
        choice("fingerprint_check", FINGERPRINT_CHECKS)
        if self.density is not None and self.num_entries is not None:
            raise GrinError("GrinConfig: give either density or num_entries, not both.")
        if self.density is not None and not (
            isinstance(self.density, (int, float)) and not isinstance(self.density, bool) and 0 < self.density <= 1
        ):
            raise GrinError(f"GrinConfig.density={self.density!r} must be a number in (0, 1].")
        if self.num_entries is not None and (
            not isinstance(self.num_entries, int) or isinstance(self.num_entries, bool) or self.num_entries < 1
        ):
            raise GrinError(f"GrinConfig.num_entries={self.num_entries!r} must be a positive integer.")
        for name in ("eps", "noise_std", "wagle_mu"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise GrinError(f"GrinConfig.{name}={value!r} must be a non-negative number.")
        if not 0.0 <= self.eps_quantile <= 1.0:
            raise GrinError(f"GrinConfig.eps_quantile={self.eps_quantile!r} must lie in [0, 1].")
        if not self.ssd_alpha > 0:
            raise GrinError(f"GrinConfig.ssd_alpha={self.ssd_alpha!r} must be positive.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise GrinError(f"GrinConfig.seed={self.seed!r} must be an integer.")
        if (
            not isinstance(self.dense_threshold, (int, float))
            or isinstance(self.dense_threshold, bool)
            or not 0.0 <= self.dense_threshold <= 1.0
        ):
            raise GrinError(f"GrinConfig.dense_threshold={self.dense_threshold!r} must be a number in [0, 1].")
        if self.layers_pattern and not self.layers_to_transform:
            raise GrinError("GrinConfig: layers_pattern only makes sense together with layers_to_transform.")

    @property
    def budget_density(self) -> float:
        """The density to use when no absolute budget is given."""
        return DEFAULT_DENSITY if self.density is None else float(self.density)

    @property
    def selects_at_injection(self) -> bool:
        """Data-free scores select when the adapter is created; the others wait for `localize`."""
        return self.score in DATA_FREE_SCORES

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse unknown fields in a saved config: a typo must not silently change what a delta means."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise GrinError(f"adapter_config.json has unknown GrinConfig field(s): {', '.join(unknown)}.")
        return kwargs

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json by rename, so an interrupted save never leaves a truncated config."""
        import json
        import os

        from .delta_file import atomic_write_text

        if os.path.isfile(save_directory):
            raise GrinError(f"{save_directory} is a file; save_pretrained needs a directory.")
        os.makedirs(save_directory, exist_ok=True)
        output = {k: sorted(v) if isinstance(v, set) else v for k, v in self.to_dict().items()}
        if kwargs.get("auto_mapping_dict") is not None:
            output["auto_mapping"] = kwargs["auto_mapping_dict"]
        atomic_write_text(
            json.dumps(output, indent=2, sort_keys=True), os.path.join(save_directory, "adapter_config.json")
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a saved config and remember where it came from, so the delta file can be checked before injection."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")}
        object.__setattr__(config, "_grin_source", (pretrained_model_name_or_path, subfolder, hub_kwargs))
        return config


def _reject_unknown_fields(init):
    """Turn dataclass's TypeError for an unknown keyword into a GrinError that names it."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        known = {f.name for f in dataclasses.fields(GrinConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise GrinError(f"GrinConfig got unknown field(s): {', '.join(unknown)}.")
        init(self, *args, **kwargs)

    return wrapper


GrinConfig.__init__ = _reject_unknown_fields(GrinConfig.__init__)
