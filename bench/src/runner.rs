//! The interleaved A/B runner: each round runs every side once, the side that
//! goes first rotating from round to round (alternating with two sides), the
//! first rounds untimed (warm-up); the samples of each side stay paired by
//! round, so per-round ratios can be taken beside the percentiles.
//!
//! Also the benchmark's name for progress lines (on stderr) and errors.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Result;

use crate::signals;
use crate::stats::{median, ms, Summary};

static NAME: OnceLock<&'static str> = OnceLock::new();

/// Parses the benchmark's flags, takes its name from them and installs the
/// signal handlers: the first thing every benchmark's `main` does.
pub fn start<A: clap::Parser>() -> A {
    let args = A::parse();
    let _ = NAME.set(A::command().get_name().to_string().leak());
    signals::install();
    args
}

/// The running benchmark's name.
pub fn name() -> &'static str {
    NAME.get().copied().unwrap_or("bench")
}

/// A progress line on stderr, `[name] msg`.
pub fn progress(msg: impl AsRef<str>) {
    eprintln!("[{}] {}", name(), msg.as_ref());
}

/// The samples of one measurement, per side, paired by round.
#[derive(Debug, Clone)]
pub struct Sides<const N: usize>(pub [Vec<Duration>; N]);

impl<const N: usize> Default for Sides<N> {
    fn default() -> Self {
        Sides(std::array::from_fn(|_| Vec::new()))
    }
}

impl<const N: usize> Sides<N> {
    /// Records one round's times, in the sides' order.
    pub fn push(&mut self, t: [Duration; N]) {
        for (v, t) in self.0.iter_mut().zip(t) {
            v.push(t);
        }
    }

    /// Side `i`'s samples.
    pub fn side(&self, i: usize) -> &[Duration] {
        &self.0[i]
    }

    /// Each side's summary; `None` before the first timed round.
    pub fn summaries(&self) -> Option<[Summary; N]> {
        let s: Vec<Summary> = self
            .0
            .iter()
            .map(|v| Summary::of(v))
            .collect::<Option<_>>()?;
        s.try_into().ok()
    }

    /// The median over the rounds of side `a` ÷ side `b` within the round:
    /// less sensitive than the ratio of the p50s to the load drifting.
    pub fn paired_ratio(&self, a: usize, b: usize) -> Option<f64> {
        self.paired(a, b, |x, y| x / y)
    }

    /// The median over the rounds of side `a` − side `b` within the round, ms.
    pub fn paired_diff_ms(&self, a: usize, b: usize) -> Option<f64> {
        self.paired(a, b, |x, y| x - y)
    }

    fn paired(&self, a: usize, b: usize, f: impl Fn(f64, f64) -> f64) -> Option<f64> {
        let pairs = self.0[a].iter().zip(&self.0[b]);
        median(&pairs.map(|(x, y)| f(ms(*x), ms(*y))).collect::<Vec<_>>())
    }
}

/// Runs `f` and times it.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t0 = std::time::Instant::now();
    let value = f()?;
    Ok((value, t0.elapsed()))
}

/// One side of a round: runs its step and returns the time it took.
pub type Side<'a> = &'a mut dyn FnMut() -> Result<Duration>;

/// Runs every side once, starting with side `round % N`, and returns the
/// times in the sides' order. A signal stops it between two sides.
pub fn rotated<const N: usize>(round: usize, sides: [Side<'_>; N]) -> Result<[Duration; N]> {
    let mut out = [Duration::ZERO; N];
    for k in 0..N {
        let j = (round + k) % N;
        signals::check()?;
        out[j] = sides[j]()?;
    }
    Ok(out)
}

/// Runs `warmup + timed` rounds, `f(round, timed)` each (`timed` is false in
/// the warm-up), stopping at a signal; `what` names them in about ten
/// progress lines.
pub fn rounds(
    what: &str,
    warmup: usize,
    timed: usize,
    mut f: impl FnMut(usize, bool) -> Result<()>,
) -> Result<()> {
    progress(format!("{what}: {timed} rounds (+{warmup} warm-up)"));
    let every = (timed / 10).max(1);
    for i in 0..warmup + timed {
        signals::check()?;
        f(i, i >= warmup)?;
        let done = (i + 1).saturating_sub(warmup);
        if i >= warmup && (done % every == 0) && timed > 1 {
            progress(format!("  {done}/{timed}"));
        }
    }
    Ok(())
}

/// The common case of [`rounds`]: each round runs `sides` once, rotated, and
/// the timed rounds' times are kept.
pub fn interleaved<const N: usize>(
    what: &str,
    warmup: usize,
    timed: usize,
    mut sides: [Side<'_>; N],
) -> Result<Sides<N>> {
    let mut out = Sides::default();
    let what = match N {
        1 => what.to_string(),
        _ => format!("{what}, {N} sides interleaved, order rotating"),
    };
    rounds(&what, warmup, timed, |i, keep| {
        let t = rotated(i, sides.each_mut().map(|s| &mut **s as Side<'_>))?;
        if keep {
            out.push(t);
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_rotate_and_warm_up_is_dropped() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut a = || {
            order.borrow_mut().push('a');
            Ok(Duration::from_millis(2))
        };
        let mut b = || {
            order.borrow_mut().push('b');
            Ok(Duration::from_millis(1))
        };
        let s = interleaved("t", 1, 3, [&mut a, &mut b]).unwrap();
        assert_eq!(order.borrow().iter().collect::<String>(), "abbaabba");
        assert_eq!((s.side(0).len(), s.side(1).len()), (3, 3));
        assert_eq!(s.paired_ratio(0, 1), Some(2.0));
        assert_eq!(s.paired_diff_ms(0, 1), Some(1.0));
        assert_eq!(s.summaries().unwrap()[1].p50, 1.0);
    }
}
