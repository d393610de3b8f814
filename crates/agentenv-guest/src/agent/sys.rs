//! Every OS call the agent makes that std does not wrap. Each is a small safe
//! function; the `unsafe` stays in this file.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `FIFREEZE` (`_IOWR('X', 119, int)`).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `FITHAW` (`_IOWR('X', 120, int)`).
const FITHAW: libc::c_ulong = 0xC004_5878;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sends SIGKILL to process group `pgid`.
pub fn killpg(pgid: u32) -> io::Result<()> {
    let pgid =
        libc::pid_t::try_from(pgid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pgid <= 1 {
        // Never signal "every process" or init's group by accident.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: killpg has no memory effects; pgid is a positive process group id.
    check(unsafe { libc::killpg(pgid, libc::SIGKILL) }).map(|_| ())
}

/// Blocks until child `pid` has exited, without reaping it (`WNOWAIT`), so
/// its pid (and process group id) stay reserved until `Child::wait`.
pub fn wait_exited(pid: u32) -> io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        match check(r) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reaps child `pid` (blocking until it exits).
pub fn reap(pid: u32) {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid, writable int.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Which of the descriptors given to [`poll2`] are ready (readable, hung up or in error).
pub struct Ready {
    /// The first descriptor.
    pub a: bool,
    /// The second descriptor.
    pub b: bool,
}

/// Waits until `a` or `b` is ready, or `timeout_ms` passes (-1: no limit).
pub fn poll2(a: BorrowedFd<'_>, b: Option<BorrowedFd<'_>>, timeout_ms: i32) -> io::Result<Ready> {
    let ev = libc::POLLIN;
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: ev,
            revents: 0,
        },
        libc::pollfd {
            fd: b.map_or(-1, |b| b.as_raw_fd()),
            events: ev,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs (a negative fd is ignored).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        match check(r) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    Ok(Ready {
        a: ready(&fds[0]),
        b: ready(&fds[1]),
    })
}

/// A listening `AF_VSOCK` stream socket on `port` for any CID.
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket succeeded, so fd is open and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen has no memory effects; fd is a bound socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    Ok(fd)
}

/// Accepts one connection (close-on-exec) on a listening socket.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: null address pointers are allowed; accept4 then stores no peer address.
        let r = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        match check(r) {
            // SAFETY: accept4 succeeded, so r is an open descriptor owned by nobody else.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Shuts both directions of a socket down (wakes threads blocked on it).
pub fn shutdown(fd: BorrowedFd<'_>) {
    // SAFETY: shutdown has no memory effects; a failure (not a socket, not connected) is harmless.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

fn fs_ioctl(mount_point: &Path, request: libc::c_ulong) -> io::Result<()> {
    let c = CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open succeeded, so fd is open and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: FIFREEZE/FITHAW take an unused int argument and write no memory.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, 0) }).map(|_| ())
}

/// Freezes the file system mounted at `mount_point` (`FIFREEZE`).
pub fn fifreeze(mount_point: &Path) -> io::Result<()> {
    fs_ioctl(mount_point, FIFREEZE)
}

/// Thaws the file system mounted at `mount_point` (`FITHAW`).
pub fn fithaw(mount_point: &Path) -> io::Result<()> {
    fs_ioctl(mount_point, FITHAW)
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn open_random() -> io::Result<OwnedFd> {
    // SAFETY: the path is a valid NUL-terminated string.
    let fd =
        check(unsafe { libc::open(c"/dev/random".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: open succeeded, so fd is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mixes `bytes` into the kernel's input pool and credits 8 bits of entropy
/// per byte (`RNDADDENTROPY` on /dev/random; needs `CAP_SYS_ADMIN`).
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EINVAL);
    let size = libc::c_int::try_from(bytes.len()).map_err(|_| too_big())?;
    let bits = size.checked_mul(8).ok_or_else(too_big)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; },
    // built in u32 words so the header is aligned.
    let mut info = vec![0u32; 2 + bytes.len().div_ceil(4)];
    info[0] = bits as u32;
    info[1] = size as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    let fd = open_random()?;
    // SAFETY: `info` is a rand_pool_info whose buffer holds `size` bytes; the
    // kernel only reads it during the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) }).map(|_| ())
}

/// Reseeds the kernel's CRNG from its input pool at once (`RNDRESEEDCRNG`).
pub fn reseed_crng() -> io::Result<()> {
    let fd = open_random()?;
    // SAFETY: RNDRESEEDCRNG takes no argument and writes no memory.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), RNDRESEEDCRNG as _, 0) }).map(|_| ())
}

/// Sets the wall clock (`clock_settime(CLOCK_REALTIME)`).
pub fn set_realtime(secs: u64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(secs)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        tv_nsec: nanos as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec read only during the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

/// Sets the host name (`sethostname`).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, read only during the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}
