"""The async client (AsyncSandbox): lifecycle, commands, files and the
streaming watch_dir (WatchDir server stream), in one module-scoped event
loop and one shared sandbox."""

import asyncio
import uuid

import pytest
import pytest_asyncio
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    FileType,
    SandboxException,
    TimeoutException,
)
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from e2b.sandbox.sandbox_api import SandboxQuery

from conftest import RUN_ID, SANDBOX_TIMEOUT, metadata, sdk_at_least

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def asbx():
    s = await AsyncSandbox.create(
        timeout=SANDBOX_TIMEOUT,
        metadata=metadata(module="test_async"),
        envs={"SUITE_VAR": "async-create"},
    )
    yield s
    await s.kill()


async def alisted(query):
    pages = AsyncSandbox.list(query=query)
    out = []
    while pages.has_next:
        out.extend(await pages.next_items())
    return out


async def test_create_info_and_list(asbx):
    info = await asbx.get_info()
    assert info.metadata["module"] == "test_async"
    assert await asbx.is_running()
    mine = await alisted(SandboxQuery(metadata={"suite": RUN_ID, "module": "test_async"}))
    assert [s.sandbox_id for s in mine] == [asbx.sandbox_id]


async def test_run_output_envs_cwd_user(asbx):
    r = await asbx.commands.run("echo $SUITE_VAR; echo err >&2; pwd; whoami")
    assert r.stdout == "async-create\n/home/user\nuser\n"
    assert r.stderr == "err\n"
    r = await asbx.commands.run("echo $X; pwd; id -u", envs={"X": "y"}, cwd="/tmp", user="root")
    assert r.stdout == "y\n/tmp\n0\n"


async def test_exit_code_and_timeout(asbx):
    with pytest.raises(CommandExitException) as e:
        await asbx.commands.run("exit 7")
    assert e.value.exit_code == 7
    with pytest.raises(TimeoutException):
        await asbx.commands.run("sleep 60", timeout=2)


async def test_callbacks_background_kill(asbx):
    """on_stdout is called as output arrives, for a background command too;
    kill ends it."""
    seen = []
    got_line = asyncio.Event()

    def on_out(chunk):
        seen.append(chunk)
        got_line.set()

    h = await asbx.commands.run("echo ready; sleep 300", background=True, on_stdout=on_out)
    await asyncio.wait_for(got_line.wait(), 30)
    assert "".join(seen) == "ready\n"
    assert h.pid in {p.pid for p in await asbx.commands.list()}
    assert await h.kill() is True
    with pytest.raises(CommandExitException):
        await h.wait()
    assert await asbx.commands.kill(h.pid) is False


async def test_stdin_and_connect(asbx):
    h = await asbx.commands.run("cat", background=True, stdin=True)
    await asbx.commands.send_stdin(h.pid, "async in\n")
    await asbx.commands.close_stdin(h.pid)
    assert (await h.wait()).stdout == "async in\n"

    h = await asbx.commands.run("sleep 3; echo later", background=True)
    await h.disconnect()
    h2 = await asbx.commands.connect(h.pid)
    assert (await h2.wait()).stdout == "later\n"


@sdk_at_least("2.63.0", "e2b 2.45.1 has no commands.stream_input")
async def test_stream_input(asbx):
    h = await asbx.commands.run("cat", background=True, stdin=True)
    async with asbx.commands.stream_input(h.pid) as inp:
        for i in range(3):
            await inp.send(f"s{i}\n")
    await asbx.commands.close_stdin(h.pid)
    assert (await h.wait()).stdout == "s0\ns1\ns2\n"


async def test_files(asbx):
    d = f"/home/user/async-{uuid.uuid4().hex[:6]}"
    assert await asbx.files.make_dir(d) is True
    assert await asbx.files.make_dir(d) is False
    await asbx.files.write(f"{d}/a.txt", "async text")
    await asbx.files.write(f"{d}/sub/b.bin", bytes(range(256)))
    assert await asbx.files.read(f"{d}/a.txt") == "async text"
    assert bytes(await asbx.files.read(f"{d}/sub/b.bin", format="bytes")) == bytes(range(256))
    assert await asbx.files.read(f"{d}/a.txt", gzip=True) == "async text"
    await asbx.files.write(f"{d}/gz.txt", "zipped " * 100, gzip=True)
    assert await asbx.files.read(f"{d}/gz.txt") == "zipped " * 100
    entries = {e.path: e.type for e in await asbx.files.list(d, depth=2)}
    assert entries == {
        f"{d}/a.txt": FileType.FILE,
        f"{d}/gz.txt": FileType.FILE,
        f"{d}/sub": FileType.DIR,
        f"{d}/sub/b.bin": FileType.FILE,
    }
    assert await asbx.files.exists(f"{d}/a.txt")
    i = await asbx.files.get_info(f"{d}/sub/b.bin")
    assert i.size == 256 and i.owner == "user"
    moved = await asbx.files.rename(f"{d}/a.txt", f"{d}/c.txt")
    assert moved.path == f"{d}/c.txt"
    assert not await asbx.files.exists(f"{d}/a.txt")
    with pytest.raises(FileNotFoundException):
        await asbx.files.read(f"{d}/a.txt")
    await asbx.files.remove(d)
    assert not await asbx.files.exists(d)
    await asbx.files.remove(d)  # missing: fine


async def test_watch_dir_stream(asbx):
    """async watch_dir: the WatchDir server stream delivers events to
    on_event until stop(); recursive too."""
    d = f"/home/user/awatch-{uuid.uuid4().hex[:6]}"
    await asbx.files.make_dir(f"{d}/sub")
    events = []
    arrived = asyncio.Event()

    def on_event(e):
        events.append((e.name, e.type))
        arrived.set()

    h = await asbx.files.watch_dir(d, on_event=on_event, recursive=True)
    try:
        await asbx.files.write(f"{d}/x.txt", "1")
        await asbx.files.write(f"{d}/sub/y.txt", "2")
        await asbx.files.remove(f"{d}/x.txt")
        want = {
            ("x.txt", FilesystemEventType.CREATE),
            ("sub/y.txt", FilesystemEventType.CREATE),
            ("x.txt", FilesystemEventType.REMOVE),
        }
        for _ in range(100):
            if want <= set(events):
                break
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), 0.3)
            except asyncio.TimeoutError:
                pass
        assert want <= set(events), events
    finally:
        await h.stop()
        await asbx.files.remove(d)


async def test_pause_connect_kill():
    s = await AsyncSandbox.create(timeout=SANDBOX_TIMEOUT, metadata=metadata())
    try:
        await s.files.write("/home/user/p.txt", "paused")
        assert await s.pause() is True
        assert not await s.is_running()
        r = await AsyncSandbox.connect(s.sandbox_id)
        assert await r.files.read("/home/user/p.txt") == "paused"
        assert (await r.commands.run("echo back")).stdout == "back\n"
    finally:
        assert await s.kill() is True
    assert await AsyncSandbox.kill(s.sandbox_id) is False
    assert not await s.is_running()
    with pytest.raises(SandboxException):
        await s.commands.run("true")
