"""The promotion gate's decision, as a pure function, and how a decision is recorded.

A candidate takes ``champion`` only when its primary metric beats the champion's by more than
zero and by at least ``margin``, measured on the same test split (same eval digest). With no
champion it is promoted; equal or worse never replaces the champion; different or unknown
digests are not compared blindly: ``refuse`` (default) or ``promote_with_warning``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

TAG = "vitpipe.gate."  # prefix of the decision tags on a model version
_EPS = 1e-12  # float slack so that 0.92 - 0.91 counts as a 0.01 improvement


@dataclass(frozen=True)
class Contender:
    """What the gate needs to know about one model version."""

    version: str
    value: float | None  # the primary metric, None when not recorded
    digest: str | None  # eval (test-split) digest the metric was measured on


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    higher_is_better: bool
    margin: float
    candidate_version: str
    candidate_value: float | None
    champion_value: float | None
    candidate_digest: str | None
    champion_digest: str | None
    previous_champion: str | None  # the champion before this decision (rollback target)
    warning: str | None = None
    decided_at: float = 0.0
    # the champion re-evaluated on the candidate's test split: that run, and what the champion
    # had recorded before ("<value> on <digest>")
    champion_eval_run: str | None = None
    champion_recorded: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """Version tags (strings; absent values as empty strings so every key is present).
        The candidate's own version number is the version itself, so it is not repeated."""
        return {f"{TAG}{k}": "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.as_dict().items() if k != "candidate_version"}

    def description(self) -> str:
        """Human-readable decision for the version's description in the registry UI."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.decided_at))
        head = "Promoted to champion" if self.promoted else "Not promoted"
        prev = f"v{self.previous_champion}" if self.previous_champion else "none"
        lines = [
            f"{head} at {when}: {self.reason}.",
            f"metric {self.metric} ({'higher' if self.higher_is_better else 'lower'} is better,"
            f" margin {self.margin:g}): candidate {_fmt(self.candidate_value)}, champion "
            f"{_fmt(self.champion_value)}; previous champion: {prev}.",
            f"test digest: candidate {self.candidate_digest or 'unknown'}, champion "
            f"{self.champion_digest or 'n/a'}.",
        ]
        if self.champion_eval_run:
            lines.append(f"The champion was re-evaluated on the candidate's test split (MLflow "
                         f"run {self.champion_eval_run}); it had recorded "
                         f"{self.champion_recorded or 'n/a'}.")
        if self.warning:
            lines.append(f"WARNING: {self.warning}")
        if self.promoted and self.previous_champion:
            lines.append(f"Rollback: vitpipe.registry.rollback() moves champion back to "
                         f"v{self.previous_champion}.")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def decide(candidate: Contender, champion: Contender | None, *, metric: str,
           higher_is_better: bool = True, margin: float = 0.0,
           digest_mismatch: str = "refuse") -> Decision:
    """Decide whether ``candidate`` replaces ``champion`` (see module docstring)."""

    def result(promoted: bool, reason: str, warning: str | None = None) -> Decision:
        return Decision(
            promoted=promoted, reason=reason, metric=metric, higher_is_better=higher_is_better,
            margin=margin, candidate_version=candidate.version, candidate_value=candidate.value,
            champion_value=champion.value if champion else None,
            candidate_digest=candidate.digest,
            champion_digest=champion.digest if champion else None,
            previous_champion=champion.version if champion else None, warning=warning,
            decided_at=time.time())

    if champion is not None and champion.version == candidate.version:
        return result(False, f"v{candidate.version} is already the champion")
    if candidate.value is None:
        return result(False, f"candidate has no recorded metric '{metric}' (was it evaluated?)")
    if champion is None:
        return result(True, "no champion yet")
    problem = None
    if champion.value is None:
        problem = f"champion v{champion.version} has no recorded '{metric}'"
    elif not candidate.digest or not champion.digest:
        problem = "the test-split digest is unknown for " + (
            "the candidate" if not candidate.digest else f"champion v{champion.version}")
    elif candidate.digest != champion.digest:
        problem = (f"metrics were measured on different test splits (digest "
                   f"{candidate.digest[:12]} vs {champion.digest[:12]})")
    if problem:
        if digest_mismatch == "promote_with_warning":
            return result(True, f"promoted without comparison: {problem}",
                          warning=f"{problem}; promoted by digest_mismatch=promote_with_warning")
        return result(False, f"not comparable: {problem} (digest_mismatch=refuse)")
    assert champion.value is not None
    gain = candidate.value - champion.value
    if not higher_is_better:
        gain = -gain
    verdict = (f"{metric} {candidate.value:.6g} vs champion v{champion.version}'s "
               f"{champion.value:.6g}: improvement {gain:+.6g}, margin {margin:g}")
    if gain > 0 and gain >= margin - _EPS:
        return result(True, f"beats the champion: {verdict}")
    return result(False, f"does not beat the champion: {verdict}")
