"""files.* through the sync SDK, in one shared sandbox: write and read (text,
bytes, streams, gzip), write_files, list with depth, exists, get_info,
make_dir, rename, remove, users, and watch_dir."""

import gzip as gzip_mod
import io
import os
import time

import pytest
from e2b import AuthenticationException, FileNotFoundException, FileType, SandboxException
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

from conftest import sdk_at_least, wait_until

ALL_BYTES = bytes(range(256)) * 64  # 16 KiB, every byte value


def test_write_read_text(sbx, tmpdir_in_sbx):
    p = f"{tmpdir_in_sbx}/hello.txt"
    info = sbx.files.write(p, "héllo wörld\n")
    assert info.path == p and info.name == "hello.txt" and info.type == FileType.FILE
    assert sbx.files.read(p) == "héllo wörld\n"
    # Overwrite; the command sees the same content.
    sbx.files.write(p, "second")
    assert sbx.files.read(p) == "second"
    assert sbx.commands.run(f"cat {p}").stdout == "second"


def test_write_read_bytes(sbx, tmpdir_in_sbx):
    p = f"{tmpdir_in_sbx}/bin.dat"
    sbx.files.write(p, ALL_BYTES)
    got = sbx.files.read(p, format="bytes")
    assert isinstance(got, (bytes, bytearray)) and bytes(got) == ALL_BYTES
    assert sbx.commands.run(f"stat -c %s {p}").stdout.strip() == str(len(ALL_BYTES))


def test_read_stream_and_write_file_like(sbx, tmpdir_in_sbx):
    """A 3 MiB upload from a file object (octet-stream, streamed) and a
    streamed download give back the same bytes."""
    data = os.urandom(3 * 1024 * 1024)
    p = f"{tmpdir_in_sbx}/big.bin"
    sbx.files.write(p, io.BytesIO(data))
    chunks = list(sbx.files.read(p, format="stream"))
    assert len(chunks) >= 1
    assert b"".join(bytes(c) for c in chunks) == data
    sha = sbx.commands.run(f"sha256sum {p}").stdout.split()[0]
    import hashlib

    assert sha == hashlib.sha256(data).hexdigest()


@sdk_at_least("2.63.0", "e2b 2.45.1 cannot upload an iterable of chunks")
def test_write_iterable_of_chunks(sbx, tmpdir_in_sbx):
    p = f"{tmpdir_in_sbx}/chunks.txt"
    sbx.files.write(p, (f"{i}," .encode() for i in range(1000)))
    assert sbx.files.read(p) == "".join(f"{i}," for i in range(1000))


def test_gzip_upload_and_download(sbx, tmpdir_in_sbx):
    """gzip=True: the upload is gzip-encoded octet-stream, the download asks
    for gzip; the file in the guest holds the plain bytes."""
    text = "compress me " * 5000
    p = f"{tmpdir_in_sbx}/gz.txt"
    sbx.files.write(p, text, gzip=True)
    assert sbx.commands.run(f"wc -c < {p}").stdout.strip() == str(len(text))
    assert sbx.files.read(p, gzip=True) == text
    assert bytes(sbx.files.read(p, format="bytes", gzip=True)) == text.encode()
    # A file that is itself gzip data is not decoded twice.
    blob = gzip_mod.compress(b"inner")
    sbx.files.write(f"{tmpdir_in_sbx}/inner.gz", blob)
    assert bytes(sbx.files.read(f"{tmpdir_in_sbx}/inner.gz", format="bytes", gzip=True)) == blob


def test_write_files_several(sbx, tmpdir_in_sbx):
    """write_files: several files in one multipart request, parents created."""
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    entries = [
        WriteEntry(path=f"{tmpdir_in_sbx}/m/a.txt", data="A"),
        WriteEntry(path=f"{tmpdir_in_sbx}/m/n/b.bin", data=b"\x00B"),
    ]
    infos = sbx.files.write_files(entries)
    assert sorted(i.path for i in infos) == sorted(e["path"] for e in entries)
    assert sbx.files.read(f"{tmpdir_in_sbx}/m/a.txt") == "A"
    assert bytes(sbx.files.read(f"{tmpdir_in_sbx}/m/n/b.bin", format="bytes")) == b"\x00B"


def test_write_creates_parents_and_relative_paths(sbx, tmpdir_in_sbx):
    """Missing parents are created; a relative path is under the user's home."""
    p = f"{tmpdir_in_sbx}/x/y/z.txt"
    sbx.files.write(p, "deep")
    assert sbx.files.read(p) == "deep"
    rel = os.path.relpath(f"{tmpdir_in_sbx}/rel.txt", "/home/user")
    info = sbx.files.write(rel, "relative")
    assert info.path == f"{tmpdir_in_sbx}/rel.txt"
    assert sbx.files.read(f"{tmpdir_in_sbx}/rel.txt") == "relative"


def test_read_missing_is_file_not_found(sbx):
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/home/user/definitely-missing.txt")
    with pytest.raises(SandboxException):
        sbx.files.read("/home/user")  # a directory


def test_list_with_depth(sbx, tmpdir_in_sbx):
    d = tmpdir_in_sbx
    sbx.files.write(f"{d}/top.txt", "t")
    sbx.files.write(f"{d}/a/mid.txt", "m")
    sbx.files.write(f"{d}/a/b/deep.txt", "d")
    one = {e.path: e for e in sbx.files.list(d)}
    assert set(one) == {f"{d}/top.txt", f"{d}/a"}
    assert one[f"{d}/a"].type == FileType.DIR
    assert one[f"{d}/top.txt"].type == FileType.FILE
    assert one[f"{d}/top.txt"].size == 1
    two = {e.path for e in sbx.files.list(d, depth=2)}
    assert two == {f"{d}/top.txt", f"{d}/a", f"{d}/a/mid.txt", f"{d}/a/b"}
    three = {e.path for e in sbx.files.list(d, depth=3)}
    assert three == two | {f"{d}/a/b/deep.txt"}
    with pytest.raises(FileNotFoundException):
        sbx.files.list(f"{d}/nope")


def test_exists_and_get_info(sbx, tmpdir_in_sbx):
    p = f"{tmpdir_in_sbx}/info.txt"
    assert sbx.files.exists(p) is False
    sbx.files.write(p, "12345")
    assert sbx.files.exists(p) is True
    assert sbx.files.exists(tmpdir_in_sbx) is True
    i = sbx.files.get_info(p)
    assert i.name == "info.txt" and i.path == p
    assert i.type == FileType.FILE
    assert i.size == 5
    assert i.mode & 0o777 == 0o644
    assert i.permissions == "-rw-r--r--"
    assert i.owner == "user" and i.group == "user"
    assert abs(i.modified_time.timestamp() - time.time()) < 600
    d = sbx.files.get_info(tmpdir_in_sbx)
    assert d.type == FileType.DIR and d.mode & 0o777 == 0o755
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info(f"{tmpdir_in_sbx}/missing")


def test_make_dir(sbx, tmpdir_in_sbx):
    """make_dir creates parents (True), returns False when it exists."""
    p = f"{tmpdir_in_sbx}/new/nested/dir"
    assert sbx.files.make_dir(p) is True
    assert sbx.files.get_info(p).type == FileType.DIR
    assert sbx.files.make_dir(p) is False


def test_rename(sbx, tmpdir_in_sbx):
    src, dst = f"{tmpdir_in_sbx}/old.txt", f"{tmpdir_in_sbx}/sub/new.txt"
    sbx.files.write(src, "moving")
    sbx.files.make_dir(f"{tmpdir_in_sbx}/sub")
    info = sbx.files.rename(src, dst)
    assert info.path == dst and info.name == "new.txt"
    assert sbx.files.exists(src) is False
    assert sbx.files.read(dst) == "moving"
    # Directories too.
    info = sbx.files.rename(f"{tmpdir_in_sbx}/sub", f"{tmpdir_in_sbx}/sub2")
    assert info.type == FileType.DIR
    assert sbx.files.read(f"{tmpdir_in_sbx}/sub2/new.txt") == "moving"
    with pytest.raises(FileNotFoundException):
        sbx.files.rename(f"{tmpdir_in_sbx}/ghost", f"{tmpdir_in_sbx}/ghost2")


def test_remove(sbx, tmpdir_in_sbx):
    """remove deletes files and whole trees; a missing path is not an error."""
    sbx.files.write(f"{tmpdir_in_sbx}/r/a/b.txt", "x")
    sbx.files.remove(f"{tmpdir_in_sbx}/r/a/b.txt")
    assert sbx.files.exists(f"{tmpdir_in_sbx}/r/a/b.txt") is False
    sbx.files.write(f"{tmpdir_in_sbx}/r/a/c.txt", "x")
    sbx.files.remove(f"{tmpdir_in_sbx}/r")
    assert sbx.files.exists(f"{tmpdir_in_sbx}/r") is False
    sbx.files.remove(f"{tmpdir_in_sbx}/never-was")


def test_files_as_user(sbx, tmpdir_in_sbx):
    """Files written as root belong to root, the default user's to `user`; an
    unknown user fails authentication (401), as on envd."""
    p = "/tmp/suite-root-owned.txt"
    sbx.files.write(p, "rooted", user="root")
    try:
        assert sbx.files.get_info(p, user="root").owner == "root"
        assert sbx.files.read(p, user="root") == "rooted"
        q = f"{tmpdir_in_sbx}/mine.txt"
        sbx.files.write(q, "mine")
        assert sbx.files.get_info(q).owner == "user"
        assert sbx.commands.run(f"stat -c %U {q}").stdout == "user\n"
        with pytest.raises(AuthenticationException):
            sbx.files.read(q, user="no-such-user")
    finally:
        sbx.files.remove(p, user="root")
    assert sbx.files.exists(p) is False


def _events(handle, want, timeout=20, any_of=False):
    """Polls the sync watch handle until every (name, type) in `want` (or,
    with `any_of`, one of them) was seen."""
    seen = []
    check = any if any_of else all

    def done():
        seen.extend((e.name, e.type) for e in handle.get_new_events())
        return check(w in seen for w in want)

    wait_until(f"watch events {want} (seen {seen})", done, timeout, every=0.3)
    return seen


def test_watch_dir(sbx, tmpdir_in_sbx):
    """watch_dir (sync: CreateWatcher + GetWatcherEvents polling): create,
    write, rename and remove events, names relative to the watched dir."""
    h = sbx.files.watch_dir(tmpdir_in_sbx)
    try:
        sbx.files.write(f"{tmpdir_in_sbx}/w.txt", "1")
        _events(h, [("w.txt", FilesystemEventType.CREATE)])
        sbx.commands.run(f"echo more >> {tmpdir_in_sbx}/w.txt")
        _events(h, [("w.txt", FilesystemEventType.WRITE)])
        sbx.files.rename(f"{tmpdir_in_sbx}/w.txt", f"{tmpdir_in_sbx}/w2.txt")
        # inotify's moved-from / moved-to: envd reports them as rename of the
        # old name and create of the new one.
        _events(
            h,
            [("w.txt", FilesystemEventType.RENAME), ("w2.txt", FilesystemEventType.CREATE)],
            any_of=True,
        )
        sbx.files.remove(f"{tmpdir_in_sbx}/w2.txt")
        _events(h, [("w2.txt", FilesystemEventType.REMOVE)])
    finally:
        h.stop()


def test_watch_dir_recursive(sbx, tmpdir_in_sbx):
    sbx.files.make_dir(f"{tmpdir_in_sbx}/sub")
    h = sbx.files.watch_dir(tmpdir_in_sbx, recursive=True)
    try:
        sbx.files.write(f"{tmpdir_in_sbx}/sub/inner.txt", "x")
        _events(h, [("sub/inner.txt", FilesystemEventType.CREATE)])
    finally:
        h.stop()


def test_watch_missing_dir_fails(sbx):
    with pytest.raises(SandboxException):
        sbx.files.watch_dir("/home/user/no-such-dir-to-watch")


def _http(method, url, body=None, headers=None):
    """A plain HTTP request with no SDK and no sandbox headers; (status, body)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_signed_urls(sbx, tmpdir_in_sbx):
    """download_url / upload_url: URLs signed with the sandbox's access token
    work without any header (a browser, curl); the signature binds the path,
    the operation and the expiry."""
    p = f"{tmpdir_in_sbx}/signed.txt"
    sbx.files.write(p, "via a signed URL")
    url = sbx.download_url(p)
    assert "signature=v1_" in url
    assert _http("GET", url) == (200, b"via a signed URL")
    assert _http("GET", sbx.download_url(p, use_signature_expiration=120)) == (
        200,
        b"via a signed URL",
    )
    # Another path with this path's signature, or a tampered one: refused.
    other = url.replace("signed.txt", "other.txt")
    assert _http("GET", other)[0] in (401, 403)
    bad = url.replace("signature=v1_", "signature=v1_x")
    assert _http("GET", bad)[0] in (401, 403)
    # A read URL does not write.
    boundary = "suiteboundary42"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"up.txt\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\nuploaded\r\n--{boundary}--\r\n"
    ).encode()
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    up = f"{tmpdir_in_sbx}/up.txt"
    assert _http("POST", sbx.download_url(up), body, ctype)[0] in (401, 403)
    status, answer = _http("POST", sbx.upload_url(up), body, ctype)
    assert status == 200, answer
    assert sbx.files.read(up) == "uploaded"
    assert sbx.files.get_info(up).owner == "user"
