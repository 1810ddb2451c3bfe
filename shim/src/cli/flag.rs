//! What a flag is: the row type of the flag table in [`super::defs`], and the shorthands
//! the table is written with.

use super::Config;

/// Sets a flag's value in the config, or says what is wrong with it.
pub(super) type Setter = fn(&mut Config, &str) -> Result<(), String>;

/// How often a flag may be given, and how its variable is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repeat {
    /// The last one given wins.
    Last,
    /// At most once.
    Once,
    /// Repeatable, each value added; the variable is a comma-separated list, and flags
    /// replace it as a whole.
    List,
}

/// What `--help` and the READMEs show as the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shown {
    /// A value the flag's setter parses into the default ([`Config::default`] is built so).
    Value(&'static str),
    /// A description (`off`, `none`, `the shim's`): the field's empty value is the default.
    Text(&'static str),
}

/// The part of `--help` a flag is listed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Section {
    /// Plain init mode (and every mode).
    Init,
    /// Supervisor mode.
    Supervisor,
    /// Sandbox limits and tool execution.
    Sandbox,
}

/// One option.
pub(super) struct Flag {
    /// The long name, without `--`.
    pub(super) long: &'static str,
    /// The short name, if any.
    pub(super) short: Option<char>,
    /// The value's placeholder in `--help` (`DUR`); `None`: a switch, taking no value.
    pub(super) value: Option<&'static str>,
    /// The environment variable.
    pub(super) var: &'static str,
    /// The default, as shown.
    pub(super) default: Shown,
    /// How often it may be given.
    pub(super) repeat: Repeat,
    /// Where `--help` lists it.
    pub(super) section: Section,
    /// The help text; `\n` breaks a line.
    pub(super) help: &'static str,
    /// Stores a value.
    pub(super) set: Setter,
}

/// The default of a switch, and of a flag whose absence means off.
pub(super) const OFF: Shown = Shown::Text("off");
/// The default of a flag whose absence means none.
pub(super) const NONE: Shown = Shown::Text("none");

/// A flag that takes a value, given only the last time.
pub(super) const fn val(
    long: &'static str,
    value: &'static str,
    var: &'static str,
    default: Shown,
    section: Section,
    help: &'static str,
    set: Setter,
) -> Flag {
    Flag {
        long,
        short: None,
        value: Some(value),
        var,
        default,
        repeat: Repeat::Last,
        section,
        help,
        set,
    }
}

/// A switch: given means on; its variable is a boolean.
pub(super) const fn switch(
    long: &'static str,
    var: &'static str,
    section: Section,
    help: &'static str,
    set: Setter,
) -> Flag {
    Flag {
        long,
        short: None,
        value: None,
        var,
        default: OFF,
        repeat: Repeat::Last,
        section,
        help,
        set,
    }
}
