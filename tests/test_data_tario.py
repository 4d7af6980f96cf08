"""The shard tar reader against Python's ``tarfile`` and WebDataset's grouping: every member
type and header layout it meets, both of its parsers (numpy runs and the general one), chunk
boundaries anywhere, skipping, and damage."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from vitpipe.data import tario
from vitpipe.data.tario import ShardError, TarCursor, UnsafeShardError, _number


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


def _reference(raw: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Samples as tarfile reads the members and WebDataset groups them: the key is the name up
    to the first dot of its last component (names without such a dot, or "__*", are skipped);
    consecutive members with one key are one sample; extensions lower-cased."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for ti in tf.getmembers():
            if not ti.isreg():
                continue
            slash = ti.name.rfind("/") + 1
            dot = ti.name.find(".", slash)
            if dot <= slash or ti.name.startswith("__", slash):
                continue
            key, ext = ti.name[:dot], ti.name[dot + 1:].lower()
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(ti).read()
    return out


def _cursor(tmp_path, raw: bytes, name: str = "s.tar") -> TarCursor:
    p = tmp_path / name
    p.write_bytes(raw)
    return TarCursor(str(p), expected_bytes=len(raw))


def _read_all(tmp_path, raw: bytes, every: int = 1) -> list[tuple[str, dict[str, bytes]]]:
    c = _cursor(tmp_path, raw)
    out = []
    i = 0
    while got := c.read_many(i, 1):
        out += got
        i += every
    c.close()
    return out


LONG = "d" * 60 + "/" + "k" * 90 + ".png"  # > 100 chars: pax path / GNU longname / ustar prefix
MEMBERS = [("a.cls", b"3"), ("a.png", b"\x89PNG" + bytes(range(256)) * 3), ("dir", None),
           (LONG, b"x" * 1000), ("empty.txt", b""), ("ünïcode.png", b"u" * 513),
           ("__meta__", b"m"), ("noext", b"n"), ("sub/.hidden", b"h"), ("d.x/k.JPG", b"j"),
           ("d.x/k.cls", b"7"), ("a..b.png", b"ok: '..' inside a name, not a path part")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
def test_samples_match_tarfile_and_webdataset(tmp_path, fmt):
    raw = _tar(MEMBERS, fmt)
    got = _read_all(tmp_path, raw)
    assert got == _reference(raw)
    assert [k for k, _ in got] == ["a", "d" * 60 + "/" + "k" * 90, "empty", "ünïcode", "d.x/k",
                                   "a"]
    assert got[-2][1] == {"jpg": b"j", "cls": b"7"}
    # the ordinary ones exactly as webdataset's own reader groups them
    from webdataset.tariterators import group_by_keys, tar_file_expander

    plain = _tar([m for m in MEMBERS if m[1] is not None and m[0].isascii() and len(m[0]) < 99
                  and "/." not in m[0]], fmt)
    wds = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
           for s in group_by_keys(tar_file_expander([{"url": "x", "stream": io.BytesIO(plain)}]))]
    assert _read_all(tmp_path, plain) == [s for s in wds if s[1]]


@pytest.mark.parametrize("general_only", [False, True], ids=["both-parsers", "general-parser"])
@pytest.mark.parametrize("chunk", [512, 1024, 1536, 4096, 1 << 20])
def test_random_shards_at_any_chunk_boundary(tmp_path, monkeypatch, chunk, general_only):
    """Random samples (sizes 0..3000 bytes, 1-3 members, now and then a member only the general
    parser reads) read whole and with gaps: the same as tarfile's, whatever the chunk size, with
    or without the numpy runs."""
    monkeypatch.setattr(tario, "_CHUNK", chunk)
    if general_only:
        monkeypatch.setattr(tario, "_simple_run", lambda *a: None)
    rng = random.Random(chunk)
    members: list[tuple[str, bytes | str | None]] = []
    for i in range(300):
        stem = f"c{rng.randrange(10)}/s{i:05d}" + ("_" + "x" * rng.randrange(60, 120)
                                                    if rng.random() < 0.03 else "")
        for ext in rng.sample(["png", "cls", "json", "Txt"], rng.randint(1, 3)):
            members.append((f"{stem}.{ext}", rng.randbytes(rng.choice([0, 1, 5, 511, 512, 513,
                                                                        rng.randrange(3000)]))))
        if rng.random() < 0.05:
            members.append((f"dir{i}", None))
    raw = _tar(members)
    ref = _reference(raw)
    assert len(ref) == 300
    assert _read_all(tmp_path, raw) == ref
    assert _read_all(tmp_path, raw, every=7) == ref[::7]
    c = _cursor(tmp_path, raw)
    assert c.read_many(299, 1) == [ref[299]] and c.read_many(300, 1) == [] and c.index == 299


def test_ordinary_members_take_the_numpy_path(tmp_path, monkeypatch):
    """A WebDataset shard goes through the general parser only at chunk ends and at the end."""
    calls = []
    general = TarCursor._member

    def counted(self, *a):
        calls.append(1)
        return general(self, *a)

    monkeypatch.setattr(TarCursor, "_member", counted)
    monkeypatch.setattr(tario, "_CHUNK", 16 * 1024)
    raw = _ordinary(200)  # 400 members, 400 KiB
    assert len(_read_all(tmp_path, raw)) == 200
    assert len(calls) <= len(raw) // (16 * 1024) + 2


def test_missing_end_blocks_are_tolerated(tmp_path):
    raw = _tar(MEMBERS)
    assert _read_all(tmp_path, raw[:_data_end(raw)]) == _reference(raw)
    short = _tar([("k1.png", b"x" * 600)])
    assert _read_all(tmp_path, short[:512 + 600]) == [("k1", {"png": b"x" * 600})]  # no padding


def test_numbers_octal_and_base256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"        ") == 0
    assert _number(bytes([0x80]) + (10**10).to_bytes(11, "big")) == 10**10  # > 8 GiB member


@pytest.mark.parametrize("field", [b"%07o\0", b"%08o", b" %06o\0", b"%06o  "])
def test_checksum_fields_as_other_writers_format_them(tmp_path, field):
    """tarfile writes "%06o\\0 "; other writers pad, space- or NUL-terminate differently."""
    raw = bytearray(_tar(MEMBERS[:5]))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        heads = [ti.offset for ti in tf.getmembers()]
    for at in heads:  # pax headers too: every header block
        for h in range(at, at + 4 * 512, 512):
            hdr = raw[h:h + 512]
            try:
                tarfile.TarInfo.frombuf(bytes(hdr), "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                break
            chk = sum(hdr[:148]) + 256 + sum(hdr[156:])
            raw[h + 148:h + 156] = (field.decode() % chk).encode()
    assert _read_all(tmp_path, bytes(raw)) == _reference(_tar(MEMBERS[:5]))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:  # still valid for tarfile
        assert len(tf.getmembers()) == 5


def _ordinary(n: int = 40) -> bytes:
    return _tar([(f"k{i:03d}.{e}", bytes([i]) * (100 + i)) for i in range(n)
                 for e in ("cls", "png")])


@pytest.mark.parametrize("member", [0, 1, 17, 79])
@pytest.mark.parametrize("byte", [0, 20, 100, 124, 130, 148, 156, 300, 345, 511])
def test_a_damaged_header_anywhere_is_an_error_naming_its_offset(tmp_path, member, byte):
    raw = bytearray(_ordinary())
    at = member * 1024  # each member: a header and one data block
    raw[at + byte] ^= 0x08
    with pytest.raises(ShardError) as err:
        _read_all(tmp_path, bytes(raw))
    if member == 0:
        assert "not a readable tar archive" in str(err.value)
    else:
        assert f"bad header checksum at byte {at}" in str(err.value)
    assert "s.tar" in str(err.value)


@pytest.mark.parametrize("damage,match", [
    (lambda r: r[:2000], "truncated inside sample 'a'"),  # inside a.png's data
    (lambda r: r[:1100], "unexpected end of data in the header at byte 1024"),
    (lambda r: b"not a tar at all" * 64, "not a readable tar archive .not a tar header at byte 0"),
    (lambda r: b"", "not a readable tar archive .empty file"),
])
def test_truncation_and_garbage(tmp_path, damage, match):
    raw = damage(_tar(MEMBERS[:3]))
    with pytest.raises(ShardError, match=match):
        _read_all(tmp_path, raw)


def test_an_empty_archive_has_no_samples(tmp_path):
    assert _read_all(tmp_path, _tar([])) == []


def test_cursor_groups_samples_and_refuses_unsafe_members(tmp_path):
    raw = _tar([("k1.cls", b"1"), ("k1.png", b"p1"), ("__meta__", b"m"), ("k2.cls", b"2"),
                ("k2.png", b"p2"), ("k3.png", b"p3")])
    c = _cursor(tmp_path, raw)
    assert c.read_many(1, 1) == [("k2", {"cls": b"2", "png": b"p2"})]  # k1 skipped
    assert c.read_many(2, 1) == [("k3", {"png": b"p3"})] and c.read_many(3, 1) == []
    c.close()
    with pytest.raises(UnsafeShardError, match="is a link"):
        _cursor(tmp_path, _tar([("k1.png", "/etc/passwd")]))
    for bad in ("../k1.png", "/abs/k1.png", "ok/../../k1.png"):
        with pytest.raises(UnsafeShardError, match="absolute or '..' path"):
            _read_all(tmp_path, _tar([("k0.png", b"fine"), (bad, b"x")]))
    with pytest.raises(ShardError, match="not a readable tar archive"):
        _cursor(tmp_path, b"\0\1" * 600)
    c = _cursor(tmp_path, _tar([("k1.png", b"x" * 600), ("k2.png", b"y" * 600)])[:2300])
    with pytest.raises(ShardError, match="truncated inside sample 'k2'"):
        c.read_many(1, 1)
    with pytest.raises(ShardError, match="sample 'k1' has two 'png' members"):
        _read_all(tmp_path, _tar([("k1.png", b"a"), ("k1.PNG", b"b")]))


def test_read_many_gives_runs_then_the_good_prefix_of_a_broken_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(tario, "_CHUNK", 4096)  # several runs
    raw = _ordinary(40)  # samples k000..k039: 1024 bytes each (cls and png, one block each)
    ref = _reference(raw)
    c = _cursor(tmp_path, raw)
    assert c.read_many(0, 5) == ref[:5] and c.read_many(10, 25) == ref[10:35]
    assert c.read_many(38, 10) == ref[38:] and c.read_many(40, 3) == []
    cut = raw[:30 * 2048 + 1024 + 512 + 50]  # inside k030's png
    c = _cursor(tmp_path, cut, "cut.tar")
    assert c.read_many(0, 64) == ref[:30]
    with pytest.raises(ShardError, match="truncated inside sample 'k030'"):
        c.read_many(30, 1)


def test_members_whose_data_looks_like_tar_headers(tmp_path, monkeypatch):
    """A member that is itself a tar (its headers sit on 512-byte boundaries of the shard, as
    real ones do), a data block that copies a real header, and an old-style (v7) header
    without the ustar magic: the chain of headers decides, as tarfile's walk does."""
    monkeypatch.setattr(tario, "_CHUNK", 8192)
    inner = _tar([("x.png", b"i" * 700), ("y.cls", b"1")])
    outer = _tar([("k0.cls", b"0"), ("k0.tar", inner), ("k1.cls", b"1"), ("k1.png", b"p" * 900),
                  ("k2.bin", inner[:512] * 3), ("k2.cls", b"2"), ("k3.tar", inner * 5),
                  ("k3.cls", b"3")], tarfile.USTAR_FORMAT)
    assert _read_all(tmp_path, outer) == _reference(outer)
    v7 = bytearray(outer)
    with tarfile.open(fileobj=io.BytesIO(outer)) as tf:
        at = next(ti.offset for ti in tf.getmembers() if ti.name == "k1.png")
    v7[at + 257:at + 265] = bytes(8)  # no magic, no version: a v7 header
    v7[at + 148:at + 156] = b"%06o\0 " % (sum(v7[at:at + 148]) + 256 + sum(v7[at + 156:at + 512]))
    assert _read_all(tmp_path, bytes(v7)) == _reference(outer)
