//! Resource readings: the sandbox's cgroup, its workspace filesystem and its processes.
//!
//! `metrics{id}` asks for one [`Reading`], answered by `metrics_reply`; with
//! `--metrics-interval` the shim also sends the same reading as a periodic `metrics` event.
//! Every figure is optional: a field is present only when the shim could read it, and nothing
//! is estimated or filled in (PROTOCOL.md §8.9).

use serde::{Deserialize, Serialize};

use super::fields;
use super::{nil_as_default, RequestId};
use crate::enc::put_names;

/// `metrics`: ask for a [`MetricsReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The request id.
    pub id: RequestId,
}

fields!(Metrics { id: req });

/// `metrics_reply`: one [`Reading`] (its fields, beside `re`), answering `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReply {
    /// The `id` of the `metrics` request.
    pub re: RequestId,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The sandbox's cgroup, when one could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Box<CgroupReading>>,
    /// The workspace filesystem, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<FsReading>,
    /// The driver and each running exec (the shim reads these only as PID 1).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nil_as_default"
    )]
    pub procs: Vec<ProcReading>,
}

fields!(MetricsReply { re: req, time_ms: req, cgroup: opt skip, workspace: opt skip, procs: nil skip });

impl MetricsReply {
    /// The reply to request `re` carrying `reading`.
    pub fn new(re: RequestId, reading: Reading) -> Self {
        MetricsReply {
            re,
            time_ms: reading.time_ms,
            cgroup: reading.cgroup,
            workspace: reading.workspace,
            procs: reading.procs,
        }
    }

    /// The reading, without `re`.
    pub fn into_reading(self) -> Reading {
        Reading {
            time_ms: self.time_ms,
            cgroup: self.cgroup,
            workspace: self.workspace,
            procs: self.procs,
        }
    }
}

/// One resource reading: the `metrics` event, and the body of a `metrics_reply`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The sandbox's cgroup, when one could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Box<CgroupReading>>,
    /// The workspace filesystem, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<FsReading>,
    /// The driver and each running exec (the shim reads these only as PID 1).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nil_as_default"
    )]
    pub procs: Vec<ProcReading>,
}

fields!(Reading { time_ms: req, cgroup: opt skip, workspace: opt skip, procs: nil skip });

/// The sandbox cgroup's figures. Limits are absent when there is none (`max`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupReading {
    /// The cgroup version read: 1 or 2.
    pub version: u8,
    /// Memory in use, bytes (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Memory limit, bytes (`memory.max`, `memory.limit_in_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Highest memory use seen, bytes (`memory.peak`, `memory.max_usage_in_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    /// Anonymous memory (process heaps and stacks), bytes (`memory.stat` `anon`, v1
    /// `total_rss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_anon_bytes: Option<u64>,
    /// Page cache (reclaimable file data), bytes (`memory.stat` `file`, v1 `total_cache`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_file_bytes: Option<u64>,
    /// Swap in use, bytes (`memory.swap.current`; v1: `memsw` usage minus memory usage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_bytes: Option<u64>,
    /// Swap limit, bytes (`memory.swap.max`; v1: the `memsw` limit, memory and swap together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_limit_bytes: Option<u64>,
    /// Times the cgroup hit its limit and the OOM killer was invoked (v2 `memory.events` `oom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom: Option<u64>,
    /// Processes the OOM killer killed (`oom_kill` of `memory.events` / `memory.oom_control`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    /// CPU time used, microseconds (`cpu.stat` `usage_usec`, v1 `cpuacct.usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_us: Option<u64>,
    /// Enforcement periods elapsed (`cpu.stat` `nr_periods`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_periods: Option<u64>,
    /// Periods in which the cgroup was throttled (`cpu.stat` `nr_throttled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttled_periods: Option<u64>,
    /// Time throttled, microseconds (`throttled_usec`, v1 `throttled_time` / 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttled_us: Option<u64>,
    /// CPU quota per period, microseconds (`cpu.max`, v1 `cpu.cfs_quota_us`); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_us: Option<u64>,
    /// The quota's period, microseconds (`cpu.max`, v1 `cpu.cfs_period_us`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period_us: Option<u64>,
    /// Processes and threads in the cgroup (`pids.current`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Their limit (`pids.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
    /// Bytes read from block devices (`io.stat` `rbytes`, v1 `blkio` `Read`), all devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_read_bytes: Option<u64>,
    /// Bytes written to block devices (`io.stat` `wbytes`, v1 `blkio` `Write`), all devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_write_bytes: Option<u64>,
}

fields!(CgroupReading { version: req, memory_bytes: opt skip, memory_limit_bytes: opt skip, memory_peak_bytes: opt skip, memory_anon_bytes: opt skip, memory_file_bytes: opt skip, swap_bytes: opt skip, swap_limit_bytes: opt skip, oom: opt skip, oom_kills: opt skip, cpu_usage_us: opt skip, cpu_periods: opt skip, cpu_throttled_periods: opt skip, cpu_throttled_us: opt skip, cpu_quota_us: opt skip, cpu_period_us: opt skip, pids: opt skip, pids_limit: opt skip, io_read_bytes: opt skip, io_write_bytes: opt skip });

/// The workspace filesystem (`statfs` of the driver's working directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsReading {
    /// Its size, bytes.
    pub size_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes an unprivileged user may still write.
    pub avail_bytes: u64,
    /// Inodes in all (0 on filesystems without a fixed number).
    pub inodes: u64,
    /// Inodes in use.
    pub inodes_used: u64,
}

fields!(FsReading {
    size_bytes: req,
    used_bytes: req,
    avail_bytes: req,
    inodes: req,
    inodes_used: req
});

/// What a process reading is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcRole {
    /// The driver.
    Driver,
    /// An exec (`exec_id` says which).
    Exec,
}

put_names!(ProcRole { Driver = "driver", Exec = "exec" });

/// The driver or one exec, with every process of its session (what it started and did not
/// move out of it), from `/proc/PID/stat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcReading {
    /// The driver or an exec.
    pub role: ProcRole,
    /// The exec, for an exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<u64>,
    /// The leader's pid.
    pub pid: u32,
    /// Processes in its session, the leader included.
    pub pids: u32,
    /// Their resident memory together, bytes.
    pub rss_bytes: u64,
    /// Their CPU time together (user and system), microseconds.
    pub cpu_us: u64,
}

fields!(ProcReading { role: req, exec_id: opt skip, pid: req, pids: req, rss_bytes: req, cpu_us: req });
