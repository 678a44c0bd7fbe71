"""What an LRP pass did with every relevance-carrying op: the rule that handled it, or none."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Coverage"]


@dataclass(frozen=True)
class Coverage:
    """The coverage of one LRP pass.

    Attributes
    ----------
    preset:
        Name of the rule registry the pass ran with.
    handled:
        ``{(op, rule): calls}`` for every relevance-carrying op a rule handled (``"gradient
        (linear)"`` for ops that are linear in their relevance-carrying argument).
    uncovered:
        ``{op: calls}`` for the relevance-carrying ops no rule matched and that are not linear:
        their relevance is plain gradient x input, which is not what the preset prescribes.
    where:
        ``{op: ("module.path (ModuleType)", ...)}``: the modules the uncovered calls ran in.
    """

    preset: str
    handled: dict[tuple[str, str], int] = field(default_factory=dict)
    uncovered: dict[str, int] = field(default_factory=dict)
    where: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """``True`` when every relevance-carrying op was handled."""
        return not self.uncovered

    def rule_of(self, op: str) -> list[str]:
        """The rules that handled ``op`` (``["NO RULE"]`` when none did)."""
        rules = [rule for (o, rule) in self.handled if o == op]
        return rules + (["NO RULE"] if op in self.uncovered else [])

    def report(self) -> str:
        """The coverage table: one row per (op, rule), uncovered ops marked ``NO RULE``."""
        rows = [("op", "rule", "calls")]
        for (op, rule), n in sorted(self.handled.items()):
            rows.append((op, rule, str(n)))
        for op, n in sorted(self.uncovered.items()):
            places = self.where.get(op, ())
            rows.append((op, "NO RULE", str(n) + (f"  in {places[0]}" + (" ..." if len(places) > 1 else "") if places else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    def __str__(self) -> str:
        return self.report()
