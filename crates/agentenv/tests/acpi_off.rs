//! The seed's sample boot arguments (`console=ttyS0 reboot=k panic=1 pci=off
//! acpi=off`) on a real QEMU guest: with a kernel compiled by
//! `scripts/build-kernel.sh --version …` (its fragment sets
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`), QEMU's microvm machine runs
//! without ACPI, passes its virtio-mmio devices on the kernel command line,
//! and the guest finds its disk, gets ready, runs a command and shuts down
//! cleanly (Ctrl-Alt-Del: no ACPI power button). The kernel comes from
//! `AGENTENV_COMPILED_KERNEL`, the directory `build-kernel.sh --version
//! --output DIR/` wrote (`kernels/vmlinuz`, `initramfs/initrd.img`); the
//! rootfs from `artifacts/`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{call_ok, finish, Daemon, TestDir};
use serde_json::json;

const SEED_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off acpi=off";

fn compiled_kernel() -> Option<PathBuf> {
    std::env::var_os("AGENTENV_COMPILED_KERNEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[test]
fn the_seed_boot_args_boot_get_ready_and_shut_down_cleanly_on_a_compiled_kernel() {
    let art = need_artifacts!();
    let Some(kdir) = compiled_kernel() else {
        agentenv_testkit::skip_optional!(
            "AGENTENV_COMPILED_KERNEL is not set (a scripts/build-kernel.sh --version output directory)"
        );
    };
    let config = std::fs::read_to_string(kdir.join("kernels/vmlinuz.config"))
        .unwrap_or_else(|e| panic!("{}/kernels/vmlinuz.config: {e}", kdir.display()));
    assert!(
        config
            .lines()
            .any(|l| l == "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"),
        "{} was not built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        kdir.display()
    );
    let mut dir = TestDir::new();
    let mut cfg = common::qemu_config(&dir, &art);
    cfg.kernel_root = kdir.join("kernels");
    cfg.initramfs_root = kdir.join("initramfs");
    cfg.default_boot_args = SEED_BOOT_ARGS.into();
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());

    let t = Instant::now();
    let vm = call_ok(
        &d,
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "seed", "wait_ready": true,
                    "wait_ready_timeout_s": common::GUEST_BOOT_TIMEOUT.as_secs(),
                    "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}})),
        201,
    );
    assert_eq!(vm["ready"], true, "{vm}");
    eprintln!("ready with acpi=off after {:?}", t.elapsed());
    let args = vm["boot_args"].as_str().unwrap();
    assert!(args.starts_with(SEED_BOOT_ARGS), "{args}");

    // The guest saw acpi=off and found its devices on its command line.
    let run = call_ok(
        &d,
        "POST",
        "/v1/vm/seed/exec",
        Some(json!({"cmd": ["sh", "-c", "cat /proc/cmdline; ls /sys/firmware"], "timeout_s": 30})),
        200,
    );
    assert_eq!(run["exit_code"], 0, "{run}");
    let out = run["stdout"].as_str().unwrap();
    assert!(out.contains("acpi=off"), "{out}");
    assert!(out.contains("virtio_mmio.device="), "{out}");
    assert!(!out.contains("acpi\n"), "ACPI tables in the guest: {out}");

    // A clean shutdown without ACPI: the guest takes Ctrl-Alt-Del, reboots
    // (reboot=k) and QEMU, run with -no-reboot, exits 0.
    let t = Instant::now();
    let (code, v) = d.call("POST", "/v1/vm/seed/shutdown", None);
    assert_eq!(code, 200, "{v}");
    eprintln!("shut down after {:?}", t.elapsed());
    common::assert_shut_down_by_request(&v);
    assert!(t.elapsed() < Duration::from_secs(60));
    finish(d, dir);
}
