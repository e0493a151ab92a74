"""Each file is read once per process for its sha256: lint, build and publish after quantize check the
manifest's digests without re-reading a file whose identity (device, inode, size, mtime) is unchanged, and
a file changed after it was hashed is read again and caught."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from omniq import checksums
from omniq.cli import main
from omniq.errors import OmniqError


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Counts real reads per file (resolved path)."""
    seen: Counter = Counter()
    real = checksums.read_digest

    def counting(path):
        seen[str(Path(path).resolve())] += 1
        return real(path)

    monkeypatch.setattr(checksums, "read_digest", counting)
    checksums.forget()
    yield seen
    checksums.forget()


def test_a_file_is_read_once_until_it_changes(tmp_path, reads):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    first = checksums.sha256_file(f)
    assert checksums.sha256_file(f) == first and reads[str(f)] == 1
    link = tmp_path / "hard.bin"
    link.hardlink_to(f)                            # a build bundle's hard link: the same inode, not read again
    assert checksums.sha256_file(link) == first and reads[str(link)] == 0
    f.write_bytes(b"y" * 1000)                     # same size, new content: the mtime moves, so it is read again
    second = checksums.sha256_file(f)
    assert second != first and reads[str(f)] == 2


def test_lint_build_publish_check_without_rereading(quantized, tmp_path, reads):
    src = quantized["fp8"]
    assert src["rc"] == 0, src["stderr"]
    art = tmp_path / "art"
    shutil.copytree(src["path"], art)              # fresh inodes: nothing of this artifact is known yet
    import json

    files = [art / f for f in sorted(json.loads((art / "omniq.json").read_text())["files"])]   # the listed ones
    assert main(["lint", str(art)]) == 0           # reads every file once, checks each against omniq.json
    after_lint = {str(p.resolve()): reads[str(p.resolve())] for p in files}
    assert all(n == 1 for n in after_lint.values()), after_lint
    assert main(["build", str(art), "--gpu", "hopper", "--out", str(tmp_path / "bundle")]) == 0
    from omniq.publish import release

    rel = release.open_release(art)
    release.digests(rel)                            # what publish checks before it pushes
    assert {str(p.resolve()): reads[str(p.resolve())] for p in files} == after_lint

    # a damaged shard (same size) is read again and refused
    shard = next(p for p in files if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(OmniqError, match="differ from the sha256"):
        release.digests(release.open_release(art))
    assert main(["lint", str(art)]) != 0


def test_a_digest_read_in_the_background_is_taken_under_the_files_new_name(tmp_path, reads):
    """`hash_soon` (the streamed export's shards, once their last tensor is written): the file is read in a
    background thread; `sha256_file` of it after a rename takes that digest without reading it itself, and a
    file written to after it was handed over is read again."""
    import hashlib

    f = tmp_path / ".part-0"
    f.write_bytes(b"abc" * 100_000)
    soon = checksums.hash_soon(f)
    f.rename(tmp_path / "model.safetensors")
    got = checksums.sha256_file(tmp_path / "model.safetensors")
    assert got == hashlib.sha256(b"abc" * 100_000).hexdigest() == soon.future.result()
    assert reads[str(tmp_path / "model.safetensors")] == 0

    g = tmp_path / "g.bin"
    g.write_bytes(b"x" * 1000)
    checksums.hash_soon(g).future.result()
    g.write_bytes(b"y" * 1000)                     # changed after it was hashed: read again
    assert checksums.sha256_file(g) == hashlib.sha256(b"y" * 1000).hexdigest() and reads[str(g)] == 1


def test_an_abandoned_background_digest_holds_no_file_open(tmp_path, monkeypatch):
    """A failed export abandons its shards' digests: one being read is waited for, one queued never starts;
    neither file is left open."""
    import os
    import threading

    started, go = threading.Event(), threading.Event()
    real = checksums._digest_of

    def held(f):                                   # the first read waits until the test lets it go
        started.set()
        go.wait(10)
        return real(f)

    monkeypatch.setattr(checksums, "_digest_of", held)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"z" * 1000)
    b.write_bytes(b"w" * 1000)
    first = checksums.hash_soon(a)
    assert started.wait(10)
    second = checksums.hash_soon(b)                # queued behind the first
    second.abandon()
    assert second.future.cancelled()
    threading.Timer(0.2, go.set).start()
    first.abandon()                                # waits for the read under way
    assert first.future.done()
    open_now = {os.path.realpath(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")}
    assert not open_now & {str(a.resolve()), str(b.resolve())}
    assert checksums.sha256_file(b) and checksums.sha256_file(a)
