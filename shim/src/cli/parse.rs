//! Reading the command line and the environment through the flag table.

use std::ffi::OsString;

use super::defs;
use super::flag::{Flag, Repeat};
use super::values::list;
use super::{Action, Config, TokenSource, UsageError, TOKEN_VAR};
use crate::control::Token;

/// Parses the command line (`args` without the program name) and the environment (`env`
/// looks a variable up).
pub fn parse<I, E>(args: I, env: E) -> Result<Action, UsageError>
where
    I: IntoIterator<Item = OsString>,
    E: Fn(&str) -> Option<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};

    // 1. Flags, applied as they come. Repeatable list flags, when given, replace the
    //    variable's list as a whole: a variable is read only for a flag not given.
    let mut cfg = Config::default();
    let mut given = vec![false; defs::FLAGS.len()];
    let mut command = Vec::new();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        let flag = match arg {
            Short('h') | Long("help") => return Ok(Action::Help),
            Short('V') | Long("version") => return Ok(Action::Version),
            Short(c) => defs::short(c),
            Long(name) => defs::long(name),
            Value(program) => {
                command.push(program);
                command.extend(p.raw_args()?);
                break;
            }
        };
        let Some((i, flag)) = flag.and_then(|f| Some((index(f)?, f))) else {
            return Err(arg.unexpected().into());
        };
        let source = format!("--{}", flag.long);
        let value = match flag.value {
            Some(_) => utf8(&source, p.value()?)?,
            None => "1".to_owned(),
        };
        if flag.repeat == Repeat::Once && given[i] {
            return Err(UsageError(format!("{source} may be given only once")));
        }
        given[i] = true;
        set(flag, &mut cfg, &source, &value)?;
    }
    if command.is_empty() {
        return Err(UsageError("no command given".to_owned()));
    }
    cfg.command = command;

    // 2. The environment, for what no flag set (a bad variable a flag overrides is ignored).
    for (i, flag) in defs::FLAGS.iter().enumerate() {
        if given[i] {
            continue;
        }
        let Some(v) = env(flag.var) else { continue };
        let v = utf8(flag.var, v)?;
        if flag.repeat == Repeat::List {
            for part in list(&v) {
                set(flag, &mut cfg, flag.var, part)?;
            }
        } else {
            set(flag, &mut cfg, flag.var, &v)?;
        }
    }

    // 3. The token, and whether a control link has one.
    let linked = cfg.sup.control_listen.is_some() || cfg.sup.control_connect.is_some();
    if cfg.sup.control_token.is_none() && linked {
        // The token matters only with a control link: plain mode ignores an empty variable.
        if let Some(v) = env(TOKEN_VAR) {
            use std::os::unix::ffi::OsStringExt as _;
            let token = Token::from_line(v.into_vec())
                .map_err(|_| UsageError(format!("{TOKEN_VAR} is empty")))?;
            cfg.sup.control_token = Some(TokenSource::Env(token));
        }
    }
    if cfg.sup.control_token.is_none() {
        let sup = &cfg.sup;
        for (flag, addr) in [
            ("--control-listen", &sup.control_listen),
            ("--control-connect", &sup.control_connect),
        ] {
            match addr {
                Some(addr) if addr.is_network() => {
                    return Err(UsageError(format!(
                        "{flag} {addr} needs a token: --control-token-file PATH or {TOKEN_VAR}"
                    )))
                }
                Some(addr) if !sup.control_insecure => {
                    return Err(UsageError(format!(
                        "{flag} {addr} needs a token (--control-token-file PATH or \
                         {TOKEN_VAR}) or --control-insecure"
                    )))
                }
                _ => {}
            }
        }
    }
    Ok(Action::Run(Box::new(cfg)))
}

/// The flag's row in the table.
fn index(flag: &Flag) -> Option<usize> {
    defs::FLAGS.iter().position(|f| std::ptr::eq(f, flag))
}

/// Runs the flag's setter; an error says where the value came from.
fn set(flag: &Flag, cfg: &mut Config, source: &str, value: &str) -> Result<(), UsageError> {
    (flag.set)(cfg, value).map_err(|e| UsageError(format!("{source}: {e}")))
}

fn utf8(source: &str, v: OsString) -> Result<String, UsageError> {
    v.into_string()
        .map_err(|_| UsageError(format!("{source}: value is not valid UTF-8")))
}
