//! What a test microVM boots: the host's kernel with its modules, and a `newc` cpio
//! archive (the initramfs) written in process. Used by the VM tests (`tests/tests/vm/`) and
//! by the boot benchmark (`bench/src/bin/vm-boot.rs`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context as _, Result};

/// The kernel to boot and its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `/boot/vmlinuz-VERSION`.
    pub image: PathBuf,
    /// `/lib/modules/VERSION`.
    pub modules: PathBuf,
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*` with its modules, if QEMU is installed too.
    pub fn find() -> Result<Kernel> {
        let qemu = Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        ensure!(
            qemu.is_ok_and(|s| s.success()),
            "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
        );
        let mut versions: Vec<String> = std::fs::read_dir("/boot")
            .context("read /boot")?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_owned)
            })
            .filter(|v| {
                Path::new("/lib/modules")
                    .join(v)
                    .join("modules.dep")
                    .is_file()
            })
            .collect();
        versions.sort();
        let version = versions
            .pop()
            .context("no /boot/vmlinuz-* with modules (apt-get install linux-image-amd64)")?;
        Ok(Kernel {
            image: PathBuf::from("/boot").join(format!("vmlinuz-{version}")),
            modules: PathBuf::from("/lib/modules").join(version),
        })
    }

    /// The modules `names` and their dependencies, in load order (dependencies first), as
    /// paths relative to [`Kernel::modules`].
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep"))?;
        let table: Vec<(&str, Vec<&str>)> = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| (m, d.split_whitespace().collect()))
            .collect();
        fn visit<'a>(
            table: &[(&'a str, Vec<&'a str>)],
            path: &'a str,
            out: &mut Vec<String>,
        ) -> Result<()> {
            if out.iter().any(|o| o == path) {
                return Ok(());
            }
            let (_, deps) = table
                .iter()
                .find(|(m, _)| *m == path)
                .with_context(|| format!("{path} not in modules.dep"))?;
            // modules.dep lists a module's dependencies last-loaded first.
            for d in deps.iter().rev() {
                visit(table, d, out)?;
            }
            out.push(path.to_owned());
            Ok(())
        }
        let mut out = Vec::new();
        for name in names {
            let ko = format!("/{name}.ko");
            let (path, _) = table
                .iter()
                .find(|(m, _)| m.ends_with(&ko) || m.ends_with(&format!("{ko}.xz")))
                .with_context(|| format!("module {name} not found in modules.dep"))?;
            visit(&table, path, &mut out)?;
        }
        Ok(out)
    }
}

/// A `newc` cpio archive (what the kernel unpacks as the initramfs), written by hand: every
/// entry owned by root, with the mode given.
#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let mut header = String::from("070701");
        for field in [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ] {
            let _ = write!(header, "{field:08x}");
        }
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// A regular file with `mode`'s permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, (0, 0), data);
    }

    /// A character device.
    pub fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// The modules `names` of `kernel` with their dependencies, as `modules/NAME.ko`, and
    /// `modules.order`, the order to load them in (one `/modules/NAME.ko` a line).
    pub fn modules(&mut self, kernel: &Kernel, names: &[&str]) -> Result<()> {
        let mut order = String::new();
        for m in kernel.load_order(names)? {
            let name = Path::new(&m)
                .file_name()
                .and_then(|n| n.to_str())
                .context("module name")?
                .to_owned();
            let path = kernel.modules.join(&m);
            let data = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
            self.file(&format!("modules/{name}"), 0o644, &data);
            let _ = writeln!(order, "/modules/{name}");
        }
        self.file("modules.order", 0o644, order.as_bytes());
        Ok(())
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}
