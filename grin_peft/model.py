"""`GrinModel`: the PEFT tuner that injects GRIN layers, selects their entries, and guards loading and merging."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import loading
from .base_checks import apply_fingerprint_policy, check_base, check_delta, check_other_tensors, loaded_modules_to_save
from .config import GrinConfig
from .delta_file import (
    PEFT_PREFIX,
    encode_entries,
    group_modules,
    validate_modules,
    with_indices,
)
from .errors import GrinError
from .fingerprint import architecture, check_shapes, fingerprint
from .layer import GrinLayer, Linear, validate_entries
from .localize.select import per_module_budgets, resolve_budget, select_global, select_per_module
from .noise import module_generator, noise_values
from .targeting import target_module_exists


def _is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _strip_prefix(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


class GrinModel(BaseTuner):
    """Creates a GRIN model from a transformers (or any torch) model.

    Example:
        ```py
        >>> import grin_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, grin_peft.GrinConfig(target_modules="all-linear", density=1e-3))
        >>> model.localize(forget_data, retain_data)  # gradient-ratio selection + noise
        ```
    """

    prefix: str = "grin_"
    tuner_layer_cls = GrinLayer
    target_module_mapping: dict = {}

    # ---------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: GrinConfig, model_config: dict) -> GrinConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _own_config(self, adapter_name: str) -> GrinConfig:
        """Give the adapter its own copy of the config it was created with: GRIN writes the base fingerprint and the
        drawn seed into it, and the caller's config must stay reusable for other models (as with LoRA)."""
        config = copy.deepcopy(self.peft_config[adapter_name])
        self.peft_config[adapter_name] = config
        return config

    def _pre_injection_hook(self, model: nn.Module, config: GrinConfig, adapter_name: str) -> None:
        """Fingerprint a new base, or check a saved delta against this base before anything is wrapped.

        A load (a `PeftModel.from_pretrained`/`load_adapter` call, or a config from `GrinConfig.from_pretrained`)
        always reads the delta file once, verifies its checksum and consistency and checks it against this base; a
        delta without a fingerprint is a load too, and needs the loader's explicit opt-in. A new adapter whose config
        already names a base (one copied from another adapter) must name this one: GRIN's fingerprint refusal.
        """
        config = self._own_config(adapter_name)
        if config.seed is None:  # PEFT's convention: torch's RNG decides, and the draw is recorded
            config.seed = int(torch.randint(2**31 - 1, ()))
        self._grin_prechecked = getattr(self, "_grin_prechecked", set())
        self._grin_prechecked.add(adapter_name)
        arch = architecture(model)
        self._grin_loading = getattr(self, "_grin_loading", set())
        scope = loading.claim_scope(adapter_name)
        source = getattr(config, "_grin_source", None)
        if scope is None and source is None:
            if config.base_model_fingerprint is not None:
                check_base(model, config, arch, loading.resolve_level())
            config.base_model_fingerprint = fingerprint(model)
            config.base_model_architecture = arch
            return
        self._grin_loading.add(adapter_name)
        if scope is None:
            path, subfolder, hub_kwargs = source
            scope = loading.LoadScope(path, adapter_name, subfolder, hub_kwargs, None)
        scope.grin, scope.tuner = True, self
        level = loading.resolve_level()
        tensors = loading.read_delta(scope, config)
        check_shapes(model, scope.metadata)
        check_base(model, config, arch, level)
        check_delta(model, config, tensors, arch, level)
        scope.tensors = tensors

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """PEFT's injection, then GRIN's data-free selection. PEFT runs the injection hooks only when the tuner is
        created, so an adapter added later (`add_adapter`, `load_adapter`) gets the same checks here, before anything
        is wrapped, and its entries here too; a selection that fails removes the adapter again."""
        prechecked = getattr(self, "_grin_prechecked", set())
        if adapter_name in prechecked:
            prechecked.discard(adapter_name)
        else:
            try:
                self._pre_injection_hook(model, self.peft_config[adapter_name], adapter_name)
            finally:
                self._grin_prechecked.discard(adapter_name)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except ValueError as exc:
            if isinstance(exc, GrinError) or "not found in the base model" not in str(exc):
                raise
            raise GrinError(f"GRIN target_modules matched nothing in the model: {exc}") from exc
        if adapter_name in self._grin_loading:  # a saved delta: its entries come from the file
            self._grin_loading.discard(adapter_name)
            return
        config = self.peft_config[adapter_name]
        if config.selects_at_injection:
            try:
                self.select_entries(adapter_name, self._data_free_score(config))
            except Exception:
                self._discard_adapter(self, adapter_name)
                raise

    @staticmethod
    def _check_target_module_exists(peft_config: GrinConfig, key: str) -> Any:
        """PEFT's module matching with `layers_to_transform` applied to every form of target_modules
        (`grin_peft.targeting`)."""
        return target_module_exists(peft_config, key)

    def _create_and_replace(
        self,
        grin_config: GrinConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, GrinLayer):
            target.update_layer(adapter_name, grin_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _is_supported_base(base):
            raise GrinError(
                f"{current_key}: GRIN adapts torch.nn.Linear and transformers Conv1D layers, not "
                f"{type(base).__name__}."
            )
        new_module = Linear(target, adapter_name, grin_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ---------------------------------------------------------------- selection
    def grin_layers(self, adapter_name: str | None = None) -> dict[str, GrinLayer]:
        """GRIN layers by module name (relative to the base model), optionally only those holding an adapter."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, GrinLayer) and (adapter_name is None or adapter_name in module.grin_values)
        }

    def _data_free_score(self, config: GrinConfig):
        layers = self.grin_layers()
        if config.score == "magnitude":
            return lambda name: layers[name]._grin_weight().detach().abs()
        return lambda name: torch.rand(
            layers[name].grin_numel, generator=module_generator(config.seed, name, "select")
        )

    def select_entries(self, adapter_name: str, score_fn) -> dict[str, torch.Tensor]:
        """Select entries under the adapter's budget from per-module scores, then initialise values with noise.

        Everything is computed before the first layer changes, so a failure leaves the adapter as it was.
        """
        config = self.peft_config[adapter_name]
        layers = self.grin_layers(adapter_name)
        numels = {name: layer.grin_numel for name, layer in layers.items()}
        k = resolve_budget(numels, None if config.num_entries else config.budget_density, config.num_entries)
        if config.selection == "global":
            selected = select_global(numels, score_fn, k)
        else:
            selected = select_per_module(numels, score_fn, per_module_budgets(numels, k))
        self.set_entries(adapter_name, selected)
        return selected

    def set_entries(
        self, adapter_name: str, selected: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Point every layer of the adapter at its selected entries, with initial values = noise (+ given values)."""
        config = self.peft_config[adapter_name]
        layers = self.grin_layers(adapter_name)
        unknown = sorted(set(selected) - set(layers))
        if unknown:
            raise GrinError(f"no GRIN layer named {unknown[0]} for adapter '{adapter_name}'.")
        plan = {}
        for name, layer in layers.items():
            idx = selected.get(name, torch.zeros(0, dtype=torch.long)).long()
            weight = layer._grin_weight()
            init = values[name].float().cpu() if values and name in values else torch.zeros(idx.numel())
            if not config.init_weights:
                init = init + torch.randn(idx.numel(), generator=module_generator(config.seed, name, "init"))
            init = init + noise_values(weight, idx, config.noise_std, config.noise_scale, config.seed, name)
            validate_entries(name, idx, init, layer.grin_numel)
            plan[name] = (idx, init)
        for name, (idx, init) in plan.items():
            layers[name].set_grin_entries(adapter_name, idx, init, module_name=name)

    def grow_entries(
        self, adapter_name: str, added: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None
    ) -> dict[str, tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        """Add entries to an adapter, keeping its entries and their trained values (re-localisation).

        ``added`` maps module names to new flat indices (none already selected), ``values`` to their initial values
        (default 0; no noise is added here). Everything is checked before the first layer changes. Returns, per grown
        module, ``(old Parameter, new Parameter, positions of the old entries in the new one)``: an optimizer holding
        the old Parameter must be pointed at the new one (:func:`grin_peft.relocalize.replace_in_optimizer`).
        """
        layers = self.grin_layers(adapter_name)
        plan = {}
        for name, idx in added.items():
            if name not in layers:
                raise GrinError(f"no GRIN layer named {name} for adapter '{adapter_name}'.")
            layer = layers[name]
            if adapter_name in layer.merged_adapters:
                raise GrinError(f"{name}: unmerge adapter '{adapter_name}' before growing it.")
            idx = idx.detach().long().cpu()
            init = values[name].detach().float().cpu() if values and name in values else torch.zeros(idx.numel())
            validate_entries(name, idx, init, layer.grin_numel)
            if bool(torch.isin(idx, layer.grin_indices[adapter_name].long().cpu()).any()):
                raise GrinError(f"{name}: some entries to add are already in adapter '{adapter_name}'.")
            if idx.numel():
                plan[name] = (idx, init)
        grown = {}
        for name, (idx, init) in plan.items():
            old = layers[name].grin_values[adapter_name]
            positions = layers[name].grow_grin_entries(adapter_name, idx, init, module_name=name)
            grown[name] = (old, layers[name].grin_values[adapter_name], positions)
        return grown

    def localize(self, forget, retain=None, adapter_name: str | None = None, **kwargs: Any):
        """Score entries on forget/retain data, select the budget, inject noise; see `grin_peft.localize.localize`."""
        from .localize.pipeline import localize

        return localize(self, forget, retain, adapter_name=adapter_name or self.active_adapters[0], **kwargs)

    def num_entries(self, adapter_name: str | None = None) -> dict[str, int]:
        """Trained entries per module for an adapter (default: the active one)."""
        adapter_name = adapter_name or self.active_adapters[0]
        return {name: layer.grin_num_entries(adapter_name) for name, layer in self.grin_layers(adapter_name).items()}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's `autocast_adapter_dtype` for GRIN: trained values in float32 on 16-bit bases (True, the default)
        or in the base weight's dtype (False). The recorded base values keep the weight's dtype either way: they are
        its exact entries."""
        for layer in self.grin_layers(adapter_name).values():
            layer.cast_grin_values(adapter_name, autocast_adapter_dtype)

    # ---------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into the base weights in two phases: validate every layer, then write; never half merged."""
        self._check_merge_allowed()
        from peft.tuners.tuners_utils import check_adapters_to_merge

        plans = []
        for name, layer in self.grin_layers().items():
            names = check_adapters_to_merge(layer, adapter_names)
            plans.append((layer, layer.grin_merge_plan(names, safe_merge, module_name=name), names))
        for layer, plan, names in plans:
            layer.grin_apply_merge(plan, names)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            for name, layer in self.grin_layers().items():
                layer.grin_merge_plan(check_adapters_to_merge(layer, adapter_names), safe_merge, module_name=name)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """A new adapter whose delta is sum_i weights[i] * delta_i over the union of the adapters' entries."""
        if not adapters or len(adapters) != len(weights):
            raise GrinError("add_weighted_adapter needs as many weights as adapters, and at least one adapter.")
        for name in adapters:
            if name not in self.peft_config or not isinstance(self.peft_config[name], GrinConfig):
                raise GrinError(f"add_weighted_adapter: '{name}' is not a GRIN adapter of this model.")
        if adapter_name in self.peft_config:
            raise GrinError(f"add_weighted_adapter: an adapter named '{adapter_name}' already exists.")
        if any(name in layer.merged_adapters for layer in self.grin_layers().values() for name in adapters):
            raise GrinError("add_weighted_adapter: unmerge the adapters first.")
        combined_idx, combined_values = {}, {}
        for module_name, layer in self.grin_layers().items():
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.grin_values]
            if not present:
                continue
            all_idx = torch.cat([layer.grin_indices[a].long().cpu() for a, _ in present])
            union = torch.unique(all_idx, sorted=True)
            total = torch.zeros(union.numel(), dtype=torch.float32)
            for a, w in present:
                idx = layer.grin_indices[a].long().cpu()
                total.index_add_(
                    0, torch.searchsorted(union, idx), float(w) * layer.grin_values[a].detach().float().cpu()
                )
            combined_idx[module_name], combined_values[module_name] = union, total
        config = copy.deepcopy(self.peft_config[adapters[0]])
        config.density, config.num_entries = None, max(1, sum(v.numel() for v in combined_values.values()))
        config.noise_std, config.init_weights = 0.0, True
        config.forget_description = " + ".join(f"{w} x {a}" for a, w in zip(adapters, weights))
        self.peft_config[adapter_name] = config
        for module_name in combined_idx:
            layer = self.model.get_submodule(module_name)
            layer.update_layer(adapter_name, config)
            layer.set_grin_entries(
                adapter_name, combined_idx[module_name], combined_values[module_name], module_name=module_name
            )
            layer.grin_values[adapter_name].requires_grad_(False)

    # ---------------------------------------------------------------- saving and loading
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of this adapter's tensors, refusing NaN values and storing each module's entries in
        their smaller form (index list or bitmask, see `delta_file`)."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for key, tensor in to_return.items():
            if key.endswith(f"grin_values.{adapter_name}") and not bool(torch.isfinite(tensor).all()):
                raise GrinError(f"{key}: NaN/Inf values; refusing to save a broken delta.")
        indices_suffix = f".grin_indices.{adapter_name}"
        for key in [k for k in to_return if k.endswith(indices_suffix)]:
            module = key.removesuffix(indices_suffix)
            form, tensor = encode_entries(to_return[key], model.get_submodule(module).grin_numel)
            if form == "grin_mask":
                del to_return[key]
                to_return[f"{module}.grin_mask.{adapter_name}"] = tensor
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Validate a loaded delta against the model, size each layer's buffers to it, decode bitmasks into the index
        buffers layers hold, then map keys as PEFT does.

        If anything is wrong, the half-loaded adapter is removed again so the model is as it was.
        """
        tuner = model.base_model if hasattr(model, "base_model") and isinstance(model.base_model, cls) else model
        layers = {
            _strip_prefix(name): module
            for name, module in model.named_modules()
            if isinstance(module, GrinLayer) and adapter_name in module.grin_values
        }
        try:
            modules, others = group_modules(state_dict)
            check_other_tensors(others, loaded_modules_to_save(model, adapter_name))
            missing = sorted(set(layers) - set(modules))
            if missing:
                raise GrinError(
                    f"{missing[0]}: the delta file lacks this module's tensors (grin_indices or grin_mask, "
                    "grin_values, grin_base_values)."
                )
            weight_of = lambda name: layers[name]._grin_weight() if name in layers else None  # noqa: E731
            entries, differing = validate_modules(
                modules,
                weight_of,
                architecture(getattr(tuner, "model", model)),
                lambda name: layers[name].grin_quantization is not None,
            )
            merged = [n for n in differing if layers[n].merged_adapters]
            if len(merged) != len(differing):
                apply_fingerprint_policy(
                    loading.resolve_level(),
                    "The base weights differ at the delta's entries: the delta was made for another base.",
                )
        except GrinError:
            cls._discard_adapter(tuner, adapter_name)
            raise
        for name, delta in modules.items():
            layers[name].resize_grin_entries(adapter_name, entries[name].numel(), delta.base_values.dtype)
        return super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, with_indices(state_dict, entries)
        )

    @staticmethod
    def _discard_adapter(tuner: GrinModel, adapter_name: str) -> None:
        """Undo an injection whose weights turned out to be unusable."""
        if not isinstance(tuner, GrinModel) or adapter_name not in tuner.peft_config:
            return
        if len(tuner.peft_config) == 1:
            tuner._unload_and_optionally_merge(merge=False)
        else:
            tuner.delete_adapter(adapter_name)
