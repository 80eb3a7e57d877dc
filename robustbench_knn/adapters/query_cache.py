"""Row-wise memo of a deterministic model's outputs, for toolkits that ask the model again about points it has
already answered.

ART's ``SquareAttack`` (1.20) makes three estimator calls per iteration: the prediction of the whole batch, the
margin of the still-robust points' current iterates and the margin of their candidates. Only the candidates are new
points, so two of the three calls repeat earlier queries; against a k-NN defense, whose every query costs a pass over
the training bank, that made ART's Square several times dearer than AutoAttack's, which keeps the current margins.
:class:`QueryCache` answers a row it has seen from its memo and sends only new rows to the model, so the attack's
arithmetic, its random draws and its result are those of the uncached attack.

A memo is only right for a model that answers one input the same way each time: the first call asks the model twice
about a few rows and, if the answers differ (a randomised defense), the memo is switched off for good. Calls that
need an input gradient always go to the model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

PROBE_ROWS = 4  # rows asked twice to tell a deterministic model from a randomised one


class QueryCache(torch.nn.Module):
    """``model`` behind a least-recently-used memo of ``capacity`` input rows, each verified byte for byte on a hit
    (the integer fingerprint only picks the candidate)."""

    def __init__(self, model: torch.nn.Module, capacity: int = 4096) -> None:
        super().__init__()
        self.model = model
        self.capacity = capacity
        self.n_classes = getattr(model, "n_classes", None)
        self.rows_computed = 0  # input rows the model was asked about (probe included)
        self.deterministic: bool | None = None  # None until the first call's probe
        self._memo: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._weights: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", torch.device("cpu"))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_computed += len(x)
        return self.model(x)

    def _fingerprints(self, flat: torch.Tensor) -> list[int]:
        """An integer per row from its exact bit pattern (wrapping int64 arithmetic: batch-independent)."""
        bits = flat.contiguous().view(torch.int32).to(torch.int64) if flat.dtype == torch.float32 \
            else flat.to(torch.float64).contiguous().view(torch.int64)
        if self._weights is None or self._weights.shape[0] != bits.shape[1] or self._weights.device != bits.device:
            gen = torch.Generator().manual_seed(0)
            self._weights = torch.randint(1, 2 ** 62, (bits.shape[1],), generator=gen).to(bits.device) | 1
        return (bits * self._weights).sum(1).tolist()

    def _probe(self, x: torch.Tensor) -> None:
        head = x[:PROBE_ROWS]
        self.deterministic = bool(torch.equal(self._run(head), self._run(head)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return self.model(x)
        if self.deterministic is None:
            self._probe(x)
        if not self.deterministic:
            return self._run(x)
        flat = x.reshape(len(x), -1)
        keys = self._fingerprints(flat)
        out: list[torch.Tensor | None] = [None] * len(x)
        missing: list[int] = []
        first_of: dict[int, int] = {}  # a row repeated within this call is computed once
        for i, key in enumerate(keys):
            hit = self._memo.get(key)
            if hit is not None and torch.equal(hit[0], flat[i]):
                self._memo.move_to_end(key)
                out[i] = hit[1]
            elif key in first_of and torch.equal(flat[first_of[key]], flat[i]):
                continue
            else:
                first_of.setdefault(key, i)
                missing.append(i)
        if missing:
            new = self._run(x[missing])
            for j, i in enumerate(missing):
                out[i] = new[j]
                self._memo[keys[i]] = (flat[i].clone(), new[j].detach().clone())
                self._memo.move_to_end(keys[i])
            while len(self._memo) > self.capacity:
                self._memo.popitem(last=False)
        for i, key in enumerate(keys):
            if out[i] is None:  # a repeat of a row computed above
                out[i] = out[first_of[key]]
        return torch.stack(out)  # type: ignore[arg-type]
