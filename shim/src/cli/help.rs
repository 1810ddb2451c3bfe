//! `--help` and `--version`, written from the flag table.

use std::fmt::Write as _;

use super::defs::FLAGS;
use super::flag::{Flag, Repeat, Section, Shown};

/// The usage summary printed with every usage error.
pub const USAGE: &str = "usage: agent-shim [OPTIONS] [--] CMD [ARGS...]";

/// Where the help text of a flag starts.
const HELP_COLUMN: usize = 29;
/// The widest a help line gets.
const WIDTH: usize = 93;

/// The `--help` text.
pub fn help() -> String {
    let mut out = format!(
        "agent-shim {}: PID 1 for containers and agent sandboxes.
Runs CMD as its child, reaps every zombie, forwards signals, exits with CMD's status.

{USAGE}
",
        env!("CARGO_PKG_VERSION")
    );
    for (section, title) in [
        (
            Section::Init,
            "Options (each also settable by the environment variable shown; a flag beats its variable):",
        ),
        (
            Section::Supervisor,
            "Supervisor mode (CMD is an agent driver speaking the driver protocol):",
        ),
        (
            Section::Sandbox,
            "Sandbox limits (the driver and every exec) and tool execution:",
        ),
    ] {
        out.push('\n');
        out.push_str(title);
        out.push('\n');
        for flag in FLAGS.iter().filter(|f| f.section == section) {
            entry(&mut out, flag);
        }
        if section == Section::Init {
            out.push_str("  -h, --help                 print this help\n");
            out.push_str("  -V, --version              print the version\n");
        }
    }
    out.push_str(
        "
DUR: 500ms, 8s, 2m, or a number of seconds (8, 0.5).
Signals: TERM, SIGTERM, 15, RTMIN+1... Booleans in the environment: 1/true/yes, 0/false/no.
Exit codes: CMD's code, 128+N if CMD died of signal N, 2 usage error, 125 the shim failed
(also: the token file is unreadable, empty, or group/other-accessible), 126 CMD not
executable, 127 CMD not found.
",
    );
    out
}

/// One flag: its names and value, its help, and `[VARIABLE, default D]` (a list's variable is
/// comma-separated).
fn entry(out: &mut String, flag: &Flag) {
    let start = out.len();
    match flag.short {
        Some(c) => {
            let _ = write!(out, "  -{c}, --{}", flag.long);
        }
        None => {
            let _ = write!(out, "      --{}", flag.long);
        }
    }
    if let Some(value) = flag.value {
        let _ = write!(out, " {value}");
    }
    let indent = " ".repeat(HELP_COLUMN);
    if out.len() - start + 1 < HELP_COLUMN {
        let pad = HELP_COLUMN - (out.len() - start);
        out.push_str(&indent[..pad]);
    } else {
        out.push('\n');
        out.push_str(&indent);
    }
    let mut line_start = out.len() - HELP_COLUMN;
    for (n, line) in flag.help.split('\n').enumerate() {
        if n > 0 {
            out.push('\n');
            line_start = out.len();
            out.push_str(&indent);
        }
        out.push_str(line);
    }
    let tag = match flag.default {
        _ if flag.repeat == Repeat::List => format!("[{}, comma-separated]", flag.var),
        Shown::Value(d) => format!("[{}, default {d}]", flag.var),
        Shown::Text(_) if flag.value.is_none() => format!("[{}]", flag.var),
        Shown::Text(d) => format!("[{}, default {d}]", flag.var),
    };
    if out.len() - line_start + 1 + tag.len() <= WIDTH {
        out.push(' ');
    } else {
        out.push('\n');
        out.push_str(&indent);
    }
    out.push_str(&tag);
    out.push('\n');
}

/// The `--version` line.
pub fn version() -> String {
    format!("agent-shim {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn help_shows_every_flag_variable_and_default() {
        let help = help();
        for flag in FLAGS {
            assert!(
                help.contains(&format!("--{}", flag.long)),
                "--{}",
                flag.long
            );
            assert!(help.contains(flag.var), "{}", flag.var);
            if let Shown::Value(d) = flag.default {
                assert!(help.contains(&format!("{}, default {d}]", flag.var)), "{d}");
            }
        }
        for line in help.lines() {
            assert!(line.chars().count() <= WIDTH, "too wide: {line:?}");
        }
        assert!(help.contains(USAGE) && help.contains("--help") && help.contains("--version"));
        assert!(version().starts_with("agent-shim "));
    }

    /// The cells of a Markdown table row (`\|` is a `|` inside a cell).
    fn cells(row: &str) -> Vec<String> {
        let row = row.trim().trim_start_matches('|').trim_end_matches('|');
        row.replace("\\|", "\u{0}")
            .split('|')
            .map(|c| c.replace('\u{0}', "|").trim().to_owned())
            .collect()
    }

    /// The `code` spans of a cell.
    fn code(cell: &str) -> Vec<&str> {
        cell.split('`').skip(1).step_by(2).collect()
    }

    /// Checks every flag table of a README (a table whose first column is headed `flag` or
    /// `agent-shim`) against [`FLAGS`]; returns the flags it lists.
    fn check_readme(path: &str) -> BTreeSet<&'static str> {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut seen = BTreeSet::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if !line.starts_with('|') {
                continue;
            }
            let header = cells(line);
            let first = header.first().map(String::as_str).unwrap_or_default();
            if !(first.starts_with("flag") || first == "agent-shim") {
                // Not a flag table: skip its rows.
                while lines.peek().is_some_and(|l| l.starts_with('|')) {
                    lines.next();
                }
                continue;
            }
            let var_col = header
                .iter()
                .skip(1)
                .position(|h| h.contains("variable") || h.contains("environment"))
                .map(|i| i + 1);
            let default_col = header.iter().position(|h| h == "default");
            lines.next(); // |---|---|
            while let Some(row) = lines.next_if(|l| l.starts_with('|')) {
                let row = cells(row);
                let flags: Vec<&Flag> = code(&row[0])
                    .into_iter()
                    .filter_map(|c| c.strip_prefix("--"))
                    .map(|c| c.split([' ', '=']).next().unwrap_or(c))
                    .filter(|name| !["help", "version"].contains(name))
                    .map(|name| {
                        super::super::defs::long(name)
                            .unwrap_or_else(|| panic!("{path}: --{name} is not a flag"))
                    })
                    .collect();
                seen.extend(flags.iter().map(|f| f.long));
                if let Some(col) = var_col {
                    let vars: Vec<&str> = code(&row[col])
                        .into_iter()
                        .filter(|v| v.starts_with("AGENT_SHIM_"))
                        .collect();
                    for v in &vars {
                        assert!(
                            flags.iter().any(|f| f.var == *v),
                            "{path}: {v} is not the variable of {}",
                            row[0]
                        );
                    }
                    if let [flag] = flags[..] {
                        assert_eq!(vars, [flag.var], "{path}: the variable of --{}", flag.long);
                    }
                }
                if let (Some(col), [flag]) = (default_col, &flags[..]) {
                    let want = match flag.default {
                        Shown::Value(d) => format!("`{d}`"),
                        Shown::Text(t) => t.to_owned(),
                    };
                    assert_eq!(row[col], want, "{path}: the default of --{}", flag.long);
                }
            }
        }
        seen
    }

    #[test]
    fn the_readmes_list_every_flag_with_its_variable_and_default() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut seen = check_readme(&format!("{root}/README.md"));
        seen.extend(check_readme(&format!("{root}/shim/README.md")));
        let missing: Vec<_> = FLAGS
            .iter()
            .map(|f| f.long)
            .filter(|f| !seen.contains(f))
            .collect();
        assert!(missing.is_empty(), "flags in no README table: {missing:?}");
    }
}
