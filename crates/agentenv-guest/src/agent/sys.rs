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
    signal_group(pgid, libc::SIGKILL)
}

/// Sends `signal` to process group `pgid`.
pub fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid =
        libc::pid_t::try_from(pgid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pgid <= 1 {
        // Never signal "every process" or init's group by accident.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: killpg has no memory effects; pgid is a positive process group id.
    check(unsafe { libc::killpg(pgid, signal) }).map(|_| ())
}

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFD) has no memory effects; fd is open.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) }).map(|_| ())
}

/// A new pseudo-terminal of `cols`×`rows`: (master, slave), both close-on-exec.
pub fn openpty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(cols, rows);
    // SAFETY: master and slave are valid out-pointers; a null name and
    // termios are allowed; `ws` is read only during the call.
    check(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    })?;
    // SAFETY: openpty succeeded, so both descriptors are open and owned by nobody else.
    let fds = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_cloexec(&fds.0)?;
    set_cloexec(&fds.1)?;
    Ok(fds)
}

/// Sets a terminal's size (`TIOCSWINSZ`; its foreground group gets SIGWINCH).
pub fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads a winsize, which `ws` is, during the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// The identity and terminal a command's process takes between fork and exec.
#[derive(Debug, Clone, Default)]
pub struct ChildSetup {
    /// Start a new session and make stdin (a terminal) its controlling terminal.
    pub terminal: bool,
    /// Become this user: (supplementary groups, gid, uid).
    pub user: Option<(Vec<libc::gid_t>, libc::gid_t, libc::uid_t)>,
}

impl ChildSetup {
    /// Runs in the forked child before exec: only system calls (no
    /// allocation), as a `pre_exec` hook must.
    pub fn apply(&self) -> io::Result<()> {
        if self.terminal {
            // SAFETY: setsid has no memory effects.
            check(unsafe { libc::setsid() })?;
            // SAFETY: TIOCSCTTY takes an int argument (0: do not steal) and writes no memory.
            check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })?;
        }
        if let Some((groups, gid, uid)) = &self.user {
            // SAFETY: the pointer and length describe `groups`, read only during the call.
            check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
            // SAFETY: setgid and setuid have no memory effects; groups first,
            // then the gid, then the uid (after which the others are not allowed).
            check(unsafe { libc::setgid(*gid) })?;
            // SAFETY: as above.
            check(unsafe { libc::setuid(*uid) })?;
        }
        Ok(())
    }
}

/// A non-blocking, close-on-exec inotify instance.
pub fn inotify_init() -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 has no memory effects.
    let fd = check(unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) })?;
    // SAFETY: inotify_init1 succeeded, so fd is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds (or updates) a watch on `path`; returns its descriptor.
pub fn inotify_add(fd: BorrowedFd<'_>, path: &Path, mask: u32) -> io::Result<i32> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path read only during the call.
    check(unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) })
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

/// `struct rtentry` (linux/route.h; libc has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An `AF_INET` datagram socket for the interface ioctls.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket succeeded, so fd is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming `dev`, the rest zero.
fn ifreq(dev: &str) -> io::Result<libc::ifreq> {
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ || dev.contains('\0') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: ifreq is plain old data (a name and a union of plain fields); all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// `sockaddr_in` for `addr`, as the `sockaddr` the ioctls take.
fn inet_addr(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data
    // structs; this is the cast every C caller of these ioctls makes.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// One interface ioctl with `req` on an `AF_INET` socket.
fn if_ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq for the whole call; the kernel reads and
    // writes only within it for these requests.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) })
        .map(|_| ())
}

/// Brings `dev` up or down (`SIOCSIFFLAGS`). Taking an interface down also
/// drops its IPv4 routes and its neighbour (ARP) entries.
pub fn set_link_up(dev: &str, up: bool) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut r = ifreq(dev)?;
    if_ioctl(&sock, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    let want = libc::IFF_UP as libc::c_short;
    r.ifr_ifru.ifru_flags = if up { flags | want } else { flags & !want };
    if_ioctl(&sock, libc::SIOCSIFFLAGS, &mut r)
}

/// Sets `dev`'s Ethernet address (`SIOCSIFHWADDR`).
pub fn set_mac(dev: &str, mac: [u8; 6]) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut r = ifreq(dev)?;
    // SAFETY: sockaddr is plain old data; all-zero is a valid value.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in hw.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    r.ifr_ifru.ifru_hwaddr = hw;
    if_ioctl(&sock, libc::SIOCSIFHWADDR, &mut r)
}

/// Removes every IPv4 address labelled `dev`, then gives it `addr/prefix_len`
/// (`SIOCSIFADDR`: setting 0.0.0.0 deletes the address it finds first).
pub fn replace_ipv4(dev: &str, addr: std::net::Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    let sock = inet_socket()?;
    for _ in 0..256 {
        let mut r = ifreq(dev)?;
        match if_ioctl(&sock, libc::SIOCGIFADDR, &mut r) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => break,
            Err(e) => return Err(e),
        }
        r.ifr_ifru.ifru_addr = inet_addr(std::net::Ipv4Addr::UNSPECIFIED);
        if_ioctl(&sock, libc::SIOCSIFADDR, &mut r)?;
    }
    let mut r = ifreq(dev)?;
    r.ifr_ifru.ifru_addr = inet_addr(addr);
    if_ioctl(&sock, libc::SIOCSIFADDR, &mut r)?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    let mut r = ifreq(dev)?;
    r.ifr_ifru.ifru_netmask = inet_addr(std::net::Ipv4Addr::from(mask));
    if_ioctl(&sock, libc::SIOCSIFNETMASK, &mut r)
}

/// Adds the default route through `gateway` on `dev` (`SIOCADDRT`); one that
/// exists already is fine.
pub fn add_default_route(dev: &str, gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let dev = CString::new(dev).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let any = inet_addr(std::net::Ipv4Addr::UNSPECIFIED);
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: any,
        rt_gateway: inet_addr(gateway),
        rt_genmask: any,
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_ptr() as *mut libc::c_char,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `rt` is a valid rtentry and `dev` (which rt_dev points to)
    // outlives the call; the kernel only reads them.
    match check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &mut rt) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}
