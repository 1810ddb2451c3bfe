//! `--log-level` directives: which events and spans are logged.
//!
//! The syntax and matching are those of tracing-subscriber's `filter::Targets`, which the
//! shim used before it had its own subscriber: a comma-separated list of `LEVEL`,
//! `target=LEVEL` or a bare `target` (meaning `trace`); the most specific directive whose
//! target is a prefix of an event's target decides, and with none, the event is off.

use std::cmp::Ordering;

use tracing::level_filters::LevelFilter;
use tracing::Metadata;

/// One directive: `target[{field,...}]=level`, `level` or `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Directive {
    target: Option<String>,
    fields: Vec<String>,
    level: LevelFilter,
}

impl Directive {
    fn parse(s: &str) -> Result<Self, String> {
        let mut split = s.split('=');
        let part0 = split.next().unwrap_or_default();
        let Some(part1) = split.next() else {
            // A bare level or a bare target.
            return Ok(match part0.parse::<LevelFilter>() {
                Ok(level) => Self {
                    target: None,
                    fields: Vec::new(),
                    level,
                },
                Err(_) => Self {
                    target: Some(part0.to_owned()),
                    fields: Vec::new(),
                    level: LevelFilter::TRACE,
                },
            });
        };
        if split.next().is_some() {
            return Err(format!("too many '=' in {s:?}"));
        }
        let mut split = part0.split("[{");
        let target = split.next().map(str::to_owned);
        let mut fields = Vec::new();
        if let Some(list) = split.next() {
            if split.next().is_some() || !list.ends_with("}]") {
                return Err(format!("malformed field list in {s:?}"));
            }
            fields.extend(
                list.trim_end_matches("}]")
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(str::to_owned),
            );
        }
        let level = part1
            .parse::<LevelFilter>()
            .map_err(|_| format!("invalid level in {s:?}"))?;
        Ok(Self {
            target,
            fields,
            level,
        })
    }

    /// Most specific first: a longer target, then more fields.
    fn specificity(&self, other: &Self) -> Ordering {
        let key = |d: &Self| (d.target.as_ref().map(String::len), d.fields.len());
        key(other)
            .cmp(&key(self))
            .then_with(|| other.target.cmp(&self.target))
            .then_with(|| other.fields.cmp(&self.fields))
    }

    fn cares_about(&self, meta: &Metadata<'_>) -> bool {
        if let Some(target) = &self.target {
            if !meta.target().starts_with(target.as_str()) {
                return false;
            }
        }
        !meta.is_event() || self.fields.iter().all(|f| meta.fields().field(f).is_some())
    }
}

/// A parsed `--log-level` value.
#[derive(Clone, Debug)]
pub struct Targets {
    /// Most specific first.
    directives: Vec<Directive>,
    max: LevelFilter,
}

impl Targets {
    /// Everything at `level` or more severe, whatever its target.
    pub fn with_default(level: LevelFilter) -> Self {
        let mut t = Self {
            directives: Vec::new(),
            max: LevelFilter::OFF,
        };
        t.add(Directive {
            target: None,
            fields: Vec::new(),
            level,
        });
        t
    }

    /// Parses a directive list (`warn`, `agent_shim=debug,warn`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut t = Self {
            directives: Vec::new(),
            max: LevelFilter::OFF,
        };
        for part in s.split(',') {
            t.add(Directive::parse(part)?);
        }
        Ok(t)
    }

    /// Adds `d`; a directive for the same target and fields replaces the earlier one.
    fn add(&mut self, d: Directive) {
        self.max = self.max.max(d.level);
        match self
            .directives
            .binary_search_by(|probe| probe.specificity(&d))
        {
            Ok(i) => {
                if let Some(slot) = self.directives.get_mut(i) {
                    *slot = d;
                }
            }
            Err(i) => self.directives.insert(i, d),
        }
    }

    /// Whether a span or event with this metadata is logged.
    pub fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.directives
            .iter()
            .find(|d| d.cares_about(meta))
            .is_some_and(|d| d.level >= *meta.level())
    }

    /// The most verbose level any directive enables.
    pub fn max_level(&self) -> LevelFilter {
        self.max
    }
}

#[cfg(test)]
impl Targets {
    /// Whether an event of `level` for `target` is on, for tests (real metadata needs a
    /// callsite).
    pub(super) fn directives_for_test(&self, target: &str, level: tracing::Level) -> bool {
        self.directives
            .iter()
            .find(|d| {
                d.target
                    .as_ref()
                    .is_none_or(|t| target.starts_with(t.as_str()))
            })
            .is_some_and(|d| d.level >= level)
    }
}
