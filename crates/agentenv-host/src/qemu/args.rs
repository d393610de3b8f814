//! The QEMU command line for one VM: a pure function of the launch spec, in the
//! shape measured in `GUEST-NOTES.md` (microvm, ACPI on, virtio-mmio devices).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use agentenv_core::backend::LaunchSpec;
use serde_json::{json, Value};

use super::Accel;

/// The microvm machine: no option ROMs, the ISA serial port as console, no RTC.
/// ACPI stays on (the default): it describes the virtio-mmio devices to the
/// kernel and carries the power button.
pub const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=off";

/// The CPU model under TCG. `max` offers every feature TCG emulates; it boots
/// the Debian cloud kernel as fast as `qemu64` (measured, ~4 s to the guest's
/// ready line).
pub const TCG_CPU: &str = "max";

/// The accelerator option under TCG. QEMU's translation cache is 1 GiB by
/// default and its pages count against the VMM's memory cgroup as the guest
/// runs new code: a guest running systemd and python (the E2B base image)
/// grew a 256 MiB VM's QEMU past its 524 MiB limit (guest RAM + 256 MiB
/// overhead + 5%) within 30 s of boot and the OOM killer ended it. 128 MiB of
/// cache (flushed when full) keeps it inside the overhead.
pub const TCG_ACCEL: &str = "tcg,tb-size=128";

/// The id of the guest's network device (its backend and frontend).
pub const NETDEV_ID: &str = "net0";

/// The id of the agent channel's chardev.
pub const AGENT_CHARDEV_ID: &str = "agent";

/// The name of the virtio-serial port the guest agent opens
/// (`/sys/class/virtio-ports/vportNpM/name` in the guest).
pub const AGENT_PORT_NAME: &str = agentenv_proto::SERIAL_PORT_NAME;

/// The id of the memory backend that holds guest RAM (a file or a RAM
/// backend). The migration stream names RAM by it, so a VM whose RAM went
/// into a saved state loads it back only into a backend of the same id.
pub const MEMORY_BACKEND_ID: &str = "mem";

/// Where a guest's RAM lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMemory<'a> {
    /// Anonymous memory of the QEMU process (the default; no memory backend).
    Anonymous,
    /// Anonymous memory in a RAM backend with id [`MEMORY_BACKEND_ID`]
    /// (`memory-backend-ram`): a VM restored from a state that carries its
    /// RAM.
    Ram,
    /// A file (in a tmpfs) mapped as guest RAM. `shared`: the guest writes go
    /// to the file (a VM whose memory a full snapshot copies); not shared: a
    /// private copy-on-write mapping of it (a VM restored from that copy: its
    /// pages stay shared with every other VM restored from it until written).
    File {
        /// The memory file (`memory_mib` long).
        path: &'a Path,
        /// Map it shared (`share=on`) or private (`share=off`).
        shared: bool,
    },
}

/// How a QEMU starts: booting the kernel, or waiting for a saved device state
/// (`-incoming defer`, then QMP `migrate-incoming`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartMode<'a> {
    /// Where guest RAM lives.
    pub memory: GuestMemory<'a>,
    /// Wait for an incoming device state instead of running.
    pub incoming: bool,
}

impl StartMode<'_> {
    /// A plain boot with anonymous memory.
    pub const BOOT: StartMode<'static> = StartMode {
        memory: GuestMemory::Anonymous,
        incoming: false,
    };
}

/// QEMU's argument list for `spec`. Under TCG, `tsc_khz` (the host's TSC rate,
/// see [`super::tsc`]) is handed to the guest kernel as `tsc_early_khz=` unless
/// the boot args set it already.
pub fn qemu_args(spec: &LaunchSpec, accel: Accel, tsc_khz: Option<u64>) -> Vec<OsString> {
    qemu_args_for(spec, accel, tsc_khz, StartMode::BOOT)
}

/// [`qemu_args`] for a given [`StartMode`]. A restore must use the same
/// `spec` (devices in the same order) as the VM whose state it loads; only
/// socket paths and the drives' files may differ.
pub fn qemu_args_for(
    spec: &LaunchSpec,
    accel: Accel,
    tsc_khz: Option<u64>,
    mode: StartMode<'_>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &[&OsStr]| a.extend(s.iter().map(|s| s.to_os_string()));
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => (TCG_ACCEL, TCG_CPU),
    };
    let mem = format!("{}M", spec.memory_mib);
    let smp = spec.vcpus.to_string();
    let mut machine = OsString::from(MACHINE);
    if wants_no_acpi(&spec.boot_args) {
        // The guest is told `acpi=off`: the machine has none either, and QEMU
        // then appends one `virtio_mmio.device=` per device to the kernel
        // command line (microvm's `auto-kernel-cmdline`), which a kernel with
        // CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y reads.
        machine.push(",acpi=off");
    }
    match mode.memory {
        GuestMemory::Anonymous => {}
        GuestMemory::Ram | GuestMemory::File { .. } => {
            machine.push(format!(",memory-backend={MEMORY_BACKEND_ID}"));
        }
    }
    push(&["-M".as_ref(), machine.as_ref()]);
    match mode.memory {
        GuestMemory::Anonymous => {}
        GuestMemory::Ram => {
            let object = format!("memory-backend-ram,id={MEMORY_BACKEND_ID},size={mem}");
            push(&["-object".as_ref(), object.as_ref()]);
        }
        GuestMemory::File { path, shared } => {
            let mut object = OsString::from(format!(
                "memory-backend-file,id={MEMORY_BACKEND_ID},size={mem},share={},mem-path=",
                if shared { "on" } else { "off" }
            ));
            object.push(opt_value(path.as_ref()));
            push(&["-object".as_ref(), object.as_ref()]);
        }
    }
    if mode.incoming {
        // Stopped once the state is loaded (`-S`), so the driver decides when
        // it runs.
        push(&["-incoming".as_ref(), "defer".as_ref(), "-S".as_ref()]);
    }
    push(&[
        "-accel".as_ref(),
        accel_name.as_ref(),
        "-cpu".as_ref(),
        cpu.as_ref(),
        "-m".as_ref(),
        mem.as_ref(),
        "-smp".as_ref(),
        smp.as_ref(),
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
        "-nographic".as_ref(),
        "-serial".as_ref(),
        "stdio".as_ref(),
        "-no-reboot".as_ref(),
        // An i8042 controller: the kernel's `reboot=k` reset (after a panic or a
        // reboot) goes through it and so ends QEMU at once with -no-reboot;
        // without it the kernel falls back to slower resets, once taking a
        // minute. It also gives the guest Ctrl-Alt-Del, as on Firecracker.
        "-device".as_ref(),
        "i8042".as_ref(),
    ]);
    // `-name` is parsed as an option list: a comma would start a new option.
    let name = opt_value(spec.vm_id.as_ref());
    push(&["-name".as_ref(), name.as_ref()]);
    // `-kernel`, `-initrd` and `-append` take their values verbatim.
    push(&["-kernel".as_ref(), spec.kernel.as_ref()]);
    if let Some(initrd) = &spec.initrd {
        push(&["-initrd".as_ref(), initrd.as_ref()]);
    }
    let append = kernel_cmdline(&spec.boot_args, accel, tsc_khz);
    push(&["-append".as_ref(), append.as_ref()]);
    for d in &spec.drives {
        let id = opt_value(d.id.as_ref());
        let mut drive = OsString::from("id=");
        drive.push(&id);
        drive.push(",file=");
        // A file the daemon opened (a direct disk) is reached through the
        // descriptor QEMU inherits: `/proc/self/fd/N` reopens that inode,
        // never the path.
        match &d.fd {
            Some(fd) => drive.push(crate::safe_open::fd_path(fd.raw())),
            None => drive.push(opt_value(d.path.as_ref())),
        }
        drive.push(",format=raw,if=none");
        if d.read_only {
            drive.push(",readonly=on");
        }
        let mut device = OsString::from("virtio-blk-device,drive=");
        device.push(&id);
        push(&[
            "-drive".as_ref(),
            &drive,
            "-device".as_ref(),
            device.as_ref(),
        ]);
    }
    if let Some(net) = &spec.net {
        let mut netdev = OsString::from(format!("tap,id={NETDEV_ID},ifname="));
        netdev.push(opt_value(net.tap_name.as_ref()));
        netdev.push(",script=no,downscript=no");
        let mut device = OsString::from(format!("virtio-net-device,netdev={NETDEV_ID},mac="));
        device.push(opt_value(net.guest_mac.as_ref()));
        push(&[
            "-netdev".as_ref(),
            &netdev,
            "-device".as_ref(),
            device.as_ref(),
        ]);
    }
    if let Some(sock) = &spec.agent_socket {
        // The agent channel: a virtio-serial port whose host end is a Unix
        // socket QEMU serves (one client at a time; without `wait=off` QEMU
        // would block until a client connects).
        let mut chardev = OsString::from(format!("socket,id={AGENT_CHARDEV_ID},path="));
        chardev.push(opt_value(sock.as_ref()));
        chardev.push(",server=on,wait=off");
        let port = format!("virtserialport,chardev={AGENT_CHARDEV_ID},name={AGENT_PORT_NAME}");
        push(&[
            "-device".as_ref(),
            "virtio-serial-device".as_ref(),
            "-chardev".as_ref(),
            &chardev,
            "-device".as_ref(),
            port.as_ref(),
        ]);
    }
    let mut qmp = OsString::from("unix:");
    qmp.push(opt_value(spec.control_socket.as_ref()));
    qmp.push(",server=on,wait=off");
    push(&["-qmp".as_ref(), qmp.as_ref()]);
    a
}

/// True when a kernel command line turns ACPI off (its last `acpi=` word
/// says `off`, as the kernel reads it).
pub fn wants_no_acpi(boot_args: &str) -> bool {
    agentenv_core::backend::boot_args_turn_acpi_off(boot_args)
}

/// True when QEMU arguments run the machine without ACPI (`-M …,acpi=off`).
pub fn machine_without_acpi(argv: &[Vec<u8>]) -> bool {
    argv.windows(2).any(|w| {
        (w[0] == b"-M" || w[0] == b"-machine")
            && w[1].split(|&b| b == b',').any(|o| o == b"acpi=off")
    })
}

/// QMP `send-key` arguments for Ctrl-Alt-Del.
pub fn ctrl_alt_del() -> Value {
    json!({"keys": [
        {"type": "qcode", "data": "ctrl"},
        {"type": "qcode", "data": "alt"},
        {"type": "qcode", "data": "delete"},
    ]})
}

/// The guest kernel's command line: the spec's, plus `tsc_early_khz=` under TCG.
pub fn kernel_cmdline(boot_args: &str, accel: Accel, tsc_khz: Option<u64>) -> String {
    match (accel, tsc_khz) {
        (Accel::Tcg, Some(khz))
            if !boot_args
                .split_whitespace()
                .any(|a| a.starts_with("tsc_early_khz=")) =>
        {
            format!("{} tsc_early_khz={khz}", boot_args.trim_end())
        }
        _ => boot_args.to_string(),
    }
}

/// A value inside a QEMU option list (`key=value,key=value`): commas are doubled.
pub fn opt_value(v: &OsStr) -> OsString {
    let bytes = v.as_bytes();
    if !bytes.contains(&b',') {
        return v.to_os_string();
    }
    let mut out = Vec::with_capacity(bytes.len() + 4);
    for &b in bytes {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The readable record of a launch written to `qemu.json` in the session directory.
pub fn command_document(binary: &std::path::Path, args: &[OsString]) -> Value {
    json!({
        "binary": binary.to_string_lossy(),
        "args": args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentenv_core::backend::{DriveSpec, NetAttachment};
    use std::time::Duration;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            memory_file: None,
            cgroup_procs: Vec::new(),
            vm_id: "vm1".into(),
            session_dir: "/s/vm1".into(),
            control_socket: "/run/vm1.qmp".into(),
            console_log: "/s/vm1/console.log".into(),
            console_log_max_bytes: 1 << 20,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/i/initrd.img".into()),
            boot_args: "console=ttyS0 reboot=k panic=1".into(),
            drives: vec![
                DriveSpec {
                    id: "rootfs".into(),
                    path: "/r/base.ext4".into(),
                    read_only: true,
                    is_root: true,
                    fd: None,
                },
                DriveSpec {
                    id: "overlay".into(),
                    path: "/s/vm1/overlay.ext4".into(),
                    read_only: false,
                    is_root: false,
                    fd: None,
                },
            ],
            net: Some(NetAttachment {
                tap_name: "ae-tap1".into(),
                guest_mac: "06:00:0a:00:00:02".into(),
            }),
            agent_socket: Some("/s/vm1/agent.sock".into()),
            startup_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(1),
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn two_drives_and_a_tap_under_tcg() {
        let args = strings(&qemu_args(&spec(), Accel::Tcg, None));
        let expected = [
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-accel",
            "tcg,tb-size=128",
            "-cpu",
            "max",
            "-m",
            "512M",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-device",
            "i8042",
            "-name",
            "vm1",
            "-kernel",
            "/k/vmlinuz",
            "-initrd",
            "/i/initrd.img",
            "-append",
            "console=ttyS0 reboot=k panic=1",
            "-drive",
            "id=rootfs,file=/r/base.ext4,format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=rootfs",
            "-drive",
            "id=overlay,file=/s/vm1/overlay.ext4,format=raw,if=none",
            "-device",
            "virtio-blk-device,drive=overlay",
            "-netdev",
            "tap,id=net0,ifname=ae-tap1,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0,mac=06:00:0a:00:00:02",
            "-device",
            "virtio-serial-device",
            "-chardev",
            "socket,id=agent,path=/s/vm1/agent.sock,server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=org.agentenv.agent.0",
            "-qmp",
            "unix:/run/vm1.qmp,server=on,wait=off",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn file_memory_and_incoming_go_before_the_devices() {
        let path = Path::new("/dev/shm/ae/vm,1.mem");
        let shared = StartMode {
            memory: GuestMemory::File { path, shared: true },
            incoming: false,
        };
        let args = strings(&qemu_args_for(&spec(), Accel::Tcg, None, shared));
        assert_eq!(
            args[..4],
            [
                "-M",
                "microvm,x-option-roms=off,isa-serial=on,rtc=off,memory-backend=mem",
                "-object",
                "memory-backend-file,id=mem,size=512M,share=on,mem-path=/dev/shm/ae/vm,,1.mem",
            ]
        );
        assert!(!args.contains(&"-incoming".to_string()));
        let restore = StartMode {
            memory: GuestMemory::File {
                path,
                shared: false,
            },
            incoming: true,
        };
        let r = strings(&qemu_args_for(&spec(), Accel::Tcg, None, restore));
        assert!(r[3].contains(",share=off,"), "{}", r[3]);
        assert_eq!(r[4..7], ["-incoming", "defer", "-S"]);
        // Everything after the memory options is the same as a boot's, so the
        // device state of one loads into the other.
        assert_eq!(r[7..], args[4..]);
        let boot = strings(&qemu_args(&spec(), Accel::Tcg, None));
        assert_eq!(boot[2..], args[4..]);
        // RAM carried in the saved state: a RAM backend of the same id.
        let ram = StartMode {
            memory: GuestMemory::Ram,
            incoming: true,
        };
        let r = strings(&qemu_args_for(&spec(), Accel::Tcg, None, ram));
        assert_eq!(
            r[..7],
            [
                "-M",
                "microvm,x-option-roms=off,isa-serial=on,rtc=off,memory-backend=mem",
                "-object",
                "memory-backend-ram,id=mem,size=512M",
                "-incoming",
                "defer",
                "-S",
            ]
        );
        assert_eq!(r[7..], args[4..]);
    }

    #[test]
    fn acpi_off_in_the_boot_args_turns_the_machines_acpi_off() {
        let mut s = spec();
        s.boot_args = "console=ttyS0 reboot=k panic=1 pci=off acpi=off".into();
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        assert_eq!(args[0..2], ["-M", &format!("{MACHINE},acpi=off")]);
        let raw: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        assert!(machine_without_acpi(&raw));
        let restored = strings(&qemu_args_for(
            &s,
            Accel::Tcg,
            None,
            StartMode {
                memory: GuestMemory::Ram,
                incoming: true,
            },
        ));
        assert_eq!(
            restored[1],
            format!("{MACHINE},acpi=off,memory-backend={MEMORY_BACKEND_ID}")
        );
        // ACPI stays on otherwise (a later acpi= word wins, as in the kernel).
        s.boot_args = "console=ttyS0 acpi=off acpi=force".into();
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        assert_eq!(args[1], MACHINE);
        let raw: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        assert!(!machine_without_acpi(&raw));
        assert!(!wants_no_acpi("noacpi=off"));
        assert!(wants_no_acpi("acpi=off"));
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let args = strings(&qemu_args(&spec(), Accel::Kvm, Some(2_600_000)));
        let at = args.iter().position(|a| a == "-accel").unwrap();
        assert_eq!(args[at..at + 4], ["-accel", "kvm", "-cpu", "host"]);
    }

    #[test]
    fn minimal_spec_has_no_initrd_drives_net_or_agent() {
        let mut s = spec();
        s.initrd = None;
        s.drives.clear();
        s.net = None;
        s.agent_socket = None;
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        for flag in ["-initrd", "-drive", "-netdev", "-chardev"] {
            assert!(!args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        // The only device is the i8042 controller.
        let devices: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(f, _)| *f == "-device")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(devices, ["i8042"]);
        assert_eq!(args.last().unwrap(), "unix:/run/vm1.qmp,server=on,wait=off");
    }

    #[test]
    fn tcg_guests_are_told_the_tsc_rate() {
        let args = strings(&qemu_args(&spec(), Accel::Tcg, Some(2_599_998)));
        assert!(args.contains(&"console=ttyS0 reboot=k panic=1 tsc_early_khz=2599998".into()));
        // Not twice, not under KVM (kvmclock tells the guest), not when unknown.
        assert_eq!(
            kernel_cmdline("a tsc_early_khz=1000000", Accel::Tcg, Some(2)),
            "a tsc_early_khz=1000000"
        );
        assert_eq!(kernel_cmdline("a", Accel::Kvm, Some(2)), "a");
        assert_eq!(kernel_cmdline("a", Accel::Tcg, None), "a");
        let kvm = strings(&qemu_args(&spec(), Accel::Kvm, Some(2_600_000)));
        assert!(kvm.contains(&"console=ttyS0 reboot=k panic=1".into()));
    }

    #[test]
    fn commas_in_option_values_are_doubled() {
        let mut s = spec();
        s.control_socket = "/run/a,b.qmp".into();
        s.drives[0].path = "/r/x,readonly=off".into();
        s.agent_socket = Some("/s/a,b/agent.sock".into());
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        assert!(args.contains(&"unix:/run/a,,b.qmp,server=on,wait=off".to_string()));
        assert!(args
            .contains(&"socket,id=agent,path=/s/a,,b/agent.sock,server=on,wait=off".to_string()));
        assert!(args
            .contains(&"id=rootfs,file=/r/x,,readonly=off,format=raw,if=none,readonly=on".into()));
        // Verbatim arguments are left alone.
        s.boot_args = "a=1,2".into();
        let args = strings(&qemu_args(&s, Accel::Tcg, None));
        assert!(args.contains(&"a=1,2".to_string()));
    }

    #[test]
    fn command_document_lists_binary_and_args() {
        let args = qemu_args(&spec(), Accel::Tcg, None);
        let doc = command_document("/usr/bin/qemu-system-x86_64".as_ref(), &args);
        assert_eq!(doc["binary"], "/usr/bin/qemu-system-x86_64");
        assert_eq!(doc["args"].as_array().unwrap().len(), args.len());
        assert_eq!(doc["args"][0], "-M");
    }
}
