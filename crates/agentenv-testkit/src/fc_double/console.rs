//! The fake guest's serial console (the double's stdout): boot lines, the
//! readiness line, the heartbeat, the panic and the power-off.

use std::io::Write;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::vmm::{Phase, Shared};

/// How often the fake guest prints its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);

/// Prints one console line on stdout (errors are ignored: a closed stdout
/// must not kill the double).
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// The vm id the fake guest reports: `agentenv.vm_id=` from its kernel
/// command line, else the instance id.
fn guest_vm_id(boot_args: &str, instance_id: &str) -> String {
    boot_args
        .split_whitespace()
        .find_map(|word| word.strip_prefix("agentenv.vm_id="))
        .map(str::to_string)
        .unwrap_or_else(|| instance_id.to_string())
}

/// After `InstanceStart`: boot lines, `AGENTENV_READY`, then the heartbeat.
pub fn spawn_boot(shared: Arc<Shared>) {
    super::spawn("fc_vcpu_0", move || {
        let boot_args = shared.lock().boot_args().unwrap_or_default();
        let vcpus = shared.lock().machine_vcpus();
        line("[    0.000000] Linux version 6.1.0-fc-double (agentenv test double) #1 SMP");
        line(&format!("[    0.000000] Command line: {boot_args}"));
        line(&format!(
            "[    0.004000] smp: Brought up 1 node, {vcpus} CPUs"
        ));
        line("[    0.120000] virtio_blk virtio0: [vda] attached");
        line("[    0.180000] Run /sbin/init as init process");
        thread::sleep(Duration::from_millis(20));
        // Like a real guest, it prints nothing while paused.
        wait_while_paused(&shared);
        line(&format!(
            "AGENTENV_READY vm_id={}",
            guest_vm_id(&boot_args, &shared.opts.id)
        ));
        heartbeat_loop(&shared);
    });
}

/// After a snapshot was loaded: the guest carries on with its heartbeat.
pub fn spawn_heartbeat(shared: Arc<Shared>) {
    super::spawn("fc_vcpu_0", move || heartbeat_loop(&shared));
}

fn wait_while_paused(shared: &Shared) {
    while shared.lock().phase == Phase::Paused {
        thread::sleep(Duration::from_millis(10));
    }
}

fn heartbeat_loop(shared: &Shared) {
    loop {
        thread::sleep(HEARTBEAT_EVERY);
        // The state lock is held while printing, so that once a pause has
        // been answered no further heartbeat appears.
        let mut st = shared.lock();
        if st.phase == Phase::Running {
            st.heartbeat += 1;
            line(&format!("agentenv-heartbeat {}", st.heartbeat));
        }
    }
}

/// The guest panics (`--panic-on-start`), and with `panic=1` reboots, which
/// ends the VMM.
pub fn panic_and_exit() -> ! {
    line("Kernel panic - not syncing: injected panic");
    line("CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-fc-double #1");
    line("Rebooting in 1 seconds..");
    thread::sleep(Duration::from_millis(100));
    super::exit_process(0)
}

/// Ctrl-Alt-Del: the guest powers off after `delay`, counting only the time
/// it runs (a paused guest does not act on the key press).
pub fn spawn_power_off(shared: Arc<Shared>, delay: Duration, print: bool) {
    super::spawn("fc_power_off", move || {
        let step = Duration::from_millis(5);
        let mut waited = Duration::ZERO;
        while waited < delay {
            thread::sleep(step.min(delay - waited));
            if shared.lock().phase == Phase::Running {
                waited += step;
            }
        }
        wait_while_paused(&shared);
        if print {
            line("reboot: Restarting system");
        }
        super::exit_process(0)
    });
}

#[cfg(test)]
mod tests {
    use super::guest_vm_id;

    #[test]
    fn vm_id_comes_from_the_command_line() {
        assert_eq!(
            guest_vm_id("console=ttyS0 agentenv.vm_id=vm-7 panic=1", "x"),
            "vm-7"
        );
        assert_eq!(guest_vm_id("console=ttyS0", "inst"), "inst");
    }
}
