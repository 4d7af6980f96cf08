"""Dataset versions: a source that gained images becomes a new manifest that reuses the shards.

Beside the manifest the shard stage keeps a source index (``index-<digest>.json``, named in the
manifest's ``index``, written before the manifest so a run killed in between leaves the old
version whole): for each source split, the key and fingerprint (label, size, mtime) of every
sample the shards hold. When the source changes under the same settings, :func:`diff` says what
changed. Only additions are appended, as new shards; anything else (a changed or removed image,
a new class, a sample limit, a source that cannot fingerprint its samples) re-shards the whole
source. Either way the result is a new version whose manifest records its parent's digest, and
the parent manifest is kept beside it as ``manifest-<digest>.json`` (readable like any manifest
while its shards are there: always after an append, which deletes nothing). The test split is a
fixed holdout: images added to it are left out (and stay out of the index, so a later
``grow_test`` run picks them up) unless the config says ``grow_test``, so metrics of successive
versions stay comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .. import storage
from ..config.data import S3Config
from .manifest import Manifest


@dataclass
class Change:
    """What a changed source means for its shards."""

    added: dict[str, list[str]] = field(default_factory=dict)  # source split -> new keys
    ignored: dict[str, int] = field(default_factory=dict)  # new keys left out (test holdout)
    rebuild: str | None = None  # why the whole source must be re-sharded, else None

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.added.values())


def diff(old: dict[str, dict[str, str]] | None, new: dict[str, dict[str, str]] | None,
         *, grow_test: bool) -> Change:
    """Compare the shards' index ``old`` with the source's fingerprints ``new``."""
    if old is None:
        return Change(rebuild="the shards have no source index (no limit-free sharding by this "
                              "vitpipe wrote them)")
    if new is None:
        return Change(rebuild="the source cannot fingerprint its samples")
    change = Change()
    for split in sorted(set(old) | set(new)):
        before, now = old.get(split, {}), new.get(split, {})
        gone = [k for k in before if k not in now]
        edited = [k for k in before if k in now and now[k] != before[k]]
        if gone or edited:
            what = gone[:3] + edited[:3]
            return Change(rebuild=f"{len(gone)} image(s) removed and {len(edited)} changed in "
                                  f"source split '{split}' (e.g. {', '.join(what)})")
        fresh = [k for k in now if k not in before]
        if not fresh:
            continue
        if split == "test" and not grow_test:
            change.ignored[split] = len(fresh)
        else:
            change.added[split] = fresh
    return change


def goes_to_val(key: str, seed: int, fraction: float) -> bool:
    """Where a newly added train image goes when val is carved from train: a hash of its key,
    so the choice never changes and needs no state."""
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16)
    return h / 16 ** 12 < fraction


def read_index(m: Manifest, s3: S3Config | None = None) -> dict[str, dict[str, str]] | None:
    """Manifest ``m``'s source index; None when it has none or it is gone."""
    if not m.index:
        return None
    try:
        return json.loads(storage.read_text(storage.join(m.base, m.index), s3))
    except storage.StorageNotFound:
        return None


def write_index(base: str, digest: str, index: dict[str, dict[str, str]],
                s3: S3Config | None = None) -> str:
    """Write the index of the manifest with ``digest``; returns its name relative to ``base``."""
    name = f"index-{digest}.json"
    storage.write_text(storage.join(base, name), json.dumps(index, sort_keys=True), s3)
    return name


def archive(m: Manifest, base: str, s3: S3Config | None = None) -> str:
    """Keep a copy of manifest ``m`` as ``manifest-<digest>.json``; returns its URI."""
    uri = storage.join(base, f"manifest-{m.digest}.json")
    storage.write_text(uri, m.model_dump_json(indent=1), s3)
    return uri
