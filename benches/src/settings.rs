//! What a benchmark binary was asked to run: its mode and filter, read from the command line as
//! criterion reads them, and its sizes, read from `HERALD_BENCH_*` environment variables.
//!
//! `cargo bench` passes `--bench`: full sizes, judged against targets. `cargo test --benches`
//! passes nothing (or `--test`): one tiny pass of everything, a smoke test, judged against
//! nothing. The first argument that is not a flag filters benchmarks by substring.

/// Mode and filter of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `cargo bench` (full sizes); otherwise `cargo test --benches` (one tiny pass).
    pub bench: bool,
    /// `--list`: print the benchmark names only.
    pub list: bool,
    pub filter: Option<String>,
}

impl Invocation {
    /// From this process's arguments.
    pub fn from_args() -> Invocation {
        Invocation::parse(std::env::args().skip(1))
    }

    /// From `args` (the program name excluded).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Invocation {
        let args: Vec<String> = args.into_iter().collect();
        let flag = |name: &str| args.iter().any(|a| a == name);
        Invocation {
            bench: flag("--bench") && !flag("--test"),
            list: flag("--list"),
            filter: args.iter().find(|a| !a.starts_with('-')).cloned(),
        }
    }

    /// Whether the benchmark `name` runs: no filter, or `name` contains it.
    pub fn selected(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| name.contains(f))
    }
}

/// The variable `name` parsed as a number, or `default` when it is not set.
pub fn env_f64(name: &str, default: f64) -> Result<f64, String> {
    env_parse(name, default)
}

/// The variable `name` parsed as a count, or `default` when it is not set.
pub fn env_u64(name: &str, default: u64) -> Result<u64, String> {
    env_parse(name, default)
}

fn env_parse<T>(name: &str, default: T) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value.parse().map_err(|e| format!("{name}={value:?}: {e}")),
        Err(_) => Ok(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mode_and_filter() {
        let parse = |args: &[&str]| Invocation::parse(args.iter().map(|a| (*a).to_owned()));
        let bench = parse(&["--bench", "reopen"]);
        assert!(bench.bench && !bench.list);
        assert!(bench.selected("engine/queued/reopen") && !bench.selected("engine/send"));
        let test = parse(&[]);
        assert!(!test.bench && test.selected("anything"));
        assert!(!parse(&["--bench", "--test"]).bench);
        assert!(parse(&["--list"]).list);
        assert_eq!(env_u64("HERALD_BENCH_SURELY_UNSET_VARIABLE", 7), Ok(7));
    }
}
