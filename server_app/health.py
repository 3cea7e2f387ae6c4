"""Say when a run diverges or collapses, instead of ending "completed" with a useless model.

Checked after every round's central evaluation, in every mode (only released quantities are
used: the central loss and predictions on the server's own held-out data, and, without DP, the
clients' mean training loss):

* diverging: a loss that is not finite, or above ``LOSS_LIMIT`` times that of a uniform guess
  over the K classes (ln K);
* collapsed: the model predicts one class for every held-out example while they have several;
* diverged: the run stopped because updates or the aggregate held NaN/Inf;
* noise-swamped (before round 1, user-level DP): the planned noise is larger than anything the
  clients could contribute (:mod:`common.privacy.signal`).

Each kind of problem is reported once in ``summary.json``'s ``warnings`` (at the first round it
appears) and on every progress line while it lasts.
"""

from __future__ import annotations

import math

LOSS_LIMIT = 10.0


class RunHealth:
    def __init__(self, num_classes: int, classes_in_test: int):
        self.uniform_loss = math.log(max(num_classes, 2))
        self.classes_in_test = classes_in_test
        self.warnings: list[str] = []
        self._kinds: set[str] = set()

    def check(self, server_round: int, central_loss: float | None, train_loss: float | None,
              predicted_classes: int) -> list[str]:
        """This round's problems (short text for the progress line); the first of each kind is kept."""
        found = {}
        for name, loss in (("central", central_loss), ("training", train_loss)):
            if loss is not None and not (math.isfinite(loss) and loss <= LOSS_LIMIT * self.uniform_loss):
                found[f"diverging-{name}"] = (
                    f"round {server_round}: the {name} loss {loss:.4g} is {'not finite' if not math.isfinite(loss) else 'exploding'}"
                    f" (a uniform guess scores {self.uniform_loss:.3g}): the model is diverging; lower learning-rate, "
                    "or for your own table check its columns"
                )
        if predicted_classes == 1 and self.classes_in_test > 1:
            found["collapsed"] = (
                f"round {server_round}: the model predicts one class for every held-out example "
                f"({self.classes_in_test} classes there): it has collapsed; lower learning-rate or the noise"
            )
        return self._keep(found)

    def before_training(self, kind: str, text: str) -> None:
        """A problem foreseen from the plan alone, said before any round runs."""
        self._keep({kind: text})

    def diverged(self, server_round: int, why: str) -> None:
        """The run stopped because training broke down (NaN/Inf updates or aggregate)."""
        self._keep({"diverged": f"round {server_round}: training diverged and the run stopped: {why}; lower learning-rate"})

    def _keep(self, found: dict[str, str]) -> list[str]:
        for kind, text in found.items():
            if kind not in self._kinds:
                self._kinds.add(kind)
                self.warnings.append(text)
        return [kind for kind in found]
