//! The summary: each figure beside its reference (a floor, or another figure), the ratio between
//! them and the target set for it. Each line is printed as soon as it is measured and the whole
//! set again as a table at the end of the run.

use crate::measure::{bytes, bytes_rate, si};

/// A measured rate, time or size.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// What is counted (`commit`), or what moves the bytes (`write`, `scan`).
    pub label: String,
    pub value: f64,
    pub unit: Unit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Operations per second.
    PerSec,
    /// Bytes per second (printed in decimal MB/s or GB/s).
    BytesPerSec,
    /// A duration in seconds (lower is better).
    Seconds,
    /// A size in bytes (lower is better), such as a mean per item.
    Bytes,
}

impl Figure {
    pub fn per_sec(label: &str, value: f64) -> Figure {
        Figure {
            label: label.to_owned(),
            value,
            unit: Unit::PerSec,
        }
    }

    pub fn bytes_per_sec(label: &str, value: f64) -> Figure {
        Figure {
            label: label.to_owned(),
            value,
            unit: Unit::BytesPerSec,
        }
    }

    pub fn seconds(label: &str, value: f64) -> Figure {
        Figure {
            label: label.to_owned(),
            value,
            unit: Unit::Seconds,
        }
    }

    pub fn bytes(label: &str, value: f64) -> Figure {
        Figure {
            label: label.to_owned(),
            value,
            unit: Unit::Bytes,
        }
    }

    /// The value alone: `7.45k/s`, `296 MB/s`, `1.23 s`, `87.5 B`.
    pub fn rate(&self) -> String {
        match self.unit {
            Unit::PerSec => format!("{}/s", si(self.value)),
            Unit::BytesPerSec => bytes_rate(self.value),
            Unit::Seconds => seconds(self.value),
            Unit::Bytes if self.value < 1024.0 => format!("{:.1} B", self.value),
            Unit::Bytes => bytes(self.value.round() as u64),
        }
    }

    /// As the house prints it: `commit/s = 7.45k`, `write = 296 MB/s`, `reopen = 1.23 s`.
    pub fn equation(&self) -> String {
        match self.unit {
            Unit::PerSec => format!("{}/s = {}", self.label, si(self.value)),
            Unit::BytesPerSec | Unit::Seconds | Unit::Bytes => {
                format!("{} = {}", self.label, self.rate())
            }
        }
    }

    /// For a table cell: `7.45k commit/s`, `296 MB/s`, `1.23 s`.
    fn cell(&self) -> String {
        match self.unit {
            Unit::PerSec => format!("{} {}/s", si(self.value), self.label),
            Unit::BytesPerSec | Unit::Seconds | Unit::Bytes => self.rate(),
        }
    }
}

/// What a figure should reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At least this multiple of its reference.
    Ratio(f64),
    /// At least this value, in the figure's own unit.
    AtLeast(f64),
    /// At most this value, in the figure's own unit (times, sizes).
    AtMost(f64),
}

#[derive(Debug, Clone)]
struct Row {
    bench: String,
    figure: String,
    reference: String,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

/// The rows of one run.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    pub fn new() -> Report {
        Report::default()
    }

    /// A floor: printed and tabled, compared with nothing.
    pub fn floor(&mut self, name: &str, figure: &Figure) {
        println!("{name}: floor {}", figure.equation());
        self.rows.push(Row {
            bench: name.to_owned(),
            figure: figure.cell(),
            reference: "(floor)".into(),
            ratio: None,
            target: String::new(),
            met: None,
        });
    }

    /// A figure, compared with `reference` (`(name, figure)`) where there is one and checked
    /// against `target`. Returns whether the target was met (`None` without a target).
    pub fn compare(
        &mut self,
        bench: &str,
        figure: &Figure,
        reference: Option<(&str, &Figure)>,
        target: Option<Target>,
    ) -> Option<bool> {
        let ratio = reference.map(|(_, r)| figure.value / r.value);
        let met = target.map(|target| match target {
            Target::Ratio(at_least) => ratio.is_some_and(|ratio| ratio >= at_least),
            Target::AtLeast(at_least) => figure.value >= at_least,
            Target::AtMost(at_most) => figure.value <= at_most,
        });
        let target_text = match target {
            None => String::new(),
            Some(Target::Ratio(at_least)) => format!("≥ {at_least}×"),
            Some(Target::AtLeast(bound)) => format!("≥ {}", figure.with_value(bound).rate()),
            Some(Target::AtMost(bound)) => format!("≤ {}", figure.with_value(bound).rate()),
        };
        let mut line = format!("{bench}: {}", figure.equation());
        if let (Some((name, reference)), Some(ratio)) = (reference, ratio) {
            line += &format!(" ({ratio:.2} × {name} {})", reference.rate());
        }
        if let Some(met) = met {
            line += &format!("  [target {target_text}: {}]", verdict(met));
        }
        println!("{line}");
        self.rows.push(Row {
            bench: bench.to_owned(),
            figure: figure.cell(),
            reference: reference
                .map(|(name, r)| format!("{name} {}", r.rate()))
                .unwrap_or_default(),
            ratio,
            target: target_text,
            met,
        });
        met
    }

    /// A benchmark that could not run here, and why.
    pub fn skipped(&mut self, bench: &str, why: &str) {
        println!("{bench}: skipped ({why})");
        self.rows.push(Row {
            bench: bench.to_owned(),
            figure: "skipped".into(),
            reference: why.to_owned(),
            ratio: None,
            target: String::new(),
            met: None,
        });
    }

    /// Prints every row as a table.
    pub fn print_table(&self) {
        let header = ["benchmark", "figure", "vs", "ratio", "target", "result"];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|row| {
                [
                    row.bench.clone(),
                    row.figure.clone(),
                    row.reference.clone(),
                    row.ratio.map(|r| format!("{r:.2}×")).unwrap_or_default(),
                    row.target.clone(),
                    row.met.map(verdict).unwrap_or_default().to_owned(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let print_row = |row: &[String]| {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| {
                    let pad = width - cell.chars().count();
                    format!("{cell}{}", " ".repeat(pad))
                })
                .collect();
            println!("| {} |", line.join(" | "));
        };
        println!();
        print_row(&header.map(String::from));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        println!("|-{}-|", rule.join("-|-"));
        for row in &cells {
            print_row(row);
        }
    }
}

impl Figure {
    /// The same kind of figure with another value (to print a target in the figure's unit).
    fn with_value(&self, value: f64) -> Figure {
        Figure {
            value,
            ..self.clone()
        }
    }
}

/// `4.2 µs`, `850 µs`, `12.3 ms`, `1.23 s`.
fn seconds(value: f64) -> String {
    if value < 10e-6 {
        format!("{:.1} µs", value * 1e6)
    } else if value < 1e-3 {
        format!("{:.0} µs", value * 1e6)
    } else if value < 1.0 {
        format!("{:.1} ms", value * 1e3)
    } else {
        format!("{value:.2} s")
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_with_reference_and_target() {
        let mut report = Report::new();
        let floor = Figure::per_sec("fdatasync", 44_600.0);
        let figure = Figure::per_sec("commit", 41_000.0);
        assert_eq!(figure.equation(), "commit/s = 41.0k");
        assert_eq!(floor.rate(), "44.6k/s");
        let met = report.compare(
            "commit",
            &figure,
            Some(("fdatasync floor", &floor)),
            Some(Target::Ratio(0.85)),
        );
        assert_eq!(met, Some(true));
        let slow = Figure::bytes_per_sec("scan", 0.5e9);
        assert_eq!(
            report.compare("scan", &slow, None, Some(Target::AtLeast(1e9))),
            Some(false)
        );
        let reopen = Figure::seconds("reopen", 2.5);
        assert_eq!(reopen.equation(), "reopen = 2.50 s");
        assert_eq!(Figure::seconds("scan", 0.0123).rate(), "12.3 ms");
        assert_eq!(Figure::seconds("wake", 4.24e-6).rate(), "4.2 µs");
        assert_eq!(Figure::seconds("wake", 42.4e-6).rate(), "42 µs");
        assert_eq!(
            report.compare("reopen", &reopen, None, Some(Target::AtMost(1.0))),
            Some(false)
        );
        let heap = Figure::bytes("heap per message", 87.46);
        assert_eq!(heap.equation(), "heap per message = 87.5 B");
        assert_eq!(Figure::bytes("b", 2048.0).rate(), "2 KiB");
        assert_eq!(
            report.compare("heap", &heap, None, Some(Target::AtMost(100.0))),
            Some(true)
        );
        report.print_table();
    }
}
