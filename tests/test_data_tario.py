"""The shard tar reader against Python's ``tarfile``: every member type and format it writes."""

from __future__ import annotations

import io
import tarfile

import pytest

from vitpipe.data.tario import ShardError, TarCursor, UnsafeShardError, _Headers, _number


def _tar(members: list[tuple[str, bytes | str | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, data) files; data None: a directory; a str: a symlink to it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _data_end(raw: bytes) -> int:
    """Offset just past the last member (drop the end-of-archive blocks and record padding)."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _walk(raw: bytes) -> list[tuple[str, bytes, bytes]]:
    h = _Headers(io.BufferedReader(io.BytesIO(raw)))  # type: ignore[arg-type]
    out = []
    while (got := h.next()) is not None:
        name, kind, size = got
        out.append((name, kind, h.data() if size else b""))
    return out


def _reference(raw: bytes) -> list[tuple[str, bytes, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return [(ti.name, ti.type, tf.extractfile(ti).read() if ti.isreg() else b"")
                for ti in tf.getmembers()]


LONG = "d" * 60 + "/" + "k" * 90 + ".png"  # > 100 chars: pax path / GNU longname / ustar prefix
MEMBERS = [("a.cls", b"3"), ("a.png", b"\x89PNG" + bytes(range(256)) * 3), ("dir", None),
           (LONG, b"x" * 1000), ("empty.txt", b""), ("ünïcode.png", b"u" * 513)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
def test_headers_match_tarfile(fmt):
    raw = _tar(MEMBERS, fmt)
    got, ref = _walk(raw), _reference(raw)
    assert got == ref and [n for n, _, _ in got] == [n for n, _ in MEMBERS]


def test_skipping_data_and_missing_end_blocks():
    raw = _tar(MEMBERS)
    h = _Headers(io.BufferedReader(io.BytesIO(raw)))  # type: ignore[arg-type]
    names = []
    while (got := h.next()) is not None:  # never reads data: skipped by seek
        names.append(got[0])
    assert names == [n for n, _ in MEMBERS]
    assert [n for n, _, _ in _walk(raw[:_data_end(raw)])] == names  # tolerated, like tarfile


def test_numbers_octal_and_base256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"        ") == 0
    assert _number(bytes([0x80]) + (10**10).to_bytes(11, "big")) == 10**10  # > 8 GiB member


@pytest.mark.parametrize("field", [b"%07o\0", b"%08o", b" %06o\0", b"%06o  "])
def test_checksum_and_size_fields_as_other_writers_format_them(field):
    """tarfile writes "%06o\\0 "; other writers pad, space- or NUL-terminate differently."""
    raw = bytearray(_tar(MEMBERS[:3]))
    want = _walk(bytes(raw))
    for at in range(0, len(raw), 512):  # every header: a checksum field that tarfile accepts
        hdr = raw[at:at + 512]
        if hdr == bytes(512) or at >= _data_end(bytes(raw)):
            break
        try:
            tarfile.TarInfo.frombuf(bytes(hdr), "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            continue  # a data block
        chk = sum(hdr[:148]) + 256 + sum(hdr[156:])
        raw[at + 148:at + 156] = (field.decode() % chk).encode()
    assert _walk(bytes(raw)) == want
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:  # still valid for tarfile
        assert len(tf.getmembers()) == 3


@pytest.mark.parametrize("damage,match", [
    (lambda r: r[:2000], "unexpected end of data at byte"),  # inside a.png's data
    (lambda r: r[:1100], "unexpected end of data in the header"),
    (lambda r: r[:1024] + b"\x01" + r[1025:], "bad header checksum at byte 1024"),
    (lambda r: b"not a tar at all" * 64, "not a tar header at byte 0"),
])
def test_damage_is_a_value_error_with_the_offset(damage, match):
    raw = damage(_tar(MEMBERS[:3]))
    with pytest.raises(ValueError, match=match):
        _walk(raw)


def _cursor(tmp_path, raw: bytes) -> TarCursor:
    p = tmp_path / "s.tar"
    p.write_bytes(raw)
    return TarCursor(str(p), expected_bytes=len(raw))


def test_cursor_groups_samples_and_refuses_unsafe_members(tmp_path):
    raw = _tar([("k1.cls", b"1"), ("k1.png", b"p1"), ("__meta__", b"m"), ("k2.cls", b"2"),
                ("k2.png", b"p2"), ("k3.png", b"p3")])
    c = _cursor(tmp_path, raw)
    assert c.read(1) == ("k2", {"cls": b"2", "png": b"p2"})  # k1 skipped unread
    assert c.read(2) == ("k3", {"png": b"p3"}) and c.read(3) is None
    c.close()
    with pytest.raises(UnsafeShardError, match="is a link"):
        _cursor(tmp_path, _tar([("k1.png", "/etc/passwd")]))
    with pytest.raises(UnsafeShardError, match="absolute or '..' path"):
        _cursor(tmp_path, _tar([("../k1.png", b"x")]))
    with pytest.raises(ShardError, match="not a readable tar archive"):
        _cursor(tmp_path, b"\0\1" * 600)
    c = _cursor(tmp_path, _tar([("k1.png", b"x" * 600), ("k2.png", b"y" * 600)])[:2300])
    with pytest.raises(ShardError, match="truncated inside sample 'k2'"):
        c.read(1)
