//! The summary: each figure beside its reference (a floor, or another figure), the ratio between
//! them and the target set for it. Each line is printed as soon as it is measured and the whole
//! set again as a table at the end of the run.

use crate::measure::{bytes_rate, si};

/// A measured rate.
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

    /// The rate alone: `7.45k/s`, `296 MB/s`.
    pub fn rate(&self) -> String {
        match self.unit {
            Unit::PerSec => format!("{}/s", si(self.value)),
            Unit::BytesPerSec => bytes_rate(self.value),
        }
    }

    /// As the house prints it: `commit/s = 7.45k`, `write = 296 MB/s`.
    pub fn equation(&self) -> String {
        match self.unit {
            Unit::PerSec => format!("{}/s = {}", self.label, si(self.value)),
            Unit::BytesPerSec => format!("{} = {}", self.label, bytes_rate(self.value)),
        }
    }

    /// For a table cell: `7.45k commit/s`, `296 MB/s`.
    fn cell(&self) -> String {
        match self.unit {
            Unit::PerSec => format!("{} {}/s", si(self.value), self.label),
            Unit::BytesPerSec => bytes_rate(self.value),
        }
    }
}

/// What a figure should reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At least this multiple of its reference.
    Ratio(f64),
    /// At least this rate, in the figure's own unit.
    AtLeast(f64),
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
        });
        let target_text = match target {
            None => String::new(),
            Some(Target::Ratio(at_least)) => format!("≥ {at_least}×"),
            Some(Target::AtLeast(at_least)) => format!(
                "≥ {}",
                Figure {
                    value: at_least,
                    ..figure.clone()
                }
                .rate()
            ),
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
        report.print_table();
    }
}
