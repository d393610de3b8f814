#!/usr/bin/env python3
"""Boots the guest artifacts under QEMU microvm the way agentenv's QEMU backend does and
checks the guest contract (docs/guest-contract.md) end to end.

Scenarios (all by default; pick some with --only):
  overlay     read-only base + overlay disk + two host shares (ro, rw): the guest agent is
              started (when the image has one), AGENTENV_READY,
              heartbeats, QMP stop/cont stops/resumes them, a file written in the guest lands
              in the overlay's upper/ and the base image is unchanged, the shares are mounted
              with the right mode, QMP system_powerdown ends QEMU with status 0, disks clean
  direct      read-write root, no overlay, agentenv.agent=0 (no agent started): boots, a
              written file lands in the image,
              Ctrl-Alt-Del ends QEMU with 0 (QMP send-key when --qemu-arg i8042 gives microvm
              a keyboard controller, else SIGINT to init, what the key press becomes)
  poweroff    `poweroff` typed in the guest ends QEMU with 0 and leaves the disk clean
  noroot      agentenv.root names a missing disk: "Kernel panic - not syncing", QEMU exits
  nordinit    rdinit=/nonexistent: "Kernel panic - not syncing", QEMU exits
A reboot or panic must end QEMU without the kernel booting a second time; on microvm that
needs --qemu-arg=-device --qemu-arg=i8042 (see docs/guest-contract.md, Power). On a busy
host TCG boots can hang in TSC calibration: --tsc-early-khz avoids it.

Needs qemu-system-x86_64, e2fsprogs (mkfs.ext4, debugfs). Never leaves a QEMU running.
Exit status 0 when every scenario passed.
"""

import argparse
import hashlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


def host_tsc_khz():
    """The host's TSC rate in kHz (TCG's guest TSC runs at it), from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise SystemExit("--tsc-early-khz: no 'cpu MHz' in /proc/cpuinfo")


def die_with_parent():
    """In the child: SIGKILL when this script dies, so no QEMU outlives it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Qemu:
    """One QEMU microvm with its serial console on stdio and QMP on a Unix socket."""

    def __init__(self, args, workdir, name, append, drives, log):
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.log_path = os.path.join(workdir, f"{name}.console.log")
        cmd = [
            args.qemu, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-accel", args.accel, "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", args.kernel, "-initrd", args.initrd,
            "-append", " ".join([append] + (args.boot_arg or [])),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        cmd += args.qemu_arg or []
        for i, (path, readonly) in enumerate(drives):
            ro = ",readonly=on" if readonly else ""
            cmd += ["-drive", f"id=d{i},file={path},format=raw,if=none{ro}",
                    "-device", f"virtio-blk-device,drive=d{i}"]
        self.cmd = cmd
        self.log = log
        self.lines = []  # (seconds since start, text)
        self.cond = threading.Condition()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.qmp = None

    def _read(self):
        buf = b""
        with open(self.log_path, "wb") as log:
            while True:
                chunk = self.proc.stdout.read1(4096)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                buf += chunk
                *done, buf = buf.split(b"\n")
                with self.cond:
                    for raw in done:
                        self.lines.append((time.monotonic() - self.start,
                                           raw.decode("utf-8", "replace").rstrip("\r")))
                    self.cond.notify_all()
        with self.cond:
            if buf:
                self.lines.append((time.monotonic() - self.start, buf.decode("utf-8", "replace")))
            self.cond.notify_all()

    def wait_for(self, needle, timeout, since=0):
        """Seconds (since QEMU start) of the first line at index >= since containing needle."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines[since:]:
                    if needle in line:
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    return None
                self.cond.wait(min(left, 0.2))

    def count(self, needle):
        with self.cond:
            return sum(1 for _, line in self.lines if needle in line)

    def mark(self):
        with self.cond:
            return len(self.lines)

    def type(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def qmp_cmd(self, command, **arguments):
        if self.qmp is None:
            deadline = time.monotonic() + 10
            while True:
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(self.qmp_path)
                    break
                except OSError:
                    s.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.qmp = s.makefile("rw")
            json.loads(self.qmp.readline())  # greeting
            self._qmp_send("qmp_capabilities")
        return self._qmp_send(command, **arguments)

    def _qmp_send(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        t0 = time.monotonic()
        self.qmp.write(json.dumps(msg) + "\n")
        self.qmp.flush()
        while True:
            reply = json.loads(self.qmp.readline())
            if "return" in reply or "error" in reply:
                self.log(f"    qmp {command}: {json.dumps(reply)} ({(time.monotonic() - t0) * 1000:.1f} ms)")
                return reply

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        if self.qmp is not None:
            try:
                self.qmp.close()
            except OSError:
                pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def debugfs(image, request):
    return subprocess.run(["debugfs", "-R", request, image], capture_output=True, text=True).stdout


def fsck_copy(image, workdir):
    """A journal-replayed copy of image (debugfs reads without replaying the journal)."""
    copy = os.path.join(workdir, os.path.basename(image) + ".fsck")
    shutil.copyfile(image, copy)
    subprocess.run(["e2fsck", "-fy", copy], capture_output=True)
    return copy


class Checker:
    def __init__(self):
        self.failures = []

    def check(self, ok, what):
        print(f"    {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)
        return ok


def excerpt(vm, needles, limit=12):
    with vm.cond:
        lines = [(t, line) for t, line in vm.lines if any(n in line for n in needles)]
    for t, line in lines[:limit]:
        print(f"      [{t:6.2f}s] {line}")


def check_booted_once(vm, c, what):
    """A reboot or panic must end QEMU, not restart the guest (see docs/guest-contract.md)."""
    boots = vm.count("Linux version")
    c.check(boots == 1, f"{what} ended QEMU without booting the kernel again ({boots} boot(s);"
            " without an i8042 on microvm reboot=k falls back to a BIOS restart)")


def login(vm):
    """Opens the console shell (agentenv-console waits for Enter)."""
    vm.wait_for("press Enter for a shell", 10)
    vm.type("\n")
    time.sleep(0.5)


def scenario_overlay(args, work, c):
    base = args.rootfs
    before = sha256(base)
    overlay = os.path.join(work, "overlay.ext4")
    subprocess.run(["truncate", "-s", "1G", overlay], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", overlay], check=True)
    # Two host shares as the daemon builds them: ext4 images made from directories.
    src = os.path.join(work, "share-src")
    os.makedirs(src)
    with open(os.path.join(src, "from-host.txt"), "w") as f:
        f.write("hello from the host\n")
    ro_share = os.path.join(work, "share-ro.ext4")
    rw_share = os.path.join(work, "share-rw.ext4")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", src, ro_share, "16M"], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", rw_share, "16M"], check=True)
    append = (f"{BOOT_ARGS} agentenv.vm_id=t1 agentenv.root=/dev/vda agentenv.overlay=/dev/vdb"
              " agentenv.heartbeat=1 agentenv.share=/dev/vdc:/mnt/host-ro:ro"
              " agentenv.share=/dev/vdd:/srv/data:rw")
    drives = [(base, True), (overlay, False), (ro_share, True), (rw_share, False)]
    vm = Qemu(args, work, "overlay", append, drives, print)
    try:
        ready = vm.wait_for("AGENTENV_READY vm_id=t1", args.timeout)
        c.check(ready is not None, f"AGENTENV_READY vm_id=t1 ({ready:.2f} s after QEMU start)" if ready else "AGENTENV_READY")
        if ready is None:
            return
        if vm.wait_for("no guest agent in this image", 0) is None:
            c.check(vm.wait_for("guest agent /usr/sbin/agentenv-guest started", 0) is not None,
                    "overlay-init started the guest agent")
        t = vm.wait_for("agentenv-heartbeat 5", 10)
        c.check(t is not None, f"heartbeats (5th at {t:.2f} s)" if t else "heartbeats")
        time.sleep(1)
        vm.qmp_cmd("stop")
        time.sleep(0.3)  # a line may be in flight
        n0 = vm.count("agentenv-heartbeat")
        time.sleep(2)
        n1 = vm.count("agentenv-heartbeat")
        c.check(n1 == n0, f"no heartbeat while stopped ({n0} before, {n1} after 2 s)")
        status = vm.qmp_cmd("query-status")["return"]["status"]
        c.check(status == "paused", f"query-status says {status}")
        mark = vm.mark()
        vm.qmp_cmd("cont")
        t_cont = time.monotonic() - vm.start
        t = vm.wait_for("agentenv-heartbeat", 5, mark)
        c.check(t is not None, f"heartbeats resume after cont (first after {t - t_cont:.2f} s)" if t else "heartbeats resume after cont")
        time.sleep(2)
        n2 = vm.count("agentenv-heartbeat")
        print(f"    ({n2 - n1} heartbeats in the 2+ s after cont)")
        login(vm)
        mark = vm.mark()
        vm.type("echo agentenv-overlay-test > /root/written-in-guest.txt; sync;"
                " grep -c agentenv-overlay-test /root/written-in-guest.txt && echo WRITE-$((40+2))\n")
        c.check(vm.wait_for("WRITE-42", 10, mark) is not None, "file written in the guest")
        mark = vm.mark()
        vm.type("cat /mnt/host-ro/from-host.txt; touch /mnt/host-ro/x 2>/dev/null || echo RO-$((40+2));"
                " echo guest-data > /srv/data/from-guest.txt && sync && echo RW-$((40+2))\n")
        c.check(vm.wait_for("hello from the host", 10, mark) is not None, "read-only share readable at /mnt/host-ro")
        c.check(vm.wait_for("RO-42", 10, mark) is not None, "read-only share refuses writes")
        c.check(vm.wait_for("RW-42", 10, mark) is not None, "read-write share writable at /srv/data")
        vm.type("mount | grep -E ' / |agentenv|/dev/vd'; hostname\n")
        time.sleep(1.5)
        t0 = time.monotonic()
        vm.qmp_cmd("system_powerdown")
        rc = vm.wait_exit(args.timeout)
        dt = time.monotonic() - t0
        c.check(rc == 0, f"system_powerdown: QEMU exited by itself with status {rc} after {dt:.2f} s")
        excerpt(vm, ["Run /init", "agentenv-initramfs", "overlay-init", "AGENTENV_READY",
                     "agentenv: ", "overlay on /", "/run/agentenv", "/dev/vdc", "/dev/vdd", "reboot: ",
                     "Power down"], limit=20)
    finally:
        vm.kill()
    c.check(sha256(base) == before, "base image sha256 unchanged")
    listing = debugfs(overlay, "ls -l /upper/root")
    c.check("written-in-guest.txt" in listing, "debugfs: /upper/root/written-in-guest.txt is in the overlay disk")
    content = debugfs(overlay, "cat /upper/root/written-in-guest.txt")
    c.check("agentenv-overlay-test" in content, f"its content: {content.strip()!r}")
    c.check("written-in-guest.txt" not in debugfs(base, "ls -l /root"), "the base image has no such file")
    state = debugfs(overlay, "stats")
    c.check("Filesystem state:         clean" in state, "overlay disk's ext4 was left clean")
    c.check("guest-data" in debugfs(rw_share, "cat /from-guest.txt"), "debugfs: the guest's file is on the read-write share")


def scenario_direct(args, work, c):
    disk = os.path.join(work, "direct.ext4")
    shutil.copyfile(args.rootfs, disk)
    append = f"{BOOT_ARGS} agentenv.vm_id=d1 agentenv.root=/dev/vda agentenv.agent=0"
    vm = Qemu(args, work, "direct", append, [(disk, False)], print)
    try:
        ready = vm.wait_for("AGENTENV_READY vm_id=d1", args.timeout)
        c.check(ready is not None, f"direct disk: AGENTENV_READY vm_id=d1 ({ready:.2f} s)" if ready else "direct disk boots")
        if ready is None:
            return
        c.check(vm.count("agentenv-heartbeat") == 0, "no heartbeats without agentenv.heartbeat=1")
        c.check(vm.count("guest agent not started (agentenv.agent=0)") == 1
                and vm.count("agentenv-guest") == 0, "agentenv.agent=0: no guest agent started")
        login(vm)
        mark = vm.mark()
        vm.type("echo direct-test > /root/direct.txt; sync; echo WRITE-$((40+2))\n")
        c.check(vm.wait_for("WRITE-42", 10, mark) is not None, "file written on the direct disk")
        t0 = time.monotonic()
        if "i8042" in (args.qemu_arg or []):
            # A real key press through the keyboard controller, as Firecracker's SendCtrlAltDel.
            how = "QMP send-key ctrl-alt-delete"
            vm.qmp_cmd("send-key", keys=[{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")])
        else:
            # microvm has no keyboard controller: deliver what the key press becomes.
            how = "SIGINT to init, what the key press becomes"
            vm.type("kill -INT 1\n")
        rc = vm.wait_exit(args.timeout)
        c.check(rc == 0, f"Ctrl-Alt-Del ({how}): QEMU exited with status {rc} after {time.monotonic() - t0:.2f} s")
        check_booted_once(vm, c, "the reboot")
        excerpt(vm, ["agentenv-initramfs", "AGENTENV_READY", "agentenv: ", "reboot: "])
    finally:
        vm.kill()
    c.check("direct-test" in debugfs(disk, "cat /root/direct.txt"), "debugfs: /root/direct.txt is on the disk")
    c.check("Filesystem state:         clean" in debugfs(disk, "stats"), "direct disk's ext4 was left clean")


def scenario_poweroff(args, work, c):
    disk = os.path.join(work, "poweroff.ext4")
    shutil.copyfile(args.rootfs, disk)
    append = f"{BOOT_ARGS} agentenv.vm_id=p0 agentenv.root=/dev/vda"
    vm = Qemu(args, work, "poweroff", append, [(disk, False)], print)
    try:
        ready = vm.wait_for("AGENTENV_READY vm_id=p0", args.timeout)
        c.check(ready is not None, "boots")
        if ready is None:
            return
        login(vm)
        t0 = time.monotonic()
        vm.type("echo poweroff-test > /root/p.txt; poweroff\n")
        rc = vm.wait_exit(args.timeout)
        c.check(rc == 0, f"'poweroff' in the guest: QEMU exited with status {rc} after {time.monotonic() - t0:.2f} s")
    finally:
        vm.kill()
    c.check("poweroff-test" in debugfs(disk, "cat /root/p.txt"), "debugfs: the file written before poweroff is on the disk")
    c.check("Filesystem state:         clean" in debugfs(disk, "stats"), "the disk's ext4 was left clean")


def scenario_panic(args, work, c, name, append, drives, what):
    vm = Qemu(args, work, name, append, drives, print)
    try:
        t = vm.wait_for("Kernel panic - not syncing", args.timeout)
        c.check(t is not None, f"{what}: 'Kernel panic - not syncing' at {t:.2f} s" if t else f"{what}: kernel panic")
        rc = vm.wait_exit(args.timeout)
        c.check(rc is not None, f"{what}: QEMU exited by itself (status {rc})")
        check_booted_once(vm, c, f"{what}: the panic")
        excerpt(vm, ["FATAL", "Kernel panic", "Failed to execute", "VFS:"])
    finally:
        vm.kill()


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    art = os.path.join(repo, "artifacts")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default=os.path.join(art, "kernels/vmlinuz"), help="bzImage (default: %(default)s)")
    p.add_argument("--initrd", default=os.path.join(art, "initramfs/initrd.img"), help="initramfs (default: %(default)s)")
    p.add_argument("--rootfs", default=os.path.join(art, "rootfs/minimal.ext4"), help="minimal rootfs (default: %(default)s)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (default: %(default)s)")
    p.add_argument("--accel", default="tcg", help="QEMU accelerator (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for each boot or exit (default: %(default)s)")
    p.add_argument("--qemu-arg", action="append", metavar="ARG",
                   help="extra QEMU argument, repeatable (e.g. --qemu-arg=-device --qemu-arg=i8042)")
    p.add_argument("--boot-arg", action="append", metavar="ARG",
                   help="extra kernel parameter, repeatable (e.g. tsc_early_khz=2600000)")
    p.add_argument("--tsc-early-khz", action="store_true",
                   help="add tsc_early_khz=<host TSC kHz>: TCG boots then survive a busy host")
    p.add_argument("--only", action="append", choices=["overlay", "direct", "poweroff", "noroot", "nordinit"],
                   help="run only this scenario (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (console logs, disks)")
    args = p.parse_args()
    for flag, path in [("--kernel", args.kernel), ("--initrd", args.initrd), ("--rootfs", args.rootfs)]:
        if not os.path.isfile(path):
            p.error(f"{flag}: no such file {path} (run scripts/build-artifacts.sh)")
    for tool in [args.qemu, "mkfs.ext4", "debugfs", "e2fsck"]:
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    if args.tsc_early_khz:
        args.boot_arg = (args.boot_arg or []) + [f"tsc_early_khz={host_tsc_khz()}"]
    # SIGTERM (e.g. from timeout) unwinds like Ctrl-C, so every QEMU is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="agentenv-verify-")
    c = Checker()
    only = args.only or ["overlay", "direct", "poweroff", "noroot", "nordinit"]
    try:
        if "overlay" in only:
            print("==> overlay boot (read-only base + overlay disk)", flush=True)
            scenario_overlay(args, work, c)
        if "direct" in only:
            print("==> direct-disk boot (read-write root)", flush=True)
            scenario_direct(args, work, c)
        if "poweroff" in only:
            print("==> poweroff typed in the guest", flush=True)
            scenario_poweroff(args, work, c)
        if "noroot" in only:
            print("==> missing root device", flush=True)
            scenario_panic(args, work, c, "noroot",
                           f"{BOOT_ARGS} agentenv.vm_id=p1 agentenv.root=/dev/vdz agentenv.rootwait=2",
                           [(args.rootfs, True)], "missing root")
        if "nordinit" in only:
            print("==> rdinit=/nonexistent", flush=True)
            scenario_panic(args, work, c, "nordinit", f"{BOOT_ARGS} rdinit=/nonexistent",
                           [(args.rootfs, True)], "rdinit=/nonexistent")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if c.failures:
        print(f"==> FAILED: {len(c.failures)} check(s): " + "; ".join(c.failures))
        return 1
    print("==> all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
