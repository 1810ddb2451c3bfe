//! The child runs in its own new process group; with a terminal on stdin, that group is the
//! terminal's foreground group.

use anyhow::Result;

use crate::support::{in_both_modes, Mode, Shim, PATIENCE};

in_both_modes! {
    fn child_is_the_foreground_group_of_the_terminal(mode: Mode) -> Result<()> {
        let mut shim = Shim::new().mode(mode).tty().probe(["tty"]).start()?;
        shim.expect_line("isatty=1 fg=1 pgleader=1", PATIENCE)?;
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }

    fn child_has_its_own_group_without_a_terminal(mode: Mode) -> Result<()> {
        let mut shim = Shim::new().mode(mode).probe(["tty"]).start()?;
        shim.expect_line("isatty=0 fg=0 pgleader=1", PATIENCE)?;
        shim.expect_exit(0, PATIENCE)?;
        Ok(())
    }
}
