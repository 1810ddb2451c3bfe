"""The file operations (``client.fs``, PROTOCOL.md §8.11) against the real shim: binary,
empty and large files both ways with checksums; a download and an upload cut mid-transfer
and resumed by offset; stat, paged listings, mkdir, rename, recursive remove; escapes and
missing files refused with the right exception; a root-only file refused to uid 1000;
watches reporting changes through the exactly-once event stream; the sync facade."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import pathlib
import shutil
import tempfile
from typing import AsyncIterator, List

import pytest

from agent_shim import (
    BadPath,
    Client,
    ConnectionClosed,
    FileEvent,
    NotFound,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    ShimTimeout,
    read_token,
)
from agent_shim.files import WRITE_CHUNK
from agent_shim.sync import SyncClient
from conftest import free_port, skip_or_fail
from helpers import connect, run
from test_control import Proxy


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start(shim_factory, root: pathlib.Path, *extra: str, **kw):
    """The shim, its files confined to `root`."""
    root.mkdir(parents=True, exist_ok=True)
    return shim_factory(args=["--fs-root", str(root), *extra], **kw)


def test_binary_empty_and_large_files_round_trip(shim_factory, tmp_path):
    root = tmp_path / "root"
    shim = start(shim_factory, root)
    binary = bytes(range(256)) * 5 + b"\0\xff\0"
    big = os.urandom(3 * 1024 * 1024 + 12345)  # a few MiB, not a whole number of chunks
    (root / "on-disk.bin").write_bytes(big)

    async def go():
        async with await connect(shim) as c:
            fs = c.fs
            # Up: bytes, an empty file, a file object, an async iterable of odd pieces.
            assert await fs.write("/bin.dat", binary) == len(binary)
            assert await fs.write("/empty", b"") == 0
            assert await fs.write("/big.bin", io.BytesIO(big)) == len(big)

            async def pieces() -> AsyncIterator[bytes]:
                for at in range(0, len(big), 100_003):
                    yield big[at : at + 100_003]

            assert await fs.write("/deep/er/big2.bin", pieces(), parents=True, mode=0o600) == len(big)
            assert (root / "bin.dat").read_bytes() == binary
            assert (root / "empty").read_bytes() == b""
            assert sha((root / "big.bin").read_bytes()) == sha(big)
            assert sha((root / "deep/er/big2.bin").read_bytes()) == sha(big)
            assert (root / "deep/er/big2.bin").stat().st_mode & 0o777 == 0o600
            # Down: whole, by chunks, from an offset, a length.
            assert await fs.read_bytes("/bin.dat") == binary
            assert await fs.read_bytes("/empty") == b""
            assert sha(await fs.read_bytes("/on-disk.bin")) == sha(big)
            chunks: List[bytes] = []
            async with fs.read("big.bin") as reader:
                async for chunk in reader:
                    chunks.append(chunk)
                assert reader.offset == len(big)
            assert len(chunks) > 1 and sha(b"".join(chunks)) == sha(big)
            # Several reads side by side on one connection, each its own stream.
            both = await asyncio.gather(fs.read_bytes("/on-disk.bin"), fs.read_bytes("/big.bin"),
                                        fs.read_bytes("/bin.dat"))
            assert [sha(b) for b in both] == [sha(big), sha(big), sha(binary)]
            assert await fs.read_bytes("/on-disk.bin", offset=1_000_000, length=300_000) == big[1_000_000:1_300_000]
            assert await fs.read_bytes("/bin.dat", offset=len(binary) + 10) == b""
            async with fs.read("/on-disk.bin", offset=5) as reader:
                assert await reader.read(3) == big[5:8]
                assert reader.offset == 8
                assert await reader.read(WRITE_CHUNK * 2) == big[8 : 8 + WRITE_CHUNK * 2]
            # Replace is atomic and whole; append adds.
            await fs.write("/bin.dat", b"new")
            await fs.write("/bin.dat", b"+more", append=True)
            assert await fs.read_bytes("/bin.dat") == b"new+more"
            # The connection still serves other requests after a closed-early read.
            assert (await c.status()).state in ("starting", "ready")

    run(go())


def test_stat_list_pages_mkdir_rename_and_remove(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "many").mkdir(parents=True)
    names = sorted(f"f{n:02}" for n in range(23))
    for name in names:
        (root / "many" / name).write_bytes(name.encode())
    os.symlink("f00", root / "many" / "link")
    shim = start(shim_factory, root)

    async def go():
        async with await connect(shim) as c:
            fs = c.fs
            st = await fs.stat("/many/f03")
            assert (st.name, st.kind, st.size, st.is_file) == ("f03", "file", 3, True)
            assert st.uid == os.getuid() and st.mtime_ms > 0
            link = await fs.stat("/many/link")
            assert link.is_symlink and link.target == "f00"
            assert (await fs.stat("/many/link", follow=True)).kind == "file"
            assert (await fs.stat("/")).is_dir
            # Every entry through pages of 5; one page at a time.
            entries = await fs.list("/many", page_size=5)
            assert [e.name for e in entries] == sorted(names + ["link"])
            page = await fs.list_page("/many", limit=5)
            assert page.more and [e.name for e in page.entries] == names[:5]
            page = await fs.list_page("/many", after=page.last, limit=100)
            assert not page.more and [e.name for e in page.entries] == names[5:] + ["link"]
            # mkdir (parents), rename, remove (recursive).
            await fs.mkdir("/a/b/c", parents=True)
            await fs.mkdir("/a/b/c", parents=True)  # exists: fine with parents
            with pytest.raises(RemoteError) as e:
                await fs.mkdir("/a/b/c")
            assert e.value.code == "invalid"
            await fs.write("/a/b/c/file", b"x")
            await fs.rename("/a/b/c/file", "/a/moved")
            assert (root / "a/moved").read_bytes() == b"x" and not (root / "a/b/c/file").exists()
            with pytest.raises(RemoteError) as e:
                await fs.remove("/a")
            assert e.value.code == "invalid"  # not empty
            await fs.remove("/a", recursive=True)
            assert not (root / "a").exists()
            assert not await fs.exists("/a") and await fs.exists("/many/link")
            await fs.remove("/many/link")
            assert (root / "many/f00").exists()

    run(go())


def test_missing_paths_and_escapes_are_refused(shim_factory, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok").write_bytes(b"fine")
    os.symlink("/etc", root / "etc-link")
    os.symlink("../../..", root / "up")
    shim = start(shim_factory, root)

    async def go():
        async with await connect(shim) as c:
            fs = c.fs
            with pytest.raises(NotFound) as e:
                await fs.read_bytes("/missing")
            assert e.value.code == "not_found" and isinstance(e.value, RemoteError)
            with pytest.raises(NotFound):
                await fs.stat("/missing/deeper")
            with pytest.raises(NotFound):
                await fs.list("/missing")
            for escape in ["../../etc/passwd", "/../etc/passwd", "/etc-link/passwd", "up/etc/passwd"]:
                with pytest.raises(BadPath):
                    await fs.read_bytes(escape)
                with pytest.raises(BadPath):
                    await fs.write(escape, b"owned")
            with pytest.raises(BadPath):
                await fs.stat("/etc-link", follow=True)
            with pytest.raises(BadPath):
                await fs.list("/etc-link")
            with pytest.raises(RemoteError) as e:
                await fs.read_bytes("/")
            assert e.value.code == "invalid"  # a directory
            assert await fs.read_bytes("ok") == b"fine"  # and the connection is fine

    run(go())


def test_a_root_only_file_is_refused_to_uid_1000(shim_factory):
    if os.getuid() != 0:
        skip_or_fail("root", "needs root to run the shim with --user 1000:1000")
    # Outside pytest's own (0700) temporary directory: uid 1000 must reach the root.
    base = pathlib.Path(tempfile.mkdtemp(prefix="agent-shim-fs-uid-"))
    try:
        base.chmod(0o755)
        root = base / "root"
        (root / "mine").mkdir(parents=True)
        root.chmod(0o755)
        (root / "secret").write_bytes(b"root only")
        (root / "secret").chmod(0o600)
        (root / "public").write_bytes(b"anyone")
        (root / "public").chmod(0o644)
        os.chown(root / "mine", 1000, 1000)
        shim = start(shim_factory, root, "--user", "1000:1000")

        async def go():
            async with await connect(shim) as c:
                fs = c.fs
                with pytest.raises(PermissionDenied):
                    await fs.read_bytes("/secret")
                assert await fs.read_bytes("/public") == b"anyone"
                with pytest.raises(PermissionDenied):
                    await fs.write("/new", b"x")
                with pytest.raises(PermissionDenied):
                    await fs.remove("/secret")
                with pytest.raises(PermissionDenied):
                    await fs.mkdir("/newdir")
                await fs.write("/mine/new", b"mine")
                assert (root / "mine/new").stat().st_uid == 1000

        run(go())
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_download_cut_mid_file_resumes_from_its_offset(shim_factory, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    big = os.urandom(24 * 1024 * 1024 + 777)
    (root / "big.bin").write_bytes(big)
    port = free_port()
    shim = start(shim_factory, root, listen=f"tcp:127.0.0.1:{port}")

    async def go():
        proxy = Proxy(port)
        proxy_port = await proxy.start()
        try:
            token = read_token(shim.token_file)
            async with await Client.connect(f"tcp:127.0.0.1:{proxy_port}", token=token,
                                            backoff=(0.05, 0.5)) as c:
                got = bytearray()
                cuts = 0
                async with c.fs.read("/big.bin") as reader:
                    async for chunk in reader:
                        got += chunk
                        # Twice, a few MiB apart, well before the end.
                        if (cuts == 0 and len(got) >= 1) or (cuts == 1 and len(got) >= 10 * 1024 * 1024):
                            proxy.cut()
                            cuts += 1
                    assert reader.resumes >= 2, reader.resumes
                assert c.reconnects >= 2
                assert len(got) == len(big) and sha(bytes(got)) == sha(big)
        finally:
            proxy.close()

    run(go())


def test_a_file_changed_while_the_connection_was_down_is_not_resumed(shim_factory, tmp_path):
    from agent_shim import FileChanged

    root = tmp_path / "root"
    root.mkdir()
    path = root / "big.bin"
    path.write_bytes(os.urandom(24 * 1024 * 1024))
    port = free_port()
    shim = start(shim_factory, root, listen=f"tcp:127.0.0.1:{port}")

    async def go():
        proxy = Proxy(port)
        proxy_port = await proxy.start()
        try:
            token = read_token(shim.token_file)
            async with await Client.connect(f"tcp:127.0.0.1:{proxy_port}", token=token,
                                            backoff=(0.05, 0.5)) as c:
                async with c.fs.read("/big.bin") as reader:
                    assert await reader.read(1)
                    await asyncio.sleep(0.3)  # the stat a resume compares with is taken
                    with open(path, "r+b") as f:
                        f.write(b"changed")
                    st = path.stat()
                    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
                    proxy.cut()
                    with pytest.raises(FileChanged) as e:
                        await reader.read()
                    assert e.value.code == "changed"
        finally:
            proxy.close()

    run(go())


def test_an_upload_cut_mid_file_resumes_from_what_the_shim_has(shim_factory, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    big = os.urandom(20 * 1024 * 1024 + 4321)
    port = free_port()
    shim = start(shim_factory, root, listen=f"tcp:127.0.0.1:{port}")

    async def go():
        proxy = Proxy(port)
        proxy_port = await proxy.start()
        try:
            token = read_token(shim.token_file)
            async with await Client.connect(f"tcp:127.0.0.1:{proxy_port}", token=token,
                                            backoff=(0.05, 0.5)) as c:

                async def source() -> AsyncIterator[bytes]:
                    piece = 64 * 1024
                    for at in range(0, len(big), piece):
                        if at in (2 * 1024 * 1024, 11 * 1024 * 1024):
                            proxy.cut()  # with chunks in flight, unanswered
                            await asyncio.sleep(0)
                        yield big[at : at + piece]

                asked: List[int] = []
                offset = c.fs._offset

                async def counted(handle: int, budget: float) -> int:
                    asked.append(await offset(handle, budget))
                    return asked[-1]

                c.fs._offset = counted  # type: ignore[method-assign]
                assert await c.fs.write("/up.bin", source()) == len(big)
                assert c.reconnects >= 2
                # Resumed from what the shim had, twice (or more), never from 0.
                assert len(asked) >= 2 and all(a > 0 for a in asked), asked
            assert sha((root / "up.bin").read_bytes()) == sha(big)
            # No temporary file left beside it.
            assert sorted(p.name for p in root.iterdir()) == ["up.bin"]
        finally:
            proxy.close()

    run(go())


def test_a_failed_upload_leaves_the_target_as_it_was(shim_factory, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "keep").write_bytes(b"old")
    shim = start(shim_factory, root)

    async def go():
        async with await connect(shim) as c:

            async def broken() -> AsyncIterator[bytes]:
                yield b"x" * (WRITE_CHUNK + 10)
                raise RuntimeError("the source failed")

            with pytest.raises(RuntimeError):
                await c.fs.write("/keep", broken())
            with pytest.raises(TypeError):
                await c.fs.write("/keep", 12345)  # type: ignore[arg-type]
            # The abort goes out in the background: the temporary file goes with it.
            for _ in range(100):
                if sorted(p.name for p in root.iterdir()) == ["keep"]:
                    break
                await asyncio.sleep(0.05)
            assert sorted(p.name for p in root.iterdir()) == ["keep"]
            assert (root / "keep").read_bytes() == b"old"

    run(go())


async def changes(watch, want: set, timeout: float = 20) -> List[FileEvent]:
    """The watch's events until every (change, path) of `want` was seen."""
    seen: List[FileEvent] = []
    while not want <= {(e.change, e.path) for e in seen}:
        ev = await watch.next(timeout)
        assert ev is not None, seen
        seen.append(ev)
    return seen


def test_a_watch_reports_created_modified_renamed_and_removed(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "w").mkdir(parents=True)
    shim = start(shim_factory, root)

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            async with await c.fs.watch("/w", recursive=True) as watch:
                (root / "w" / "a.txt").write_bytes(b"1")
                seen = await changes(watch, {("created", "/w/a.txt"), ("modified", "/w/a.txt")})
                assert all(e.watch == watch.id for e in seen)
                seqs = [e.seq for e in seen]
                os.rename(root / "w" / "a.txt", root / "w" / "b.txt")
                seen = await changes(watch, {("renamed", "/w/a.txt")})
                assert seen[-1].to == "/w/b.txt"
                (root / "w" / "sub").mkdir()
                await asyncio.sleep(0.3)  # the recursive watch takes the new directory
                (root / "w" / "sub" / "c").write_bytes(b"2")
                await changes(watch, {("created", "/w/sub/c")})
                os.unlink(root / "w" / "b.txt")
                seen = await changes(watch, {("removed", "/w/b.txt")})
                seqs += [e.seq for e in seen]
                assert seqs == sorted(set(seqs))
            # Unwatched: later changes come neither to the watch nor to the event stream.
            (root / "w" / "after").write_bytes(b"3")
            await asyncio.sleep(0.5)
            while True:
                try:
                    ev = await stream.next(0.5)
                except ShimTimeout:
                    break
                assert ev.type != "fs_event", ev
            with pytest.raises(NotFound):
                await c.fs.unwatch(watch.id)

    run(go())


def test_watch_events_are_acknowledged_once_processed_and_replayed_otherwise(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "w").mkdir(parents=True)
    shim = start(shim_factory, root)

    async def go():
        async with await connect(shim) as c:
            watch = await c.fs.watch("/w")
            (root / "w" / "one").write_bytes(b"1")
            first = await watch.next(20)
            assert first is not None
            # Not processed yet (no next call): a new connection of the same consumer gets
            # it again, as an ordinary event of its stream (this client no longer runs).
            await c.ping()
        await asyncio.sleep(0.3)
        async with await connect(shim) as c2:
            stream = c2.events(after=first.seq - 1)
            ev = await stream.next(20)
            assert ev.seq == first.seq and FileEvent.from_event(ev) == first
            await c2.fs.unwatch(first.watch)

    run(go())


def test_hello_cgroups_is_read(shim_factory, tmp_path):
    shim = start(shim_factory, tmp_path / "root")

    async def go():
        async with await connect(shim) as c:
            assert c.cgroups in ("v2-delegated", "v1", "none")
            assert c.cgroups == c.hello.get("cgroups")

    run(go())


def test_the_sync_facade_round_trips_files(shim_factory, tmp_path):
    root = tmp_path / "root"
    shim = start(shim_factory, root)
    data = os.urandom(700_000)
    with SyncClient(shim.address, token=read_token(shim.token_file), timeout=30) as c:
        assert c.fs.write("/d/s.bin", data, parents=True) == len(data)
        assert c.fs.read_bytes("/d/s.bin") == data
        assert b"".join(c.fs.read("/d/s.bin", offset=10)) == data[10:]
        for chunk in c.fs.read("/d/s.bin"):
            break  # left early: the rest is dropped, the connection goes on
        assert chunk == data[: len(chunk)]
        assert [e.name for e in c.fs.list("/d")] == ["s.bin"]
        assert c.fs.stat("/d/s.bin").size == len(data)
        c.fs.mkdir("/d/e")
        c.fs.rename("/d/s.bin", "/d/e/t.bin")
        with pytest.raises(NotFound):
            c.fs.read_bytes("/d/s.bin")
        with c.fs.watch("/d/e") as w:
            (root / "d/e/new").write_bytes(b"n")
            ev = w.next(20)
            assert ev is not None and ev.change == "created" and ev.path == "/d/e/new"
        c.fs.remove("/d", recursive=True)
        assert not c.fs.exists("/d")


def test_a_watch_delivers_each_change_once_across_cuts(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "w").mkdir(parents=True)
    port = free_port()
    shim = start(shim_factory, root, listen=f"tcp:127.0.0.1:{port}")

    async def go():
        proxy = Proxy(port)
        proxy_port = await proxy.start()
        try:
            token = read_token(shim.token_file)
            async with await Client.connect(f"tcp:127.0.0.1:{proxy_port}", token=token,
                                            backoff=(0.05, 0.5)) as c:
                watch = await c.fs.watch("/w")
                created: List[str] = []
                seqs: List[int] = []
                for n in range(6):
                    (root / "w" / f"f{n}").write_bytes(b"x")
                    if n % 2:
                        proxy.cut()  # events in the shim's buffer, or in flight
                    while f"/w/f{n}" not in created:
                        ev = await watch.next(20)
                        assert ev is not None
                        seqs.append(ev.seq)
                        if ev.change == "created":
                            created.append(ev.path)
                assert c.reconnects >= 3
                assert created == [f"/w/f{n}" for n in range(6)], created  # each once, in order
                assert seqs == sorted(set(seqs)), seqs
                await watch.close()
        finally:
            proxy.close()

    run(go())


def test_a_dead_shim_ends_a_download_and_an_upload_within_a_bound(shim_factory, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    shim = start(shim_factory, root)

    async def go():
        c = await connect(shim, reconnect_timeout=2, backoff=(0.05, 0.2))
        reader = c.fs.read("/big.bin")
        assert await reader.read(1000)
        os.kill(shim.proc.pid, 9)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(ConnectionClosed):
            await reader.read()
        assert loop.time() - began < 10
        with pytest.raises(ConnectionClosed):
            await c.fs.write("/x", b"y")
        await c.close()

    run(go())


# --- a hostile shim: bad replies raise clearly and within a bound ----------------------------


def fake_fs_shim(answer):
    """A fake shim that answers each request with answer(msg) (a list of frames)."""
    import msgpack
    import struct

    from test_hostile import HELLO, frame

    async def behaviour(r, w):
        w.write(frame(HELLO))
        await w.drain()
        while True:
            (n,) = struct.unpack(">I", await r.readexactly(4))
            msg = msgpack.unpackb(await r.readexactly(n), raw=False)
            for out in answer(msg):
                w.write(out if isinstance(out, bytes) else frame(out))
            await w.drain()

    return behaviour


@pytest.mark.parametrize("case", ["bad_type", "wrong_offset", "bad_entry", "stuck_list", "silent_read",
                                  "silent_write"])
def test_bad_file_replies_raise_clearly(tmp_path, case):
    from test_hostile import expect_fast, fake_shim

    def answer(msg):
        kind, re = msg["type"], msg.get("id")
        if kind == "hello":
            return []
        if case == "bad_type" and kind == "fs_read":
            return [{"type": "fs_data", "re": re, "offset": 0, "data": "not bytes"}]
        if case == "wrong_offset" and kind == "fs_read":
            return [{"type": "fs_data", "re": re, "offset": 7, "data": b"abc"}]
        if case == "bad_entry" and kind == "fs_stat":
            return [{"type": "fs_stat_reply", "re": re, "entry": {"name": "x", "kind": "file"}}]
        if case == "stuck_list" and kind == "fs_list":
            entry = {"name": "same", "kind": "file", "size": 0, "mode": 0o644, "uid": 0, "gid": 0,
                     "mtime_ms": 0}
            return [{"type": "fs_list_reply", "re": re, "entries": [entry], "more": True}]
        if case == "silent_write" and kind == "fs_write_open":
            return [{"type": "fs_write_ready", "re": re, "handle": 1, "offset": 0}]
        return []  # silence

    async def go():
        addr, server = await fake_shim(tmp_path, fake_fs_shim(answer))
        async with server:
            c = await Client.connect(addr, reconnect=False, connect_timeout=5, request_timeout=1)
            fs = c.fs
            if case == "bad_type":
                await expect_fast(fs.read_bytes("/f"), ConnectionClosed, 5)
            elif case == "wrong_offset":
                await expect_fast(fs.read_bytes("/f"), ProtocolError, 5)
            elif case == "bad_entry":
                await expect_fast(fs.stat("/f"), ProtocolError, 5)
            elif case == "stuck_list":
                await expect_fast(fs.list("/d"), ProtocolError, 5)
            elif case == "silent_read":
                await expect_fast(fs.read_bytes("/f"), ShimTimeout, 5)
            else:
                await expect_fast(fs.write("/f", b"data"), ShimTimeout, 5)
            await c.close()

    run(go())


def test_a_full_file_system_is_no_space_and_leaves_the_target(shim_factory, tmp_path):
    import subprocess

    from agent_shim import NoSpace

    root = tmp_path / "root"
    small = root / "small"
    small.mkdir(parents=True)
    if os.getuid() != 0:
        skip_or_fail("root", "needs root to mount a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                             capture_output=True, text=True, timeout=20)
    if mounted.returncode != 0:
        skip_or_fail("mount", f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        shim = start(shim_factory, root)

        async def go():
            async with await connect(shim) as c:
                await c.fs.write("/small/f", b"old")
                with pytest.raises(NoSpace) as e:
                    await c.fs.write("/small/f", bytes(3 * 1024 * 1024))
                assert e.value.code == "no_space"
                assert await c.fs.read_bytes("/small/f") == b"old"
                for _ in range(100):  # the abort removes the temporary file
                    if [p.name for p in small.iterdir()] == ["f"]:
                        break
                    await asyncio.sleep(0.05)
                assert [p.name for p in small.iterdir()] == ["f"]

        run(go())
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=20)


def test_a_watch_over_its_rate_says_it_overflowed(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "w").mkdir(parents=True)
    shim = start(shim_factory, root, "--fs-watch-rate", "5")

    async def go():
        async with await connect(shim) as c:
            async with await c.fs.watch("/w") as watch:
                for n in range(60):
                    (root / "w" / f"f{n}").write_bytes(b"x")
                # The shim reports what it dropped with the watch's next change, once its
                # rate allows one again.
                await asyncio.sleep(1.0)
                (root / "w" / "later").write_bytes(b"x")
                while True:
                    ev = await watch.next(20)
                    assert ev is not None
                    if ev.change == "overflow":
                        break
                assert ev.dropped and ev.dropped > 0 and ev.path == ""
                assert watch.dropped == ev.dropped

    run(go())


def test_a_last_burst_over_the_rate_is_reported_without_a_later_change(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "w").mkdir(parents=True)
    shim = start(shim_factory, root, "--fs-watch-rate", "5")

    async def go():
        async with await connect(shim) as c:
            async with await c.fs.watch("/w") as watch:
                for n in range(60):
                    (root / "w" / f"f{n}").write_bytes(b"x")
                while True:
                    ev = await watch.next(3)
                    assert ev is not None
                    if ev.change == "overflow":
                        return

    run(go())


def test_a_watch_ends_when_a_new_shim_answers_at_its_address(shim_factory, tmp_path):
    root = tmp_path / "root"
    (root / "w").mkdir(parents=True)
    port = free_port()
    first = start(shim_factory, root, listen=f"tcp:127.0.0.1:{port}")

    async def go():
        token = read_token(first.token_file)
        async with await Client.connect(f"tcp:127.0.0.1:{port}", token=token, backoff=(0.05, 0.5),
                                        reconnect_timeout=20) as c:
            watch = await c.fs.watch("/w")
            # Enough events that the cursor is past all the new shim will have said when the
            # client reconnects: the new shim's instance in its hello tells the client at once,
            # whatever the seqs.
            for n in range(15):
                (root / "w" / f"f{n}").write_bytes(b"1")
            await changes(watch, {("modified", f"/w/f{n}") for n in range(15)})
            os.kill(first.proc.pid, 9)
            first.proc.wait(10)
            # The same address, a shim that never took the watch (its seqs start again).
            start(shim_factory, root, listen=f"tcp:127.0.0.1:{port}")
            with pytest.raises(ConnectionClosed, match="new shim"):
                while True:
                    await watch.next(20)

    run(go())
