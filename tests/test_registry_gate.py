"""The promotion gate's decision rules (pure function; the server tests cover recording)."""

from __future__ import annotations

import pytest

from vitpipe.registry.gate import Contender, decide

D = "a" * 64


def _decide(cand: float | None, champ: float | None, *, cand_digest: str | None = D,
            champ_digest: str | None = D, has_champ: bool = True, **kw):
    champion = Contender("1", champ, champ_digest) if has_champ else None
    return decide(Contender("2", cand, cand_digest), champion, metric="test_top1", **kw)


def test_no_champion_promotes_and_records_none_as_previous():
    d = _decide(0.5, None, has_champ=False)
    assert d.promoted and d.previous_champion is None and "no champion" in d.reason


@pytest.mark.parametrize(("cand", "champ", "margin", "promoted"), [
    (0.91, 0.90, 0.0, True),
    (0.90, 0.90, 0.0, False),  # equal never replaces
    (0.89, 0.90, 0.0, False),  # worse never replaces
    (0.92, 0.91, 0.01, True),  # exactly the margin (float slack: 0.92 - 0.91 != 0.01)
    (0.915, 0.91, 0.01, False),  # better, but by less than the margin
])
def test_margin_rules(cand, champ, margin, promoted):
    d = _decide(cand, champ, margin=margin)
    assert d.promoted is promoted, d.reason
    assert d.previous_champion == "1" and d.champion_value == champ and d.candidate_value == cand


def test_lower_is_better_inverts_the_comparison():
    assert _decide(0.2, 0.3, higher_is_better=False).promoted
    assert not _decide(0.3, 0.2, higher_is_better=False).promoted


def test_missing_candidate_metric_is_never_promoted():
    d = _decide(None, 0.5)
    assert not d.promoted and "no recorded metric" in d.reason
    assert not _decide(None, None, has_champ=False).promoted


@pytest.mark.parametrize(("cand_digest", "champ_digest"), [("b" * 64, D), (None, D), (D, None)])
def test_different_or_unknown_digest_is_not_compared_blindly(cand_digest, champ_digest):
    refused = _decide(0.99, 0.10, cand_digest=cand_digest, champ_digest=champ_digest)
    assert not refused.promoted and "not comparable" in refused.reason
    warned = _decide(0.01, 0.99, cand_digest=cand_digest, champ_digest=champ_digest,
                     digest_mismatch="promote_with_warning")
    assert warned.promoted and warned.warning and "digest" in warned.warning


def test_decision_tags_and_description_carry_everything_needed_for_rollback():
    d = _decide(0.93, 0.90, margin=0.01)
    tags = d.tags()
    assert tags["vitpipe.gate.promoted"] == "true"
    assert tags["vitpipe.gate.previous_champion"] == "1"
    assert float(tags["vitpipe.gate.candidate_value"]) == 0.93
    assert float(tags["vitpipe.gate.champion_value"]) == 0.90
    assert float(tags["vitpipe.gate.margin"]) == 0.01
    assert tags["vitpipe.gate.warning"] == ""
    text = d.description()
    assert "Promoted to champion" in text and "v1" in text and "0.93" in text and "0.9" in text
    assert "Not promoted" in _decide(0.5, 0.9).description()
