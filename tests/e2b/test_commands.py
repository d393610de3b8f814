"""commands.* through the sync SDK, in one shared sandbox: output, exit codes,
envs, cwd, users, timeouts, background processes, kill, stdin, re-attaching
with connect, and the process list."""

import time

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    SandboxException,
    TimeoutException,
)

from conftest import sdk_at_least, wait_until


def pids(sbx):
    return {p.pid for p in sbx.commands.list()}


def test_stdout_stderr_exit_zero(sbx):
    r = sbx.commands.run("echo out; echo err >&2; printf 'no newline'")
    assert r.exit_code == 0
    assert r.stdout == "out\nno newline"
    assert r.stderr == "err\n"
    assert r.error is None


def test_nonzero_exit_raises_command_exit_exception(sbx):
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; echo boom >&2; exit 3")
    assert e.value.exit_code == 3
    assert e.value.stdout == "partial\n"
    assert e.value.stderr == "boom\n"
    assert e.value.error and "3" in e.value.error


def test_output_callbacks_and_large_output(sbx):
    """on_stdout/on_stderr see every chunk; 300 KB of output arrives whole
    (several envd-sized chunks); non-UTF-8 bytes become replacement chars."""
    out, err = [], []
    r = sbx.commands.run(
        "for i in 1 2 3; do echo line$i; echo e$i >&2; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == r.stdout == "line1\nline2\nline3\n"
    assert "".join(err) == r.stderr == "e1\ne2\ne3\n"
    big = sbx.commands.run("head -c 300000 /dev/zero | tr '\\0' a")
    assert big.stdout == "a" * 300000
    bad = sbx.commands.run("printf 'x\\377y'")
    assert bad.stdout == "x\ufffdy"


def test_envs_sandbox_and_per_command(sbx):
    """Per-command envs apply and override the sandbox's envVars for that command only."""
    r = sbx.commands.run("echo $A:$SUITE_VAR", envs={"A": "1"})
    assert r.stdout == "1:from-create\n"
    r = sbx.commands.run("echo $SUITE_VAR", envs={"SUITE_VAR": "override"})
    assert r.stdout == "override\n"
    assert sbx.commands.run("echo $SUITE_VAR").stdout == "from-create\n"
    # The login environment of the default user.
    r = sbx.commands.run("echo $HOME:$USER")
    assert r.stdout == "/home/user:user\n"


def test_cwd(sbx):
    """cwd: the user's home by default, as given otherwise; a missing one is an error."""
    assert sbx.commands.run("pwd").stdout == "/home/user\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("pwd", cwd="/").stdout == "/\n"
    with pytest.raises((InvalidArgumentException, CommandExitException, SandboxException)):
        sbx.commands.run("pwd", cwd="/no/such/dir")


def test_user(sbx):
    """user: the default user `user`, `root` on request (uid, HOME, groups)."""
    assert sbx.commands.run("whoami").stdout == "user\n"
    r = sbx.commands.run("id -u; echo $HOME; pwd", user="root")
    assert r.stdout == "0\n/root\n/root\n"
    r = sbx.commands.run("id -un; id -u", user="user")
    assert r.stdout.split()[0] == "user" and r.stdout.split()[1] != "0"
    # Passwordless sudo, as E2B's base template has.
    assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
    # As envd: an unknown user fails authentication (`unauthenticated`).
    with pytest.raises(AuthenticationException):
        sbx.commands.run("true", user="no-such-user")


def test_timeout_raises_and_kills(sbx):
    """timeout: the SDK raises TimeoutException when it expires, and the
    process is killed with it (it leaves the process list)."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 120 # suite-timeout", timeout=2)
    assert time.monotonic() - t0 < 30
    wait_until(
        "the timed-out process to go",
        lambda: not [p for p in sbx.commands.list() if "suite-timeout" in " ".join(p.args)],
        timeout=15,
    )


def test_background_list_and_kill(sbx):
    """background=True returns at once with a pid; list() shows the process
    with its command, args and cwd; kill() ends it (wait raises, exit -1 /
    killed); a second kill of the pid returns False."""
    h = sbx.commands.run("sleep 300 # suite-bg", background=True, cwd="/tmp", envs={"BG": "1"})
    assert h.pid > 0
    procs = {p.pid: p for p in sbx.commands.list()}
    assert h.pid in procs
    p = procs[h.pid]
    assert p.cmd == "/bin/bash"
    assert any("suite-bg" in a for a in p.args)
    assert p.cwd == "/tmp"
    assert p.envs.get("BG") == "1"
    assert h.kill() is True
    with pytest.raises(CommandExitException) as e:
        h.wait()
    assert e.value.exit_code != 0
    wait_until("the killed process to leave the list", lambda: h.pid not in pids(sbx), 15)
    assert sbx.commands.kill(h.pid) is False


def test_kill_by_pid(sbx):
    h = sbx.commands.run("sleep 300", background=True)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()


def test_stdin_send_and_close(sbx):
    """stdin=True: send_stdin feeds the process (from the handle and by pid),
    close_stdin gives it EOF."""
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "hello ")
    h.send_stdin("world\n")
    sbx.commands.send_stdin(h.pid, b"bytes\n")
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "hello world\nbytes\ndone\n"


def test_stdin_closed_by_default(sbx):
    """Without stdin=True the command's stdin is at EOF: `cat` returns at once."""
    assert sbx.commands.run("cat; echo eof", timeout=20).stdout == "eof\n"


@sdk_at_least("2.63.0", "e2b 2.45.1 has no commands.stream_input")
def test_stream_input(sbx):
    """commands.stream_input (client-streaming StreamInput) feeds stdin in order."""
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, (f"chunk{i}\n" for i in range(5)))
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "".join(f"chunk{i}\n" for i in range(5))


def test_connect_to_running_process(sbx):
    """A background process survives the client's disconnect; connect(pid)
    re-attaches and gets its later output and its end."""
    h = sbx.commands.run(
        "echo first; sleep 4; echo second; sleep 1; echo third", background=True
    )
    pid = h.pid
    h.disconnect()
    h2 = sbx.commands.connect(pid)
    assert h2.pid == pid
    r = h2.wait()
    assert r.exit_code == 0
    assert "third\n" in r.stdout
    with pytest.raises(SandboxException):
        sbx.commands.connect(999999)


def test_many_commands_in_a_row(sbx):
    """Twenty short commands back to back: no stream or process is left behind."""
    before = pids(sbx)
    for i in range(20):
        assert sbx.commands.run(f"echo {i}").stdout == f"{i}\n"
    assert pids(sbx) <= before


def test_pty_resize_input_and_kill(sbx):
    """pty.create runs a login bash on a terminal: a resize (Update) reaches
    it, input goes to the terminal, output comes back as pty data; kill ends
    another one."""
    from e2b import PtySize

    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=101))
    sbx.pty.send_stdin(h.pid, b"stty size; tty; exit 0\n")
    out = bytearray()
    r = h.wait(on_pty=out.extend)
    text = out.decode(errors="replace")
    assert r.exit_code == 0
    assert "30 101" in text, text
    assert "/dev/pts/" in text, text

    h2 = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(h2.pid) is True
    with pytest.raises(CommandExitException):
        h2.wait()
