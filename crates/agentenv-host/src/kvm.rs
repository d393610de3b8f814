//! Can KVM actually run a guest here?
//!
//! Opening `/dev/kvm` proves little: on hosts whose `/dev/kvm` is a paravirtual
//! nested KVM (`kvm_pvm`) VMMs start and their APIs work, but guests crawl and
//! die. A tiny real-mode guest is no test either: KVM's instruction emulator runs
//! it there. So [`kvm_usable`] boots a probe guest the way a kernel runs, in
//! 64-bit long mode with paging, spinning [`PROBE_LOOPS`] times (a few ms on
//! hardware virtualization, seconds when emulated) before it writes 0x2a to
//! port 0x10 and halts; KVM must report that port write in time. The probe runs
//! in a forked child that is killed when it does not answer within
//! [`PROBE_TIMEOUT`], so a hanging vCPU cannot hang the caller.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::qemu::Accel;

/// How long the probe guest may take before KVM is declared unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Iterations of the probe's busy loop: a few ms at one per cycle; under kvm_pvm
/// (measured: ~0.47 µs each, about 1000 times slower) some 5 s.
pub const PROBE_LOOPS: u32 = 10_000_000;

/// The probe guest (64-bit):
/// `mov ecx, PROBE_LOOPS; 1: dec ecx; jnz 1b; mov al, 0x2a; out 0x10, al; hlt`.
const PROBE_CODE: [u8; 14] = {
    let n = PROBE_LOOPS.to_le_bytes();
    [
        0xb9, n[0], n[1], n[2], n[3], // mov ecx, imm32
        0xff, 0xc9, // dec ecx
        0x75, 0xfc, // jnz -4
        0xb0, 0x2a, // mov al, 0x2a
        0xe6, 0x10, // out 0x10, al
        0xf4, // hlt
    ]
};
const PROBE_PORT: u16 = 0x10;
const PROBE_VALUE: u8 = 0x2a;
/// The probe's memory, at guest-physical 0: page tables, then code.
const MEM_SIZE: usize = 0x10000;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
const CODE_ADDR: u64 = 0x4000;

// Control register and EFER bits for 64-bit mode with paging.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

// From <linux/kvm.h> (x86_64). Request numbers are `_IO(0xAE, n)`, or
// `_IOR`/`_IOW` with the argument's size encoded.
const KVM_GET_API_VERSION: u64 = 0xae00;
const KVM_CREATE_VM: u64 = 0xae01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xae04;
const KVM_CREATE_VCPU: u64 = 0xae41;
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
const KVM_RUN: u64 = 0xae80;
const KVM_SET_REGS: u64 = 0x4090_ae82;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_SET_SREGS: u64 = 0x4138_ae84;
const KVM_API_VERSION: i32 = 12;

const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_IO_OUT: u8 = 1;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmUserspaceMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmRegs {
    gpr: [u64; 16],
    rip: u64,
    rflags: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmSegment {
    base: u64,
    limit: u32,
    selector: u16,
    type_: u8,
    present: u8,
    dpl: u8,
    db: u8,
    s: u8,
    l: u8,
    g: u8,
    avl: u8,
    unusable: u8,
    padding: u8,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmDtable {
    base: u64,
    limit: u16,
    padding: [u16; 3],
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmSregs {
    segs: [KvmSegment; 8], // cs, ds, es, fs, gs, ss, tr, ldt
    gdt: KvmDtable,
    idt: KvmDtable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
    interrupt_bitmap: [u64; 4],
}

// The request numbers above encode these sizes.
const _: () = assert!(std::mem::size_of::<KvmUserspaceMemoryRegion>() == 0x20);
const _: () = assert!(std::mem::size_of::<KvmRegs>() == 0x90);
const _: () = assert!(std::mem::size_of::<KvmSregs>() == 0x138);

// Offsets in `struct kvm_run`.
const RUN_EXIT_REASON: usize = 8;
const RUN_IO_DIRECTION: usize = 32;
const RUN_IO_SIZE: usize = 33;
const RUN_IO_PORT: usize = 34;
const RUN_IO_COUNT: usize = 36;
const RUN_IO_DATA_OFFSET: usize = 40;
/// `internal.suberror` for KVM_EXIT_INTERNAL_ERROR, `fail_entry`'s reason for
/// KVM_EXIT_FAIL_ENTRY: the union's first field either way.
const RUN_UNION: usize = 32;

/// What the probe child reports through its pipe. Plain integers, so the child
/// writes it without allocating.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ProbeReport {
    /// The step that failed, or [`Step::Done`].
    step: u32,
    /// `errno` of the failed call.
    errno: i32,
    /// `kvm_run.exit_reason` after KVM_RUN.
    exit_reason: u32,
    /// The first 32 bits of the exit's details (port and value for an I/O exit,
    /// the suberror for an internal error).
    detail: u32,
    /// The port-write value for an I/O exit.
    value: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Step {
    Open = 1,
    ApiVersion,
    CreateVm,
    GuestMemory,
    SetMemoryRegion,
    CreateVcpu,
    VcpuMmapSize,
    MapRun,
    GetSregs,
    SetSregs,
    SetRegs,
    Run,
    Done,
}

impl Step {
    fn name(n: u32) -> &'static str {
        const NAMES: [&str; 13] = [
            "open /dev/kvm",
            "KVM_GET_API_VERSION",
            "KVM_CREATE_VM",
            "mmap guest memory",
            "KVM_SET_USER_MEMORY_REGION",
            "KVM_CREATE_VCPU",
            "KVM_GET_VCPU_MMAP_SIZE",
            "mmap kvm_run",
            "KVM_GET_SREGS",
            "KVM_SET_SREGS",
            "KVM_SET_REGS",
            "KVM_RUN",
            "done",
        ];
        NAMES
            .get((n as usize).wrapping_sub(1))
            .copied()
            .unwrap_or("unknown step")
    }
}

/// Whether KVM can run a guest here, and why (for the log). Blocks for up to
/// about twice [`PROBE_TIMEOUT`]; call it at startup or from `spawn_blocking`.
pub fn kvm_usable() -> (bool, String) {
    let facts = host_facts();
    if !Path::new("/dev/kvm").exists() {
        return (false, format!("no /dev/kvm ({facts})"));
    }
    let start = Instant::now();
    let (ok, what) = match run_probe(PROBE_TIMEOUT) {
        Ok(report) => describe(&report),
        Err(e) => (false, e),
    };
    let ms = start.elapsed().as_millis();
    let verdict = if ok { "usable" } else { "unusable" };
    (
        ok,
        format!("kvm {verdict}: probe guest {what} in {ms} ms ({facts})"),
    )
}

/// KVM when [`kvm_usable`] says so, TCG otherwise, with the reason.
pub fn choose_accel() -> (Accel, String) {
    let (ok, why) = kvm_usable();
    let accel = if ok { Accel::Kvm } else { Accel::Tcg };
    (accel, format!("accel {accel}: {why}"))
}

/// Cheap facts for the reason string: CPU virtualization flags and KVM modules.
fn host_facts() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    let cpu = match (has("vmx"), has("svm")) {
        (true, _) => "cpu has vmx",
        (_, true) => "cpu has svm",
        _ => "cpu has no vmx/svm",
    };
    let mut facts = vec![cpu.to_string()];
    if has("hypervisor") {
        facts.push("running under a hypervisor".into());
    }
    let modules: Vec<&str> = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    if modules.is_empty() {
        facts.push("no kvm module loaded".into());
    } else {
        facts.push(format!("modules: {}", modules.join(" ")));
    }
    if modules.contains(&"kvm_pvm") {
        facts.push("/dev/kvm is the paravirtual nested kvm_pvm".into());
    }
    facts.join(", ")
}

/// Reads the report: usable only when the guest wrote 0x2a to port 0x10.
fn describe(r: &ProbeReport) -> (bool, String) {
    if r.step != Step::Done as u32 {
        let err = std::io::Error::from_raw_os_error(r.errno);
        return (false, format!("failed at {}: {err}", Step::name(r.step)));
    }
    let port = r.detail & 0xffff;
    if r.exit_reason == KVM_EXIT_IO && port == PROBE_PORT as u32 && r.value == PROBE_VALUE as u32 {
        return (true, format!("wrote {:#x} to port {port:#x}", r.value));
    }
    let reason = match r.exit_reason {
        KVM_EXIT_IO => format!("KVM_EXIT_IO port {port:#x} value {:#x}", r.value),
        5 => "KVM_EXIT_HLT".into(),
        8 => "KVM_EXIT_SHUTDOWN".into(),
        9 => format!("KVM_EXIT_FAIL_ENTRY (reason {:#x})", r.detail),
        17 => format!("KVM_EXIT_INTERNAL_ERROR (suberror {})", r.detail),
        n => format!("exit reason {n}"),
    };
    (false, format!("stopped with {reason}"))
}

/// Forks, runs [`probe_child`] in the child and collects its report, killing the
/// child when it does not answer within `timeout`.
fn run_probe(timeout: Duration) -> Result<ProbeReport, String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot create a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child runs only `probe_child`, which makes raw system calls
    // (open, ioctl, mmap, write, alarm, _exit) on its own stack and never returns,
    // allocates or takes a lock, so the other threads' state copied by fork (heap
    // and stdio locks among it) is never touched.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        close(rd);
        close(wr);
        return Err(format!("cannot fork the probe: {e}"));
    }
    if pid == 0 {
        close(rd);
        probe_child(wr);
    }
    close(wr);
    let report = read_report(rd, timeout);
    close(rd);
    // The child is not reaped yet, so its pid cannot have been reused.
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    if !reap(pid, Duration::from_secs(1)) {
        tracing::warn!(pid, "kvm probe child did not die after SIGKILL");
    }
    report
}

fn close(fd: i32) {
    // SAFETY: `fd` is a descriptor this module opened and closes exactly once.
    unsafe { libc::close(fd) };
}

/// Waits for the child's report on `rd`.
fn read_report(rd: i32, timeout: Duration) -> Result<ProbeReport, String> {
    let mut report = ProbeReport::default();
    let size = std::mem::size_of::<ProbeReport>();
    let deadline = Instant::now() + timeout;
    let mut got = 0usize;
    while got < size {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "did not finish {PROBE_LOOPS} loop iterations within {} ms (hardware \
                 virtualization takes a few ms: the vcpu is emulated or hangs)",
                timeout.as_millis()
            ));
        }
        let mut pfd = libc::pollfd {
            fd: rd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if n == 0 {
            continue;
        }
        // SAFETY: the destination is the report's own bytes from offset `got`,
        // `size - got` of them, and ProbeReport is plain integers (any bytes valid).
        let r = unsafe {
            libc::read(
                rd,
                (&mut report as *mut ProbeReport as *mut u8).add(got) as *mut libc::c_void,
                size - got,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read: {e}"));
        }
        if r == 0 {
            return Err("probe process died without a report".into());
        }
        got += r as usize;
    }
    Ok(report)
}

/// Reaps `pid`, polling, for at most `timeout`. False when it is still there.
fn reap(pid: libc::pid_t, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || r < 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The forked child: runs the probe guest, writes the report to `wr`, exits.
fn probe_child(wr: i32) -> ! {
    // Should the parent vanish before killing us, do not linger.
    // SAFETY: alarm(2) only arms a timer; SIGALRM's default action ends the process.
    unsafe { libc::alarm(PROBE_TIMEOUT.as_secs() as u32 + 2) };
    let report = probe_guest();
    // SAFETY: writes the report's bytes, which live on this stack frame, to the
    // pipe; then _exit, which runs no destructors or atexit handlers of the
    // parent's copied state.
    unsafe {
        libc::write(
            wr,
            &report as *const ProbeReport as *const libc::c_void,
            std::mem::size_of::<ProbeReport>(),
        );
        libc::_exit(0)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(step: Step) -> ProbeReport {
    ProbeReport {
        step: step as u32,
        errno: errno(),
        ..ProbeReport::default()
    }
}

/// Sets up and runs the probe guest. Raw system calls only (see [`run_probe`]);
/// descriptors and mappings are left to the process exit.
fn probe_guest() -> ProbeReport {
    // SAFETY (for every ioctl below): each is made on a descriptor returned by the
    // previous step, with the request's documented argument: an integer, or a
    // pointer to a live, correctly sized #[repr(C)] value (sizes checked by the
    // const assertions above).
    let kvm = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if kvm < 0 {
        return fail(Step::Open);
    }
    // SAFETY: see above.
    if unsafe { libc::ioctl(kvm, KVM_GET_API_VERSION as _, 0) } != KVM_API_VERSION {
        return fail(Step::ApiVersion);
    }
    // SAFETY: see above.
    let vm = unsafe { libc::ioctl(kvm, KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return fail(Step::CreateVm);
    }
    // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return fail(Step::GuestMemory);
    }
    let mem = mem as *mut u8;
    // SAFETY: `mem` is MEM_SIZE writable, zeroed, page-aligned bytes; every write
    // below lies inside it (the tables at 0x1000-0x3fff, the code at 0x4000) and
    // the u64 writes are 8-byte aligned.
    unsafe {
        // Identity-map the first 2 MiB with one huge page.
        (mem.add(PML4_ADDR as usize) as *mut u64).write(PDPT_ADDR | PTE_PRESENT | PTE_WRITE);
        (mem.add(PDPT_ADDR as usize) as *mut u64).write(PD_ADDR | PTE_PRESENT | PTE_WRITE);
        (mem.add(PD_ADDR as usize) as *mut u64).write(PTE_PRESENT | PTE_WRITE | PTE_HUGE);
        std::ptr::copy_nonoverlapping(
            PROBE_CODE.as_ptr(),
            mem.add(CODE_ADDR as usize),
            PROBE_CODE.len(),
        );
    }
    let region = KvmUserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: see above; `region` describes the page mapped just before, which
    // stays mapped until the process exits.
    if unsafe { libc::ioctl(vm, KVM_SET_USER_MEMORY_REGION as _, &region) } < 0 {
        return fail(Step::SetMemoryRegion);
    }
    // SAFETY: see above.
    let vcpu = unsafe { libc::ioctl(vm, KVM_CREATE_VCPU as _, 0) };
    if vcpu < 0 {
        return fail(Step::CreateVcpu);
    }
    // SAFETY: see above.
    let run_size = unsafe { libc::ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE as _, 0) };
    if run_size < RUN_IO_DATA_OFFSET as i32 + 8 {
        return fail(Step::VcpuMmapSize);
    }
    // SAFETY: maps the vCPU's kvm_run area, shared with the kernel, at a fresh address.
    let run = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            run_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu,
            0,
        )
    };
    if run == libc::MAP_FAILED {
        return fail(Step::MapRun);
    }
    let mut sregs = KvmSregs::default();
    // SAFETY: see above.
    if unsafe { libc::ioctl(vcpu, KVM_GET_SREGS as _, &mut sregs) } < 0 {
        return fail(Step::GetSregs);
    }
    // 64-bit mode, flat segments, paging through the tables above.
    let code = KvmSegment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 1 << 3,
        type_: 11, // execute/read, accessed
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..KvmSegment::default()
    };
    let data = KvmSegment {
        selector: 2 << 3,
        type_: 3, // read/write, accessed
        l: 0,
        db: 1,
        ..code
    };
    sregs.segs[0] = code;
    for seg in &mut sregs.segs[1..6] {
        *seg = data;
    }
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    // SAFETY: see above.
    if unsafe { libc::ioctl(vcpu, KVM_SET_SREGS as _, &sregs) } < 0 {
        return fail(Step::SetSregs);
    }
    let regs = KvmRegs {
        rip: CODE_ADDR,
        rflags: 0x2,
        ..KvmRegs::default()
    };
    // SAFETY: see above.
    if unsafe { libc::ioctl(vcpu, KVM_SET_REGS as _, &regs) } < 0 {
        return fail(Step::SetRegs);
    }
    let mut tries = 0;
    loop {
        // SAFETY: see above.
        if unsafe { libc::ioctl(vcpu, KVM_RUN as _, 0) } == 0 {
            break;
        }
        tries += 1;
        if errno() != libc::EINTR || tries > 100 {
            return fail(Step::Run);
        }
    }
    let run = run as *const u8;
    // SAFETY: all offsets are inside the kvm_run mapping (its size was checked
    // above), aligned for their types, and the vCPU is not running now.
    unsafe {
        let exit_reason = (run.add(RUN_EXIT_REASON) as *const u32).read();
        let mut report = ProbeReport {
            step: Step::Done as u32,
            errno: 0,
            exit_reason,
            detail: (run.add(RUN_UNION) as *const u32).read(),
            value: 0,
        };
        if exit_reason == KVM_EXIT_IO {
            let direction = run.add(RUN_IO_DIRECTION).read();
            let size = run.add(RUN_IO_SIZE).read();
            let port = (run.add(RUN_IO_PORT) as *const u16).read();
            let count = (run.add(RUN_IO_COUNT) as *const u32).read();
            let offset = (run.add(RUN_IO_DATA_OFFSET) as *const u64).read() as usize;
            report.detail = port as u32;
            if direction == KVM_EXIT_IO_OUT && size == 1 && count == 1 && offset < run_size as usize
            {
                report.value = run.add(offset).read() as u32;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_described() {
        let ok = ProbeReport {
            step: Step::Done as u32,
            exit_reason: KVM_EXIT_IO,
            detail: 0x10,
            value: 0x2a,
            ..Default::default()
        };
        assert_eq!(describe(&ok), (true, "wrote 0x2a to port 0x10".into()));
        let internal = ProbeReport {
            step: Step::Done as u32,
            exit_reason: 17,
            detail: 1,
            ..Default::default()
        };
        let (usable, why) = describe(&internal);
        assert!(!usable);
        assert!(
            why.contains("KVM_EXIT_INTERNAL_ERROR (suberror 1)"),
            "{why}"
        );
        let wrong_port = ProbeReport { detail: 0x11, ..ok };
        assert!(!describe(&wrong_port).0);
        let open_failed = ProbeReport {
            step: Step::Open as u32,
            errno: libc::ENOENT,
            ..Default::default()
        };
        let (usable, why) = describe(&open_failed);
        assert!(!usable);
        assert!(why.starts_with("failed at open /dev/kvm: "), "{why}");
        assert_eq!(Step::name(Step::Run as u32), "KVM_RUN");
        assert_eq!(Step::name(99), "unknown step");
    }

    #[test]
    fn the_probe_answers_in_bounded_time() {
        let start = Instant::now();
        let (usable, why) = kvm_usable();
        let took = start.elapsed();
        eprintln!("kvm_usable: {usable}: {why} ({took:?})");
        assert!(
            took < PROBE_TIMEOUT * 2 + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(
            why.starts_with(if usable { "kvm usable" } else { "kvm unusable" })
                || why.starts_with("no /dev/kvm")
        );
        // The measured fact of these hosts: kvm_pvm's guests hang.
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(!usable, "{why}");
        }
        let (accel, why2) = choose_accel();
        assert_eq!(accel == Accel::Kvm, usable, "{why2}");
    }
}
