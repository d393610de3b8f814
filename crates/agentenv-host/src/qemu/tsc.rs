//! The host's TSC frequency, which TCG guests see as theirs.
//!
//! Under TCG (without `-icount`) a guest's `rdtsc` returns the host's TSC, so the
//! guest TSC runs at the host's rate. The guest kernel normally measures that rate
//! against the PIT; on a busy host the vCPU thread is preempted during the
//! measurement, the calibration fails, the kernel marks the TSC unstable and the
//! Debian cloud kernel on microvm then hangs for good at
//! "tsc: Marking TSC unstable due to could not calculate TSC khz" (measured: every
//! boot with both host cores saturated). Telling the kernel the rate
//! (`tsc_early_khz=`) skips the calibration: all such boots then succeed.

use std::sync::OnceLock;
use std::time::Duration;

/// The host TSC's frequency in kHz, when the TSC is invariant (`constant_tsc` and
/// `nonstop_tsc`) and can be measured. Measured once per process (about 60 ms).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        if !invariant_tsc(&cpuinfo) {
            return None;
        }
        measure_khz()
    })
}

/// Whether the first `flags` line of `/proc/cpuinfo` shows an invariant TSC.
pub fn invariant_tsc(cpuinfo: &str) -> bool {
    let Some(flags) = cpuinfo.lines().find(|l| l.starts_with("flags")) else {
        return false;
    };
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    has("constant_tsc") && has("nonstop_tsc")
}

#[cfg(target_arch = "x86_64")]
fn measure_khz() -> Option<u64> {
    let mut samples = Vec::new();
    for _ in 0..3 {
        let (t0, c0) = clock_pair()?;
        std::thread::sleep(Duration::from_millis(20));
        let (t1, c1) = clock_pair()?;
        let ns = t1.checked_sub(t0)?;
        if ns == 0 {
            return None;
        }
        samples.push(((c1.wrapping_sub(c0)) as u128 * 1_000_000 / ns) as u64);
    }
    samples.sort_unstable();
    let khz = samples[1];
    // Anything outside 100 MHz..20 GHz is a broken measurement.
    (100_000..20_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_khz() -> Option<u64> {
    None
}

/// A TSC reading and the monotonic time (ns) it was taken at, from a read
/// bracketed by two clock reads less than 20 µs apart.
#[cfg(target_arch = "x86_64")]
fn clock_pair() -> Option<(u128, u64)> {
    for _ in 0..100 {
        let a = monotonic_raw_ns()?;
        #[allow(unused_unsafe)]
        // SAFETY: RDTSC only reads the time-stamp counter; every x86_64 CPU has it
        // and Linux lets user space execute it.
        let tsc = unsafe { std::arch::x86_64::_rdtsc() };
        let b = monotonic_raw_ns()?;
        if b - a < 20_000 {
            return Some(((a + b) / 2, tsc));
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
fn monotonic_raw_ns() -> Option<u128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariance_needs_both_flags() {
        assert!(invariant_tsc(
            "processor: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n"
        ));
        assert!(!invariant_tsc("flags\t\t: fpu tsc constant_tsc\n"));
        assert!(!invariant_tsc("processor: 0\n"));
    }

    #[test]
    fn the_host_rate_is_plausible_and_stable() {
        let Some(khz) = host_tsc_khz() else {
            eprintln!("no invariant tsc here");
            return;
        };
        eprintln!("host tsc: {khz} kHz");
        // A second, independent measurement agrees within 0.5 %.
        let again = measure_khz().unwrap();
        let diff = khz.abs_diff(again) as f64 / khz as f64;
        assert!(diff < 0.005, "{khz} vs {again}");
    }
}
