//! One report for every benchmark: a header (host, load, what ran), tables of
//! figures with their targets shown as PASS/MISS, the cleanup, and a line
//! counting the targets met. The same figures print as a table or, with
//! `--json`, as JSON on stdout. Targets are informational: the exit status is
//! 0 whenever the run completes and cleans up, 1 when a cleanup was not
//! complete or a part of the run failed.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::daemon::Harness;
use crate::procfs::{self, HostInfo};
use crate::runner::{name, Sides};
use crate::stats::round3;

/// One figure in a table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// A number, with this many decimals.
    Num(f64, usize),
    /// A difference, signed, with this many decimals.
    Signed(f64, usize),
    /// A ratio, shown as `1.234x`.
    Ratio(f64),
    Text(String),
    Empty,
}

impl Cell {
    /// Milliseconds, to the microsecond.
    pub fn ms(x: f64) -> Cell {
        Cell::Num(x, 3)
    }

    fn show(&self) -> String {
        match self {
            Cell::Num(x, p) => format!("{x:.p$}"),
            Cell::Signed(x, p) => format!("{x:+.p$}"),
            Cell::Ratio(x) => format!("{x:.3}x"),
            Cell::Text(s) => s.clone(),
            Cell::Empty => String::new(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Num(x, _) | Cell::Signed(x, _) | Cell::Ratio(x) if x.is_finite() => {
                json!(round3(*x))
            }
            Cell::Text(s) => json!(s),
            _ => Value::Null,
        }
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.into())
    }
}

/// A target beside a figure.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Target {
    pub name: String,
    /// What it asks, e.g. `≤ 2 ms`.
    pub want: String,
    pub pass: bool,
}

impl Target {
    /// `value ≤ limit`; `unit` follows the limit (e.g. `" ms"`, `"x"`).
    pub fn at_most(name: &str, value: f64, limit: f64, unit: &str) -> Target {
        Target::new(name, format!("≤ {limit}{unit}"), value <= limit)
    }

    /// `value ≥ limit`.
    pub fn at_least(name: &str, value: f64, limit: f64, unit: &str) -> Target {
        Target::new(name, format!("≥ {limit}{unit}"), value >= limit)
    }

    fn new(name: &str, want: String, pass: bool) -> Target {
        let name = name.into();
        Target { name, want, pass }
    }

    fn show(&self) -> String {
        format!("{}  {}", self.want, if self.pass { "PASS" } else { "MISS" })
    }
}

/// What a latency comparison's target bounds.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// First side's p50 − last side's p50, in ms.
    OverheadMs(f64),
    /// First side's p50 ÷ last side's p50.
    Ratio(f64),
}

#[derive(Debug, Clone)]
struct Row {
    name: String,
    cells: Vec<Cell>,
    target: Option<Target>,
}

/// A table of figures: named rows, one cell per column, a target per row.
#[derive(Debug, Clone)]
pub struct Table {
    title: String,
    columns: Vec<String>,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Table {
    pub fn new<S: Into<String>>(title: &str, columns: impl IntoIterator<Item = S>) -> Table {
        Table {
            title: title.into(),
            columns: columns.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A latency comparison of `sides`: p50 and p99 of each, then the first
    /// side against the last: ratio of the p50s and of the p99s, the median
    /// of the per-round ratios, and the difference of the p50s (ms).
    pub fn latency(title: &str, sides: &[&str]) -> Table {
        let mut cols: Vec<String> = sides
            .iter()
            .flat_map(|s| [format!("{s} p50"), format!("{s} p99")])
            .collect();
        cols.extend(["ratio p50", "ratio p99", "paired ratio", "overhead p50"].map(String::from));
        Table::new(title, cols)
    }

    /// A row of a [`Table::latency`] (nothing when a side has no samples).
    pub fn latency_row<const N: usize>(
        &mut self,
        name: &str,
        s: &Sides<N>,
        limit: Option<Limit>,
    ) -> &mut Table {
        let Some(sum) = s.summaries() else {
            return self;
        };
        let (a, b) = (&sum[0], &sum[N - 1]);
        let mut cells: Vec<Cell> = sum
            .iter()
            .flat_map(|x| [Cell::ms(x.p50), Cell::ms(x.p99)])
            .collect();
        cells.extend([
            Cell::Ratio(a.p50 / b.p50),
            Cell::Ratio(a.p99 / b.p99),
            s.paired_ratio(0, N - 1).map_or(Cell::Empty, Cell::Ratio),
            Cell::Signed(a.p50 - b.p50, 3),
        ]);
        let target = limit.map(|l| match l {
            Limit::OverheadMs(m) => Target::at_most(name, a.p50 - b.p50, m, " ms"),
            Limit::Ratio(r) => Target::at_most(name, a.p50 / b.p50, r, "x"),
        });
        self.row(name, cells, target)
    }

    /// Adds a row.
    pub fn row(&mut self, name: &str, cells: Vec<Cell>, target: Option<Target>) -> &mut Table {
        self.rows.push(Row {
            name: name.into(),
            cells,
            target,
        });
        self
    }

    /// Adds a line of explanation under the table.
    pub fn note(&mut self, text: impl Into<String>) -> &mut Table {
        self.notes.push(text.into());
        self
    }

    fn render(&self, w: &mut String) {
        let width = |s: &str| s.chars().count();
        let has_target = self.rows.iter().any(|r| r.target.is_some());
        let mut widths: Vec<usize> = std::iter::once(0)
            .chain(self.columns.iter().map(|c| width(c)))
            .collect();
        for r in &self.rows {
            widths[0] = widths[0].max(width(&r.name));
            for (i, c) in r.cells.iter().enumerate().take(self.columns.len()) {
                widths[i + 1] = widths[i + 1].max(width(&c.show()));
            }
        }
        // Columns of words line up on the left, numbers on the right.
        let words: Vec<bool> = (0..self.columns.len())
            .map(|i| {
                let text = |c: Option<&Cell>| matches!(c, None | Some(Cell::Text(_) | Cell::Empty));
                self.rows.iter().all(|r| text(r.cells.get(i)))
            })
            .collect();
        let line = |w: &mut String, first: &str, cells: Vec<String>, last: &str| {
            let mut l = format!("{first:<0$}", widths[0]);
            for (i, c) in cells.iter().enumerate() {
                let _ = match words[i] {
                    true => write!(l, "  {c:<0$}", widths[i + 1]),
                    false => write!(l, "  {c:>0$}", widths[i + 1]),
                };
            }
            let _ = writeln!(w, "{}", format!("{l}  {last}").trim_end());
        };
        let _ = writeln!(w, "{}", self.title);
        line(
            w,
            "",
            self.columns.clone(),
            if has_target { "target" } else { "" },
        );
        for r in &self.rows {
            let mut cells: Vec<String> = r.cells.iter().map(Cell::show).collect();
            cells.resize(self.columns.len(), String::new());
            line(
                w,
                &r.name,
                cells,
                &r.target.as_ref().map(Target::show).unwrap_or_default(),
            );
        }
        for n in &self.notes {
            let _ = writeln!(w, "  {}", n.replace('\n', "\n  "));
        }
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("name".into(), json!(r.name));
                for (c, v) in self.columns.iter().zip(&r.cells) {
                    o.insert(c.clone(), v.json());
                }
                if let Some(t) = &r.target {
                    o.insert("target".into(), json!(t));
                }
                Value::Object(o)
            })
            .collect();
        json!({"title": self.title, "rows": rows, "notes": self.notes})
    }
}

/// How one part of the run was cleaned up.
#[derive(Debug, Clone)]
pub struct Cleaned {
    pub clean: bool,
    /// In words, for the table and for errors.
    pub summary: String,
    /// The same as JSON fields.
    pub details: Value,
}

/// A benchmark's figures, printed at the end of the run.
#[derive(Debug)]
pub struct Report {
    title: String,
    host: HostInfo,
    started: Instant,
    load_start: f64,
    params: Value,
    about: Vec<(String, String)>,
    tables: Vec<Table>,
    cleanups: Vec<(String, Cleaned)>,
    failures: Vec<String>,
}

impl Report {
    /// Starts a report (and its clock and load figures) at the start of a run.
    pub fn new(title: &str, params: Value) -> Report {
        Report {
            title: title.into(),
            host: HostInfo::read(),
            started: Instant::now(),
            load_start: procfs::loadavg(),
            params,
            about: Vec::new(),
            tables: Vec::new(),
            cleanups: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// A header line: what ran, how, where.
    pub fn about(&mut self, key: &str, text: impl Into<String>) -> &mut Report {
        self.about.push((key.into(), text.into()));
        self
    }

    pub fn table(&mut self, t: Table) -> &mut Report {
        self.tables.push(t);
        self
    }

    /// Records how a part of the run was cleaned up.
    pub fn cleanup(&mut self, part: &str, c: Cleaned) -> &mut Report {
        self.cleanups.push((part.into(), c));
        self
    }

    /// Ends a part of the run, once it is cleaned up: a failed part is
    /// reported on stderr with its cleanup and the process exits 1; otherwise
    /// the cleanup is recorded and the part's result comes back.
    pub fn settle<T>(&mut self, result: Result<T>, part: &str, cleaned: Cleaned) -> T {
        match result {
            Ok(r) => {
                self.cleanups.push((part.into(), cleaned));
                r
            }
            Err(e) => {
                eprintln!("{}: {e:#}\ncleanup ({part}): {}", name(), cleaned.summary);
                std::process::exit(1)
            }
        }
    }

    /// Runs one part of the run with a harness of its own (`h`, as made):
    /// `f`, then [`Harness::finish`] (the daemon's log tail after a failure),
    /// the cleanup recorded under `part`. A failure of the setup or of `f` is
    /// recorded (exit status 1) and gives `None`; the next part still runs.
    pub fn part<T>(
        &mut self,
        part: &str,
        h: Result<Harness>,
        keep: bool,
        f: impl FnOnce(&mut Harness) -> Result<T>,
    ) -> Option<T> {
        let mut h = match h {
            Ok(h) => h,
            Err(e) => {
                self.fail(format!("{part}: setting up: {e:#}"));
                return None;
            }
        };
        let result = f(&mut h);
        let (result, cleanup) = h.finish(result, keep);
        self.cleanup(part, cleanup.cleaned());
        result.map_err(|e| self.fail(format!("{part}: {e:#}"))).ok()
    }

    /// Records a failure that did not stop the run (exit status 1).
    pub fn fail(&mut self, what: impl Into<String>) -> &mut Report {
        self.failures.push(what.into());
        self
    }

    fn targets(&self) -> Vec<&Target> {
        self.tables
            .iter()
            .flat_map(|t| t.rows.iter().filter_map(|r| r.target.as_ref()))
            .collect()
    }

    fn to_text(&self, load_end: f64) -> String {
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "\n{}", self.title);
        let load = (self.load_start, load_end);
        let busy = if self.host.busy(load) {
            " (the machine was busy: expect noisy figures, p99 above all)"
        } else {
            ""
        };
        let about = [
            ("host".to_string(), self.host.to_string()),
            (
                "load".into(),
                format!(
                    "1-min load average {:.2} at the start, {:.2} at the end{busy}; {:.0} s in all",
                    load.0,
                    load.1,
                    self.started.elapsed().as_secs_f64()
                ),
            ),
        ];
        for (k, v) in about.iter().chain(&self.about) {
            let _ = writeln!(w, "  {k:<9} {}", v.replace('\n', "\n            "));
        }
        for t in &self.tables {
            let _ = writeln!(w);
            t.render(w);
        }
        let _ = writeln!(w);
        for (part, c) in &self.cleanups {
            let _ = writeln!(w, "cleanup ({part}): {}", c.summary);
        }
        for f in &self.failures {
            let _ = writeln!(w, "FAILED: {f}");
        }
        let targets = self.targets();
        let missed: Vec<&str> = targets
            .iter()
            .filter(|t| !t.pass)
            .map(|t| t.name.as_str())
            .collect();
        let _ = writeln!(
            w,
            "targets: {} of {} met{} (informational: the exit status does not depend on them)",
            targets.len() - missed.len(),
            targets.len(),
            if missed.is_empty() {
                String::new()
            } else {
                format!("; missed: {}", missed.join(", "))
            }
        );
        o
    }

    fn to_json(&self, load_end: f64) -> Value {
        let targets = self.targets();
        let mut cleanup = Map::new();
        for (part, c) in &self.cleanups {
            let mut v = json!({"clean": c.clean, "summary": c.summary});
            if let (Some(o), Value::Object(d)) = (v.as_object_mut(), &c.details) {
                o.extend(d.clone());
            }
            cleanup.insert(part.clone(), v);
        }
        json!({
            "benchmark": name(),
            "title": self.title,
            "params": self.params,
            "host": self.host.to_json(),
            "about": self.about.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
            "loadavg_1min": {"start": self.load_start, "end": load_end},
            "wall_s": round3(self.started.elapsed().as_secs_f64()),
            "tables": self.tables.iter().map(Table::json).collect::<Vec<_>>(),
            "targets": targets,
            "targets_met": targets.iter().filter(|t| t.pass).count(),
            "targets_total": targets.len(),
            "cleanup": cleanup,
            "failures": self.failures,
        })
    }

    /// Prints the report (JSON with `json`) and exits: 0, or 1 when a cleanup
    /// was not complete or a part failed (said on stderr).
    pub fn finish(self, json: bool) -> ! {
        let load_end = procfs::loadavg();
        if json {
            let v = self.to_json(load_end);
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        } else {
            print!("{}", self.to_text(load_end));
        }
        let mut ok = self.failures.is_empty();
        for (part, c) in self.cleanups.iter().filter(|(_, c)| !c.clean) {
            eprintln!(
                "{}: {part}: cleanup was not complete: {}",
                name(),
                c.summary
            );
            ok = false;
        }
        for f in &self.failures {
            eprintln!("{}: {f}", name());
        }
        std::process::exit(if ok { 0 } else { 1 })
    }
}

/// Says why the benchmark cannot run on this machine and exits 0.
pub fn skip(why: &str, json: bool) -> ! {
    if json {
        println!("{}", json!({"benchmark": name(), "skipped": why}));
    } else {
        println!("{}: skipped: {why}", name());
    }
    std::process::exit(0)
}

/// The value, or the error on stderr (after `what`) and exit `code`: 2 when
/// the benchmark cannot start (missing binaries, not root), 1 when it failed.
pub fn or_exit<T>(r: Result<T>, code: i32, what: &str) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("{}: {what}{e:#}", name());
        std::process::exit(code)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tables_render_aligned_and_as_json() {
        let mut s = Sides::<2>::default();
        s.push([Duration::from_millis(3), Duration::from_millis(1)]);
        let mut t = Table::latency("op (ms)", &["a", "b"]);
        t.latency_row("x", &s, Some(Limit::OverheadMs(1.0)))
            .row("y", vec![Cell::ms(1.0)], None)
            .note("n");
        let mut text = String::new();
        t.render(&mut text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "op (ms)");
        assert!(lines[1].ends_with("overhead p50  target"), "{text}");
        assert!(lines[2].starts_with("x  ") && lines[2].ends_with("+2.000  ≤ 1 ms  MISS"));
        assert_eq!(lines[4], "  n");
        let v = t.json();
        assert_eq!(v["rows"][0]["ratio p50"], 3.0);
        assert_eq!(v["rows"][0]["target"]["pass"], false);
        assert_eq!(v["rows"][1]["a p99"], Value::Null);
    }
}
