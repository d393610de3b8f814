//! Starting a VMM in its jail: `clone3` with new mount, PID, IPC and UTS
//! namespaces and a pidfd; the child builds the tree of its
//! [`PreparedJail`], `pivot_root`s into it, drops to the jail uid and gid
//! (no supplementary groups), sets `no_new_privs` and rlimits and executes
//! the VMM, which is PID 1 of its namespace. The daemon sees its host pid,
//! watches and reaps it through the pidfd, and signals it through it.
//!
//! The child is a copy of a multi-threaded process: between `clone3` and
//! `execve` it only makes system calls on data prepared before (no
//! allocation, no locks). A failure there is written to a close-on-exec pipe
//! as (step, errno); end of file on the pipe means `execve` succeeded.

use std::ffi::{c_char, CString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use agentenv_core::backend::VmmError;

use super::{Op, PreparedJail, RLIMIT_NOFILE, RLIMIT_NPROC};
use crate::process::{SpawnSpec, VmmProcess};

/// `struct clone_args` of `clone3(2)` (the size of its first version plus
/// `set_tid`, `set_tid_size` and `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Steps of the child other than the tree's operations (those are their index).
const STEP_SIGNALS: u32 = u32::MAX;
const STEP_FDS: u32 = u32::MAX - 1;
const STEP_PRIVATE: u32 = u32::MAX - 2;
const STEP_TMPFS: u32 = u32::MAX - 3;
const STEP_PIVOT: u32 = u32::MAX - 4;
const STEP_READONLY: u32 = u32::MAX - 5;
const STEP_CWD: u32 = u32::MAX - 6;
const STEP_RLIMIT: u32 = u32::MAX - 7;
const STEP_IDS: u32 = u32::MAX - 8;
const STEP_NNP: u32 = u32::MAX - 9;
const STEP_EXEC: u32 = u32::MAX - 10;
const STEP_NETNS: u32 = u32::MAX - 11;
const STEP_TAP: u32 = u32::MAX - 12;
const STEP_CGROUP: u32 = u32::MAX - 13;
const STEP_INHERIT: u32 = u32::MAX - 14;

/// `TUNSETOWNER` and `TUNSETGROUP` (`_IOW('T', 204|206, int)`).
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

fn describe(step: u32, jail: &PreparedJail) -> String {
    match step {
        STEP_SIGNALS => "reset signals".into(),
        STEP_FDS => "set up stdin/stdout/stderr".into(),
        STEP_PRIVATE => "make mounts private".into(),
        STEP_TMPFS => format!("mount a tmpfs at {}", jail.root.to_string_lossy()),
        STEP_PIVOT => format!("pivot_root into {}", jail.root.to_string_lossy()),
        STEP_READONLY => "remount the jail root read-only".into(),
        STEP_CWD => "change to the working directory".into(),
        STEP_RLIMIT => "set rlimits".into(),
        STEP_IDS => format!("switch to uid {} gid {}", jail.uid, jail.gid),
        STEP_NNP => "set no_new_privs".into(),
        STEP_EXEC => format!("execute {}", jail.exec.to_string_lossy()),
        STEP_NETNS => "join the network namespace".into(),
        STEP_TAP => "give the tap to the jail uid".into(),
        STEP_CGROUP => "join the vm's cgroup".into(),
        STEP_INHERIT => "keep the descriptors the vmm inherits open".into(),
        i => jail
            .ops
            .get(i as usize)
            .map(Op::describe)
            .unwrap_or_else(|| format!("step {i}")),
    }
}

/// Everything the child uses, ready before the clone.
struct Child<'a> {
    jail: &'a PreparedJail,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    null: RawFd,
    log: RawFd,
    err: RawFd,
    empty_mask: libc::sigset_t,
    /// `cgroup.procs` files of the VM's cgroup, opened by the parent.
    cgroup: Vec<RawFd>,
    /// Descriptors the VMM inherits (`SpawnSpec::inherit_fds`).
    inherit: Vec<RawFd>,
}

fn cstring(b: &[u8]) -> CString {
    // Arguments and environment cannot hold NUL bytes (the OS strings come
    // from paths and our own arguments); one that does is cut there.
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    CString::new(&b[..end]).expect("no interior NUL")
}

/// Starts `spec` in `jail` (see the module docs).
pub(crate) fn spawn_jailed(
    spec: &SpawnSpec,
    jail: Arc<PreparedJail>,
) -> Result<VmmProcess, VmmError> {
    let spawn_err = |source: std::io::Error| VmmError::Spawn {
        binary: spec.binary.clone(),
        source,
    };
    let log = crate::process::open_console_log(&spec.console_log)?;
    // Opened while root, before the clone: the child only writes to them.
    let join =
        crate::cgroup::CgroupJoin::open(&spec.cgroup_procs).map_err(|source| VmmError::Io {
            context: "cannot open the vm's cgroup".into(),
            source,
        })?;
    let null = File::open("/dev/null").map_err(spawn_err)?;
    // Through Firecracker's jailer: its arguments, then Firecracker's.
    let argv_c: Vec<CString> = match &jail.jailer {
        Some(run) => run
            .argv
            .iter()
            .cloned()
            .chain(spec.args.iter().map(|a| cstring(a.as_bytes())))
            .collect(),
        None => std::iter::once(spec.binary.as_os_str())
            .chain(spec.args.iter().map(|a| a.as_os_str()))
            .map(|a| cstring(a.as_bytes()))
            .collect(),
    };
    let envp_c: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            cstring(&b)
        })
        .collect();
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty_mask` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut empty_mask) };
    let child = Child {
        jail: &jail,
        argv: ptrs(&argv_c),
        envp: ptrs(&envp_c),
        null: null.as_raw_fd(),
        log: log.as_raw_fd(),
        err: wr.as_raw_fd(),
        empty_mask,
        cgroup: join.raw_fds(),
        inherit: spec.inherit_fds.iter().map(|f| f.raw()).collect(),
    };
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with a valid clone_args of the given size; without
    // CLONE_VM and with no stack the child runs on a copy of this address
    // space, like fork. The child runs only `child_main`, which makes system
    // calls on data prepared above and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: in the child, see above.
        unsafe { child_main(&child) }
    }
    if pid < 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    drop(wr);
    // SAFETY: with CLONE_PIDFD the kernel stored a fresh descriptor in `pidfd`.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut report = [0u8; 8];
    let mut got = 0;
    let mut rd = File::from(rd);
    while got < report.len() {
        match rd.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop((log, null, join));
    if got == report.len() {
        let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
        // The child exits at once: reap it.
        // SAFETY: siginfo_t is plain data; waitid writes one into `info`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a pidfd of our child, a valid siginfo_t.
        unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        jail.cleanup().run();
        let os = std::io::Error::from_raw_os_error(errno);
        return Err(VmmError::Jail(format!(
            "jail for vm {}: cannot {}: {os}",
            jail.vm_id(),
            describe(step, &jail)
        )));
    }
    Ok(VmmProcess::from_jailed_child(
        pid as u32,
        pidfd,
        jail.clone(),
        &spec.console_log,
        spec.console_log_max_bytes,
    ))
}

/// The child between `clone3` and `execve`.
///
/// # Safety
/// Only to be called in the child of `clone3`; makes only async-signal-safe
/// system calls on `c`'s prepared data, and never returns.
unsafe fn child_main(c: &Child) -> ! {
    let fail = |step: u32| -> ! {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(c.err, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    };
    let null = std::ptr::null::<c_char>();
    let j = c.jail;
    // A bind mount at `dst` remounted with `flags` (read-only, noexec, ...).
    let remount = |dst: &std::ffi::CStr, flags: libc::c_ulong| {
        libc::mount(
            null,
            dst.as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            std::ptr::null(),
        ) == 0
    };
    let limit = |resource, n: u64| {
        let l = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        libc::setrlimit(resource, &l) == 0
    };
    if libc::sigprocmask(libc::SIG_SETMASK, &c.empty_mask, std::ptr::null_mut()) != 0
        || libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
        || libc::setpgid(0, 0) != 0
    {
        fail(STEP_SIGNALS);
    }
    if libc::dup2(c.null, 0) < 0 || libc::dup2(c.log, 1) < 0 || libc::dup2(c.log, 2) < 0 {
        fail(STEP_FDS);
    }
    // Into the VM's cgroup before anything else is charged ("0": this
    // process), while still root.
    for fd in &c.cgroup {
        if libc::write(*fd, c"0".as_ptr().cast(), 1) != 1 {
            fail(STEP_CGROUP);
        }
    }
    for fd in &c.inherit {
        if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
            fail(STEP_INHERIT);
        }
    }
    if let Some(ns) = &j.netns {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            fail(STEP_NETNS);
        }
    }
    if let Some(tap) = &j.tap {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if fd < 0 {
            fail(STEP_TAP);
        }
        // SAFETY (of the zeroing): `ifreq` is plain old data; all-zero bytes
        // are a valid value (no allocation: it is on this stack).
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(tap.iter()) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if libc::ioctl(fd, libc::TUNSETIFF, &mut req) < 0
            || libc::ioctl(fd, TUNSETOWNER, j.uid as libc::c_ulong) < 0
            || libc::ioctl(fd, TUNSETGROUP, j.gid as libc::c_ulong) < 0
        {
            fail(STEP_TAP);
        }
        libc::close(fd);
    }
    // The tree's directories must be searchable by the jail uid.
    libc::umask(0o022);
    let root_fs = c"/";
    if libc::mount(
        null,
        root_fs.as_ptr(),
        null,
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        fail(STEP_PRIVATE);
    }
    // The jailer copies Firecracker into this tmpfs, executes it from there
    // and makes its device nodes in it.
    let (tmpfs_flags, tmpfs_options) = match &j.jailer {
        Some(run) => (libc::MS_NOSUID, run.tmpfs_options.as_ptr()),
        None => (
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0755,size=1m,nr_inodes=4096".as_ptr(),
        ),
    };
    if libc::mount(
        c"tmpfs".as_ptr(),
        j.root.as_ptr(),
        c"tmpfs".as_ptr(),
        tmpfs_flags,
        tmpfs_options.cast(),
    ) != 0
    {
        fail(STEP_TMPFS);
    }
    for (i, op) in j.ops.iter().enumerate() {
        let step = i as u32;
        match op {
            Op::Mkdir(p) => {
                if libc::mkdir(p.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST
                {
                    fail(step);
                }
            }
            Op::Touch(p) => {
                let fd = libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                if fd < 0 {
                    fail(step);
                }
                libc::close(fd);
            }
            Op::Symlink(target, at) => {
                if libc::symlink(target.as_ptr(), at.as_ptr()) != 0 {
                    fail(step);
                }
            }
            Op::Bind { src, dst, flags } => {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                    || !remount(dst, *flags)
                {
                    fail(step);
                }
            }
            Op::Attach { tree, dst, flags } => {
                if libc::syscall(
                    libc::SYS_move_mount,
                    *tree,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    libc::MOVE_MOUNT_F_EMPTY_PATH,
                ) != 0
                    || !remount(dst, *flags)
                {
                    fail(step);
                }
            }
            Op::DevTmpfs(p) => {
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    p.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    c"mode=0755,size=64k,nr_inodes=64".as_ptr().cast(),
                ) != 0
                {
                    fail(step);
                }
            }
            Op::Mknod {
                path,
                mode,
                dev,
                gid,
            } => {
                if libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, *dev) != 0
                    || libc::chmod(path.as_ptr(), *mode) != 0
                    || gid.is_some_and(|g| libc::chown(path.as_ptr(), 0, g) != 0)
                {
                    fail(step);
                }
            }
            Op::Proc(p) => {
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                // `subset=pid`: only the process directories (no /proc/sys,
                // no /proc/sysrq-trigger); kernels before 5.8 lack it.
                if libc::mount(
                    c"proc".as_ptr(),
                    p.as_ptr(),
                    c"proc".as_ptr(),
                    flags,
                    c"subset=pid".as_ptr().cast(),
                ) != 0
                    && libc::mount(
                        c"proc".as_ptr(),
                        p.as_ptr(),
                        c"proc".as_ptr(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                {
                    fail(step);
                }
            }
        }
    }
    if j.jailer.is_some() {
        // The jailer does the rest (pivot_root, ids, rlimits, /dev) and
        // executes Firecracker; what it does not set is set here.
        if !limit(libc::RLIMIT_NPROC, RLIMIT_NPROC) || !limit(libc::RLIMIT_CORE, 0) {
            fail(STEP_RLIMIT);
        }
        // The jailer needs no privilege an exec would grant (it is root).
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(STEP_NNP);
        }
        libc::umask(0o177);
        libc::execve(j.exec.as_ptr(), c.argv.as_ptr(), c.envp.as_ptr());
        fail(STEP_EXEC)
    }
    let dot = c".";
    if libc::chdir(j.root.as_ptr()) != 0
        || libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0
        || libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0
        || libc::chdir(root_fs.as_ptr()) != 0
    {
        fail(STEP_PIVOT);
    }
    if libc::mount(
        null,
        root_fs.as_ptr(),
        null,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        std::ptr::null(),
    ) != 0
    {
        fail(STEP_READONLY);
    }
    if let Some(cwd) = &j.cwd {
        if libc::chdir(cwd.as_ptr()) != 0 {
            fail(STEP_CWD);
        }
    }
    // As for an unjailed VMM: its sockets and files are 0600.
    libc::umask(0o177);
    if !limit(libc::RLIMIT_NOFILE, RLIMIT_NOFILE)
        || !limit(libc::RLIMIT_NPROC, RLIMIT_NPROC)
        || !limit(libc::RLIMIT_CORE, 0)
    {
        fail(STEP_RLIMIT);
    }
    // Raw system calls, not glibc's wrappers: those broadcast the change to
    // every thread glibc knows of (the parent's, copied by the clone but not
    // here) and would wait for them forever.
    if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
        || libc::syscall(libc::SYS_setresgid, j.gid, j.gid, j.gid) != 0
        || libc::syscall(libc::SYS_setresuid, j.uid, j.uid, j.uid) != 0
    {
        fail(STEP_IDS);
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        fail(STEP_NNP);
    }
    libc::execve(j.exec.as_ptr(), c.argv.as_ptr(), c.envp.as_ptr());
    fail(STEP_EXEC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::{Access, Jail};
    use agentenv_core::config::JailConfig;
    use std::path::Path;
    use std::time::Duration;

    fn root_or_skip() -> bool {
        if crate::jail::euid() != 0 {
            eprintln!("SKIPPING: jail spawn tests need root (they mount and change uid)");
            return false;
        }
        true
    }

    fn jail_in(dir: &Path) -> Jail {
        let cfg = JailConfig {
            uid_range: [960_000, 16],
            ..JailConfig::default()
        };
        Jail::new(&cfg, &dir.join("jail")).unwrap()
    }

    #[tokio::test]
    async fn a_jailed_process_is_pid_1_of_its_namespace_as_the_jail_uid_seeing_only_its_tree() {
        if !root_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let jail = jail_in(dir.path());
        let session = dir.path().join("session");
        std::fs::create_dir(&session).unwrap();
        std::fs::write(session.join("mine"), b"x").unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"host").unwrap();
        let log = session.join("console.log");
        let prepared = jail
            .prepare(
                "vm1",
                Path::new("/bin/sh"),
                &[(session.clone(), Access::Owned)],
                None,
                Some(&session),
            )
            .unwrap();
        let uid = prepared.uid();
        let script = format!(
            "echo uid=$(id -u) gid=$(id -g) groups=$(id -G) pid=$$ cwd=$(pwd); \
             ls -a /; ls {}; cat {} || echo no-secret; grep -E 'NoNewPrivs|Seccomp:' /proc/self/status; \
             ulimit -n; touch /x 2>/dev/null || echo root-ro; echo parent=$(ls -A {}); \
             ls /proc | grep -c '^[0-9]'",
            session.display(),
            secret.display(),
            dir.path().display()
        );
        let p = VmmProcess::spawn(&SpawnSpec {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            console_log: log.clone(),
            console_log_max_bytes: 1 << 20,
            inherit_fds: Vec::new(),
            cgroup_procs: Vec::new(),
            jail: Some(Arc::new(prepared)),
        })
        .unwrap();
        let exit = agentenv_core::backend::wait_exit(p.exit_watch(), Duration::from_secs(10))
            .await
            .unwrap();
        let out = std::fs::read_to_string(&log).unwrap();
        assert_eq!(exit.code, Some(0), "{out}");
        assert!(
            out.contains(&format!(
                "uid={uid} gid={} groups={} pid=1 cwd={}",
                jail.gid(),
                jail.gid(),
                session.display()
            )),
            "{out}"
        );
        assert!(out.contains("no-secret") && !out.contains("host"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(out.contains("root-ro") && out.contains("4096"), "{out}");
        assert!(out.contains("mine") && out.contains("console.log"), "{out}");
        // Only the shell (and its children) in its /proc.
        let procs: u32 = out.lines().last().unwrap().trim().parse().unwrap();
        assert!(procs <= 3, "{out}");
        // The root holds the tree's top directories; beside the session
        // directory there is nothing (no secret, no jail directories).
        for name in ["usr", "dev", "proc"] {
            assert!(out.lines().any(|l| l == name), "{name}: {out}");
        }
        assert!(out.contains("parent=session\n"), "{out}");
        // Gone: the jail directory was removed with it.
        assert!(!jail.dir("vm1").exists());
    }

    #[tokio::test]
    async fn a_jail_that_cannot_be_built_is_an_error_naming_the_step_and_leaves_nothing() {
        if !root_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let jail = jail_in(dir.path());
        let prepared = jail
            .prepare(
                "vm2",
                Path::new("/bin/sh"),
                &[],
                None,
                Some(Path::new("/nonexistent")),
            )
            .unwrap();
        let e = VmmProcess::spawn(&SpawnSpec {
            binary: "/bin/sh".into(),
            args: vec![],
            console_log: dir.path().join("c.log"),
            console_log_max_bytes: 1 << 20,
            inherit_fds: Vec::new(),
            cgroup_procs: Vec::new(),
            jail: Some(Arc::new(prepared)),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("jail for vm vm2: cannot change to the working directory"),
            "{e}"
        );
        assert!(!jail.dir("vm2").exists());
    }
}
