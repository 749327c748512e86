"""`Ledger`: apply, revert, show and verify the unlearning requests merged into a deployed model folder.

Every operation holds the folder's lock, reads and checks everything it needs (the ledger, the weight files against
their recorded digests, every delta it replays, the originals file, the model), computes the new weights in memory,
writes them to temporary files, and only then commits:

1. the ledger is rewritten with `pending` = the complete next ledger and the renames still to do (the commit point:
   before it, a failure leaves model and ledger as they were; after it, the operation completes);
2. the temporary weight files are renamed into place;
3. the next ledger replaces the pending one, the model card is updated and unused originals files are removed.

An operation interrupted between 1 and 3 is completed by the next `apply` or `revert` (its renames are redone from
the temporary files, checked by digest); `show` and `verify` report it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace

import torch

from ..errors import GrinError
from ..fingerprint import architecture, fingerprint
from ..loading import check_level
from . import files, record
from .card import card_lists, update_card
from .record import Record, Request
from .replay import (
    Entries,
    RequestDelta,
    differing_entries,
    extend_originals,
    file_sha256,
    fingerprint_of,
    read_delta,
    replay,
    resolve_source,
    step,
    uncovered,
    weight_of,
    write_state,
)


@dataclass
class VerifyReport:
    """What `verify` checked and every drift it found; `ok` when there is none."""

    folder: str
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"ok: {c}" for c in self.checks] + [f"DRIFT: {p}" for p in self.problems]
        verdict = "the model is what its ledger says" if self.ok else f"{len(self.problems)} problem(s)"
        return "\n".join([*lines, f"{self.folder}: {verdict}."])


def _load_model(folder: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    except Exception as exc:  # transformers raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrinError(f"cannot load the model in {folder}: {first}") from exc


def _policy(level: str, problem: str) -> None:
    if level == "error":
        raise GrinError(
            f"{problem} Refusing to apply it; pass fingerprint_check='warn' (CLI: --fingerprint-check warn) if you "
            "are sure."
        )
    if level == "warn":
        warnings.warn(problem, UserWarning, stacklevel=4)


class Ledger:
    """The unlearning ledger of one model folder (a `save_pretrained` folder with safetensors weights).

    Example:
        ```py
        >>> ledger = Ledger("deployed/")
        >>> ledger.apply("delta-author-17/", description="request #17: forget author X")
        >>> ledger.revert(2, reason="made in error")   # exactly as if request 2 had never been applied
        >>> print(ledger.verify())
        ```
    """

    def __init__(self, folder: str, *, lock_timeout: float | None = None) -> None:
        self.folder = os.path.abspath(folder)
        self.lock_timeout = lock_timeout

    # ---------------------------------------------------------------- reading
    def show(self) -> Record:
        """The ledger as recorded (a GrinError if the folder has none or it is corrupt)."""
        with files.locked(self.folder, self.lock_timeout, shared=True):
            return self._read()

    def _read(self) -> Record:
        found = record.read(self.folder)
        if found is None:
            raise GrinError(f"{self.folder}: no {record.LEDGER_NAME}; `apply` a first request to start one.")
        return found

    # ---------------------------------------------------------------- apply
    def apply(
        self,
        delta: str,
        *,
        description: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        fingerprint_check: str = "error",
    ) -> Request:
        """Merge a GRIN delta (local folder or Hub repo id) into the model and record it as the next request.

        The delta must have been made for the model as it is now (its fingerprint and base values), unless
        `fingerprint_check` is "warn" or "off"; its merge is `merge_and_unload`'s arithmetic, bit for bit.
        """
        level = check_level(fingerprint_check, "fingerprint_check")
        with files.locked(self.folder, self.lock_timeout):
            old = self._recover(record.read(self.folder))
            current = files.digests(self.folder)
            if old is not None:
                self._check_weights(old, current)
            source = resolve_source(delta, revision, subfolder)
            request_delta = read_delta(source)
            model = _load_model(self.folder)
            arch, before = architecture(model), fingerprint(model)
            if old is None:
                old = Record(arch, before, before, current, {})
            self._check_model(old, arch, before)
            bound = request_delta.bind(model)
            self._check_made_for(request_delta, bound, model, arch, before, level)
            originals = extend_originals(model, files.load_originals(self.folder, old.base_values), bound)
            start = {key: weight_of(model, key).detach().reshape(-1)[idx].cpu() for key, (idx, _) in originals.items()}
            state = step(start, originals, bound)
            for key, values in state.items():
                if not bool(values.float().isfinite().all()):
                    raise GrinError(f"{source.describe()}: {key}: merging would produce NaN/Inf weights; refusing.")
            after = fingerprint_of(model, originals, state)
            request = Request(
                id=old.next_id,
                description=description if description is not None else request_delta.forget_description or "",
                delta=source,
                delta_sha256=request_delta.sha256,
                entries=sum(int(idx.numel()) for idx, _ in bound.values()),
                modules=len(bound),
                applied_at=record.now(),
                fingerprint_before=before,
                fingerprint_after=after,
            )
            new = replace(
                old,
                next_id=old.next_id + 1,
                requests=[*old.requests, request],
                model_fingerprint=after,
                history=[*old.history, {"op": "apply", "request": request.id, "at": request.applied_at}],
            )
            self._commit(old, new, model, originals, state)
            return request

    @staticmethod
    def _check_made_for(delta: RequestDelta, bound: Entries, model, arch: str, before: str, level: str) -> None:
        """Refuse (or warn about) a delta made for another model or state: its recorded architecture, fingerprint
        and base values must be this model's now. One problem is reported: the others follow from it."""
        where = delta.source.describe()
        problem = None
        if delta.base_architecture and delta.base_architecture != arch:
            problem = f"{where}: the delta was made for a {delta.base_architecture} model, this one is {arch}."
        elif delta.base_fingerprint is None:
            problem = f"{where}: the delta records no base_model_fingerprint."
        elif delta.base_fingerprint != before:
            problem = (
                f"{where}: the delta was made for another state of the model (fingerprint mismatch: another base, "
                "or before/after other requests)."
            )
        for key, (idx, _) in bound.items():
            if problem is not None:
                break
            weight = weight_of(model, key)
            base = delta.modules[key.removesuffix(".weight")].base_values
            if not torch.equal(weight.detach().reshape(-1)[idx].cpu(), base.to(weight.dtype)):
                problem = f"{where}: the model's values differ from the delta's base values at {key}."
        if problem is not None:
            _policy(level, problem)

    # ---------------------------------------------------------------- revert
    def revert(self, request_id: int, *, reason: str = "") -> Record:
        """Remove request `request_id` (any one, not only the last): the weights become exactly those of applying
        the remaining requests, in order, to the original model. Needs the remaining requests' deltas, not the
        reverted one's."""
        with files.locked(self.folder, self.lock_timeout):
            old = self._recover(self._read())
            old.request(request_id)
            self._check_weights(old, files.digests(self.folder))
            remaining = [r for r in old.requests if r.id != request_id]
            deltas = [read_delta(r.delta, r.delta_sha256) for r in remaining]
            originals = files.load_originals(self.folder, old.base_values)
            model = _load_model(self.folder)
            self._check_model(old, architecture(model), fingerprint(model))
            bound = [d.bind(model) for d in deltas]
            for request, entries in zip(remaining, bound):
                key = uncovered(originals, entries)
                if key is not None:
                    raise GrinError(f"request {request.id}: entries in {key} have no recorded original value.")
            states = replay(originals, bound)
            prints = [fingerprint_of(model, originals, s) for s in states]
            if prints[0] != old.original_fingerprint:
                raise GrinError("the ledger's original values do not give the original model's fingerprint; refusing.")
            requests = [
                replace(r, fingerprint_before=prints[i], fingerprint_after=prints[i + 1])
                for i, r in enumerate(remaining)
            ]
            event = {"op": "revert", "request": request_id, "at": record.now(), "reason": reason}
            new = replace(old, requests=requests, model_fingerprint=prints[-1], history=[*old.history, event])
            return self._commit(old, new, model, originals, states[-1])

    # ---------------------------------------------------------------- verify
    def verify(self) -> VerifyReport:
        """Recompute the weight files' digests, the model's fingerprint and the value at every ledger entry, check
        every request's delta is still there unchanged, and report each drift (nothing is modified)."""
        report = VerifyReport(self.folder)
        with files.locked(self.folder, self.lock_timeout, shared=True):
            led = self._read()
            report.checks.append(f"ledger readable, digest intact ({len(led.requests)} request(s))")
            if led.pending is not None:
                report.problems.append("an operation was interrupted; the next apply or revert completes it")
            try:
                current = files.digests(self.folder)
            except GrinError as exc:
                report.problems.append(str(exc))
                return report
            for name in sorted(set(current) | set(led.weights)):
                if current.get(name) != led.weights.get(name):
                    report.problems.append(f"{name}: the weight file changed outside the ledger (sha256 mismatch)")
            if not report.problems:
                report.checks.append(f"{len(current)} weight file(s) byte-identical to the ledger's record")
            model = _load_model(self.folder)
            now = fingerprint(model)
            if now != led.model_fingerprint:
                report.problems.append("the model's fingerprint differs from the ledger's (sampled weights changed)")
            else:
                report.checks.append("model fingerprint matches")
            self._verify_entries(led, model, report)
            if not card_lists(self.folder, led):
                report.problems.append("README.md does not list the ledger's requests (model card out of date)")
        return report

    def _verify_entries(self, led: Record, model, report: VerifyReport) -> None:
        try:
            originals = files.load_originals(self.folder, led.base_values)
        except GrinError as exc:
            report.problems.append(str(exc))
            return
        bound, missing = [], []
        for request in led.requests:
            try:
                entries = read_delta(request.delta, request.delta_sha256).bind(model)
            except GrinError as exc:
                missing.append(request.id)
                report.problems.append(f"request {request.id}: {exc}")
                continue
            key = uncovered(originals, entries)
            if key is not None:
                missing.append(request.id)
                report.problems.append(f"request {request.id}: entries in {key} have no recorded original value")
            bound.append(entries)
        if missing:
            report.problems.append(f"entries not checked: request(s) {missing} cannot be replayed")
            return
        differing = differing_entries(model, originals, replay(originals, bound)[-1])
        for key, count in differing.items():
            touching = [r.id for r, b in zip(led.requests, bound) if key in b]
            report.problems.append(
                f"{key}: {count} ledger entries differ from the replay of the requests (requests touching it: "
                f"{touching or 'none, reverted ones only'}); an edit outside the ledger"
            )
        if not differing:
            entries = sum(int(idx.numel()) for idx, _ in originals.values())
            report.checks.append(f"all {entries:,} ledger entries equal the replay of {len(led.requests)} request(s)")

    # ---------------------------------------------------------------- commit
    def _check_weights(self, led: Record, current: dict[str, str]) -> None:
        for name in sorted(set(current) | set(led.weights)):
            if current.get(name) != led.weights.get(name):
                raise GrinError(
                    f"{os.path.join(self.folder, name)}: changed outside the ledger (sha256 mismatch); run "
                    "`grin-peft ledger verify` to see where. Refusing to build on an unrecorded edit."
                )

    @staticmethod
    def _check_model(led: Record, arch: str, now: str) -> None:
        if arch != led.architecture:
            raise GrinError(f"the folder's model is {arch}, the ledger was kept for {led.architecture}.")
        if now != led.model_fingerprint:
            raise GrinError("the model's fingerprint differs from the ledger's; refusing to build on it.")

    def _commit(self, old: Record, new: Record, model, originals: Entries, state) -> Record:
        write_state(model, originals, state)
        by_file: dict[str, list[str]] = {}
        for key, name in files.key_files(self.folder, sorted(state)).items():
            by_file.setdefault(name, []).append(key)
        temporaries: dict[str, str] = {}
        originals_file = None
        try:
            for name, keys in by_file.items():
                temporaries[name] = files.write_patched(self.folder, name, {k: weight_of(model, k) for k in keys})
            weights = {**old.weights, **{name: file_sha256(tmp) for name, tmp in temporaries.items()}}
            new = replace(new, weights=weights, base_values=files.save_originals(self.folder, originals))
            originals_file = new.base_values["file"]
            renames = {os.path.basename(tmp): name for name, tmp in temporaries.items()}
            pending = replace(old, pending={"record": record.to_dict(new), "renames": renames})
            record.write(self.folder, pending)
        except BaseException:
            for tmp in temporaries.values():
                if os.path.exists(tmp):
                    os.remove(tmp)
            if originals_file and originals_file != old.base_values.get("file"):
                path = os.path.join(self.folder, originals_file)
                if os.path.exists(path):
                    os.remove(path)
            raise
        return self._finish(pending)

    def _recover(self, led: Record | None) -> Record | None:
        return self._finish(led) if led is not None and led.pending is not None else led

    def _finish(self, led: Record) -> Record:
        """Complete a committed operation (see the module docstring), or drop one whose files never moved."""
        target = record.from_dict(led.pending["record"], f"{record.LEDGER_NAME} (pending operation)")
        renames = led.pending["renames"]
        done = []
        for tmp, name in renames.items():
            final, staged = os.path.join(self.folder, name), os.path.join(self.folder, tmp)
            if os.path.isfile(final) and file_sha256(final) == target.weights[name]:
                done.append(name)
            elif os.path.isfile(staged) and file_sha256(staged) == target.weights[name]:
                os.replace(staged, final)
                done.append(name)
        if len(done) != len(renames):
            untouched = all(file_sha256(os.path.join(self.folder, n)) == led.weights.get(n) for n in renames.values())
            if done or not untouched:
                raise GrinError(
                    f"{self.folder}: an interrupted ledger operation cannot be completed (its staged weight files "
                    "are gone and the weights are neither before nor after it)."
                )
            target = replace(led, pending=None)  # nothing moved: the operation never happened
        record.write(self.folder, target)
        update_card(self.folder, target)
        files.remove_unused_originals(self.folder, target.base_values.get("file"))
        return target
