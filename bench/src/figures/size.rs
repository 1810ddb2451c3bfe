//! Static binary size: the musl release build of agent-shim, next to the anchors' binaries.

use crate::report::{Figure, Target};

use super::Ctx;

/// The target: 1 MiB.
const LIMIT: u64 = 1024 * 1024;

/// Measures the file sizes.
pub fn run(ctx: &Ctx) -> Figure {
    let mut fig = Figure::new(
        "static binary size",
        "The file size of `cargo build --release --target x86_64-unknown-linux-musl -p agent-shim` \
         (static, non-PIE, stripped; every feature is built in), and of the anchors' binaries as apt \
         installs them (tini-static is static; dumb-init and catatonit are as packaged).",
    );
    fig.columns = vec!["bytes".into(), "KiB".into()];
    let b = &ctx.bins;
    let mut shim = None;
    for (name, path) in [
        ("agent-shim (musl, static)", &b.shim),
        ("tini-static", &b.tini),
        ("dumb-init", &b.dumb_init),
        ("catatonit", &b.catatonit),
    ] {
        match std::fs::metadata(path) {
            Ok(m) => {
                if shim.is_none() {
                    shim = Some(m.len());
                }
                fig.rows.push((
                    name.into(),
                    vec![
                        m.len().to_string(),
                        format!("{:.1}", m.len() as f64 / 1024.0),
                    ],
                ));
            }
            Err(e) => fig
                .notes
                .push(format!("{name}: cannot stat {}: {e}", path.display())),
        }
    }
    let text = "≤ 1 MiB";
    match shim {
        Some(size) => {
            fig.targets.push(Target::check(
                text,
                size <= LIMIT,
                format!("{size} bytes vs limit {LIMIT}"),
            ));
            if size > LIMIT {
                fig.notes.push(format!(
                    "FAIL: {size} bytes is {:.1} KiB over 1 MiB. The async runtime, control server \
                     and supervisor that supervisor mode added account for most of the growth over \
                     plain init mode. Check that the build dropped the unwind tables and libunwind \
                     (with them std's backtrace symbolization, about 420 KiB in all): \
                     shim/build.rs and shim/src/unwinder.rs act only for the musl target with \
                     `panic = \"abort\"`; see shim/README.md, “The static binary”.",
                    (size - LIMIT) as f64 / 1024.0
                ));
            }
        }
        None => fig.targets.push(Target::not_measured(
            text,
            "the static binary is missing".into(),
        )),
    }
    fig
}

/// The size of the static shim, for the report's footer.
pub fn shim_size(ctx: &Ctx) -> u64 {
    std::fs::metadata(&ctx.bins.shim)
        .map(|m| m.len())
        .unwrap_or(0)
}
