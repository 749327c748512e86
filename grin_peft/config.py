"""`GrinConfig`: every choice GRIN makes, documented, defaulted and validated in one place."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .errors import GrinError
from .module_patterns import _validate_module_patterns
from .peft_type import GRIN_PEFT_TYPE

SCORES = (
    "gradient_ratio",
    "random",
    "magnitude",
    "forget_gradient",
    "ssd",
    "wagle",
    "squared_ratio",
    "leverage_ratio",
    "retain_complement",
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
# a field that saved configs once held; the check level is now the loader's choice (grin_peft.loading)
RETIRED_FIELDS = ("fingerprint_check",)

DEFAULT_DENSITY = 1e-3

# The paper's stated score, |sum of forget gradients| / (|sum of retain gradients| + eps), in this package's fields:
# the signed-sum statistic of the gradients of the mean answer-token losses, and an absolute eps. The paper does not
# give eps; 1e-8 is a conventional small guard (see GrinConfig.paper for what it does on a converged model).
PAPER_PRESET = {
    "score": "gradient_ratio",
    "grad_statistic": "abs_sum",
    "normalization": "tokens",
    "eps_mode": "absolute",
    "eps": 1e-8,
}


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
                "How entries are scored. 'gradient_ratio' (GRIN: A_f / (A_r + eps)), 'leverage_ratio' (the ratio, "
                "ranked only among the top leverage_pool x budget entries by A_f), 'retain_complement' (the entries "
                "with the lowest A_r), 'random', 'magnitude' (|w|), 'forget_gradient' (SalUn), 'ssd' (Fisher ratio "
                "with alpha threshold), 'wagle', 'squared_ratio' (LoKU/FILA). GrinConfig.paper() is the paper's "
                "stated form. 'random' and 'magnitude' select when the adapter is created; the others select in "
                "`model.localize(forget, retain)`. See grin_peft/localize/scores.py for every formula."
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
    leverage_pool: float = field(
        default=4.0,
        metadata={
            "help": (
                "score='leverage_ratio' only: the ratio A_f / (A_r + eps) ranks only the candidates, the "
                "round(leverage_pool x budget) entries with the largest forget statistic A_f (all entries tied with "
                "the last one included; per module with selection='per_module'); no other entry is selected while "
                "a candidate is left. >= 1. 1 selects by A_f alone (the ratio only breaks ties), a pool as large as "
                "the model is the plain gradient ratio. Default 4 (a choice, not tuned on TOFU): the ratio picks a "
                "quarter of the top-A_f entries, so the selection keeps forget leverage (on TOFU the plain ratio's 1% "
                "held 1.5% of the forget mass; on the planted-sequence tests at 1%, pool 4 held 2.3x the plain "
                "ratio's forget mass)."
            )
        },
    )
    relocalize_every: int | None = field(
        default=None,
        metadata={
            "help": (
                "Re-localisation during training: every this many optimizer steps, rescore at the current weights "
                "(base + delta) with the same score and add relocalize_grow x budget new entries (trained entries "
                "keep their values; new ones start at 0). UnlearningTrainer does it by itself; with another "
                "transformers Trainer add grin_peft.relocalize.RelocalizeCallback(forget, retain). None (default): "
                "the support stays as localized."
            )
        },
    )
    relocalize_grow: float = field(
        default=0.1,
        metadata={
            "help": (
                "Entries added at each re-localisation, as a fraction of the initial budget (density x targeted "
                "entries, or num_entries), rounded, at least 1. > 0. Default 0.1."
            )
        },
    )
    relocalize_noise: bool = field(
        default=False,
        metadata={
            "help": (
                "True: entries added by re-localisation start at noise (noise_std in units of noise_scale) instead "
                "of 0. Default False: growing the support then does not change the model's output."
            )
        },
    )
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
    seed: int | None = field(
        default=None,
        metadata={
            "help": (
                "Seed for random selection and for the injected noise. None (default): drawn from torch's global RNG "
                "when the adapter is created (PEFT's convention: torch.manual_seed governs initialisation, and two "
                "adapters added one after the other differ) and recorded in the adapter's config. An integer gives "
                "the same selection and noise on the same base whatever torch's RNG state."
            )
        },
    )
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
                "base layers with hooks always stay sparse. Not used on the CPU fast path (a frozen nn.Linear with "
                "one active adapter, grin_peft.fused): there every density gets the merged layer's output without "
                "a copy, the delta written into the weight for each matmul."
            )
        },
    )

    @property
    def fingerprint_check(self) -> None:
        """Retired: the check level is the loader's choice, never stored in (or read from) a delta's config."""
        return None

    @fingerprint_check.setter
    def fingerprint_check(self, value: object) -> None:
        raise GrinError(
            "GrinConfig.fingerprint_check is no longer a config field (a downloaded config could switch the check "
            "off): choose the level when loading, PeftModel.from_pretrained(base, path, "
            "grin_fingerprint_check='warn'), `with grin_peft.fingerprint_check('warn'):` or GRIN_FINGERPRINT_CHECK."
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
        if not _is_real(self.eps_quantile) or not 0.0 <= self.eps_quantile <= 1.0:
            raise GrinError(f"GrinConfig.eps_quantile={self.eps_quantile!r} must lie in [0, 1].")
        if not _is_real(self.ssd_alpha) or not self.ssd_alpha > 0:
            raise GrinError(f"GrinConfig.ssd_alpha={self.ssd_alpha!r} must be positive.")
        if not _is_real(self.leverage_pool) or not math.isfinite(self.leverage_pool) or not self.leverage_pool >= 1:
            raise GrinError(f"GrinConfig.leverage_pool={self.leverage_pool!r} must be a finite number >= 1.")
        if self.relocalize_every is not None and (
            not isinstance(self.relocalize_every, int)
            or isinstance(self.relocalize_every, bool)
            or self.relocalize_every < 1
        ):
            raise GrinError(
                f"GrinConfig.relocalize_every={self.relocalize_every!r} must be a positive integer (optimizer steps) "
                "or None."
            )
        grow = self.relocalize_grow
        if not _is_real(grow) or not math.isfinite(grow) or not grow > 0:
            raise GrinError(f"GrinConfig.relocalize_grow={self.relocalize_grow!r} must be a finite number > 0.")
        if not isinstance(self.relocalize_noise, bool):
            raise GrinError(f"GrinConfig.relocalize_noise={self.relocalize_noise!r} must be True or False.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise GrinError(f"GrinConfig.seed={self.seed!r} must be an integer or None.")
        if (
            not isinstance(self.dense_threshold, (int, float))
            or isinstance(self.dense_threshold, bool)
            or not 0.0 <= self.dense_threshold <= 1.0
        ):
            raise GrinError(f"GrinConfig.dense_threshold={self.dense_threshold!r} must be a number in [0, 1].")
        _validate_module_patterns(self)
        if self.layers_pattern and self.layers_to_transform is None:
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
    def paper(cls, **overrides) -> GrinConfig:
        """The paper's stated score: |sum of forget gradients| / (|sum of retain gradients| + eps) per weight.

        That is ``score='gradient_ratio'`` with ``grad_statistic='abs_sum'`` (signed gradients summed over the data
        before the absolute value), ``normalization='tokens'`` (the gradients of the mean answer-token losses) and an
        absolute ``eps`` of 1e-8 (:data:`PAPER_PRESET`). The paper does not state eps; 1e-8 is a conventional small
        guard, not a tuned value. It is not negligible everywhere: on the tests' converged tiny Llama the median
        ``|mean retain gradient|`` was 3e-7 and 1% of entries lay below 5e-9, so eps still tempers the smallest
        denominators there. Pass ``eps=`` (with ``eps_mode='quantile'`` for one relative to a quantile of A_r) to
        choose another. Any other field is passed through, e.g.
        ``GrinConfig.paper(density=0.01, target_modules="all-linear")``. The package default (``GrinConfig()``)
        differs on purpose: summed gradients of a converged model cancel on retain data, and the ratio then selects
        entries with tiny denominators (research notes, section 8).
        """
        return cls(**{**PAPER_PRESET, **overrides})

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Read a saved config the way PEFT reads its own: an unknown field (written by a newer grin_peft) is ignored
        with a warning, so old code can still load new deltas; a misspelt peft_type is refused.

        What could make a delta unsafe stays strict elsewhere: every known field is validated (a bad value is a
        GrinError), the file's tensors are checked against the base, and the fingerprint check level is never read
        from the file. A config whose peft_type is another PEFT method is passed through untouched.
        """
        import warnings

        peft_type = kwargs.get("peft_type")
        if isinstance(peft_type, str) and peft_type != GRIN_PEFT_TYPE.value and peft_type.strip().upper() != "GRIN":
            return kwargs  # another method's config: PEFT's own rules apply
        if peft_type is not None and str(peft_type) != GRIN_PEFT_TYPE.value:
            raise GrinError(f"adapter_config.json: peft_type={peft_type!r}, a GRIN delta has peft_type 'GRIN'.")
        for name in RETIRED_FIELDS:
            if name in kwargs:
                warnings.warn(
                    f"adapter_config.json sets {name}={kwargs.pop(name)!r}; ignored: the fingerprint check level is "
                    "chosen by whoever loads the delta (grin_peft.fingerprint_check, GRIN_FINGERPRINT_CHECK), never "
                    "by the file.",
                    UserWarning,
                    stacklevel=2,
                )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(
                f"adapter_config.json has GrinConfig field(s) this grin_peft does not know: {', '.join(unknown)}; "
                "ignored (probably saved by a newer grin_peft: upgrade it to use them).",
                UserWarning,
                stacklevel=2,
            )
        return {k: v for k, v in kwargs.items() if k in known}

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
        if not isinstance(config, GrinConfig):
            return config  # another PEFT method's config
        hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")}
        object.__setattr__(config, "_grin_source", (pretrained_model_name_or_path, subfolder, hub_kwargs))
        return config


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class UnknownFieldError(GrinError, TypeError):
    """An unknown GrinConfig keyword: a TypeError as Python (and PEFT's forward-compatibility code) expect for an
    unexpected keyword argument, and a GrinError like every other bad input to grin_peft."""


def _reject_unknown_fields(init):
    """Name an unknown keyword in Python's words, as an `UnknownFieldError`."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        known = {f.name for f in dataclasses.fields(GrinConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UnknownFieldError(
                f"GrinConfig.__init__() got an unexpected keyword argument {unknown[0]!r}"
                + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
            )
        init(self, *args, **kwargs)

    return wrapper


GrinConfig.__init__ = _reject_unknown_fields(GrinConfig.__init__)
