//! The bounded task queue in front of the driver.
//!
//! The driver works on one task at a time; everything submitted meanwhile (or while it
//! starts, restarts or is paused) waits here, in order, up to a fixed capacity — a full queue
//! is refused, never silently dropped. The queue also provides submit idempotency: an id that
//! is queued, running, or among the last `remember` finished ones is a duplicate, so a
//! control plane that retries a submit after a lost reply runs the task once.
//!
//! ```text
//!   submit ──▶ [ queued … ] ──start_next──▶ running ──finish / abandon_running──▶ remembered
//!                  ▲   │ cancel                 │ driver_lost
//!                  │   ▼                        ├── redeliver: front of the queue, attempt+1
//!                  │ remembered                 └── otherwise: failed, remembered
//!                  └────────────────────────────────┘
//! ```
//!
//! Pure bookkeeping: it sends nothing and makes the `task_done` values the shim reports on
//! the driver's behalf.

use std::collections::{HashSet, VecDeque};

use driver_protocol::message::{SubmitTask, Task, TaskDone, TaskStatus};

/// The result of [`TaskQueue::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Queued behind `position` other queued tasks.
    Accepted {
        /// Tasks ahead of it in the queue (the running one not counted).
        position: u32,
    },
    /// The id is already queued, running or recently finished: nothing was done.
    Duplicate,
    /// The queue is full: the task was refused.
    Full,
}

/// The result of [`TaskQueue::cancel`].
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// It was queued and is now removed; report this `cancelled` task_done.
    Dequeued(TaskDone),
    /// It is running: the driver must be asked to cancel it.
    Running,
    /// No such task is queued or running.
    Unknown,
}

/// The result of [`TaskQueue::driver_lost`] when a task was running.
#[derive(Debug, Clone, PartialEq)]
pub enum LostOutcome {
    /// The task allowed redelivery: it is back at the front of the queue.
    Requeued {
        /// The task.
        task_id: String,
        /// The attempt it will be delivered as.
        attempt: u32,
    },
    /// The task failed; report this task_done.
    Failed(TaskDone),
}

/// A task waiting or running, with what the driver does not see.
#[derive(Debug, Clone)]
struct Entry {
    task: Task,
    redeliver: bool,
    /// With `redeliver`: the deliveries allowed in all.
    max_attempts: u32,
}

/// The queue: waiting tasks, the running one, and the recently finished ids.
#[derive(Debug)]
pub struct TaskQueue {
    capacity: usize,
    queue: VecDeque<Entry>,
    running: Option<Entry>,
    /// Ids of queued and running tasks.
    active: HashSet<String>,
    /// Recently finished ids, oldest first, at most `remember`.
    finished: VecDeque<String>,
    finished_set: HashSet<String>,
    remember: usize,
    /// The `max_attempts` of a task that gives none.
    max_attempts: u32,
}

impl TaskQueue {
    /// `capacity` queued tasks (the running one not counted); `remember` finished ids kept
    /// for idempotency.
    pub fn new(capacity: usize, remember: usize) -> Self {
        Self {
            capacity,
            queue: VecDeque::new(),
            running: None,
            active: HashSet::new(),
            finished: VecDeque::new(),
            finished_set: HashSet::new(),
            remember,
            max_attempts: u32::MAX,
        }
    }

    /// The same, with `max_attempts` deliveries of a redelivered task unless it says otherwise
    /// (`--max-attempts`; `new` allows any number).
    pub fn with_max_attempts(self, max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            ..self
        }
    }

    /// Queues a task. A known id (queued, running or remembered) ⇒ `Duplicate`; a full
    /// queue ⇒ `Full`.
    pub fn submit(&mut self, s: SubmitTask) -> SubmitOutcome {
        if self.is_known(&s.task_id) {
            return SubmitOutcome::Duplicate;
        }
        if self.queue.len() >= self.capacity {
            return SubmitOutcome::Full;
        }
        let position = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        self.active.insert(s.task_id.clone());
        self.queue.push_back(Entry {
            task: Task {
                task_id: s.task_id,
                input: s.input,
                output_schema: s.output_schema,
                timeout_ms: s.timeout_ms,
                attempt: 1,
            },
            redeliver: s.redeliver,
            max_attempts: s.max_attempts.unwrap_or(self.max_attempts).max(1),
        });
        SubmitOutcome::Accepted { position }
    }

    /// Marks the next queued task running and returns the `task` to send; `None` if one runs
    /// or none waits.
    pub fn start_next(&mut self) -> Option<Task> {
        if self.running.is_some() {
            return None;
        }
        let entry = self.queue.pop_front()?;
        let task = entry.task.clone();
        self.running = Some(entry);
        Some(task)
    }

    /// The id of the running task.
    pub fn running(&self) -> Option<&str> {
        self.running.as_ref().map(|e| e.task.task_id.as_str())
    }

    /// How many tasks wait (the running one not counted).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether `task_id` is queued, running or among the remembered finished ids.
    pub fn is_known(&self, task_id: &str) -> bool {
        self.active.contains(task_id) || self.finished_set.contains(task_id)
    }

    /// Whether `task_id` ended (and is still remembered as such).
    pub fn is_finished(&self, task_id: &str) -> bool {
        self.finished_set.contains(task_id)
    }

    /// The driver reported `task_done` for `task_id`: true if it was the running task (it is
    /// then remembered as finished); false otherwise (nothing changes — e.g. a late
    /// `task_done` for an abandoned task).
    pub fn finish(&mut self, task_id: &str) -> bool {
        if self.running() != Some(task_id) {
            return false;
        }
        if let Some(entry) = self.running.take() {
            self.retire(entry.task.task_id);
        }
        true
    }

    /// Cancels a task: a queued one is removed (`Dequeued` carries its `cancelled`
    /// task_done); a running one must be cancelled by the driver (`Running`, nothing
    /// changes here); anything else is `Unknown`.
    pub fn cancel(&mut self, task_id: &str) -> CancelOutcome {
        if self.running() == Some(task_id) {
            return CancelOutcome::Running;
        }
        let Some(index) = self.queue.iter().position(|e| e.task.task_id == task_id) else {
            return CancelOutcome::Unknown;
        };
        let Some(entry) = self.queue.remove(index) else {
            return CancelOutcome::Unknown;
        };
        let done = done(&entry.task.task_id, TaskStatus::Cancelled, None);
        self.retire(entry.task.task_id);
        CancelOutcome::Dequeued(done)
    }

    /// The shim gave up on the running task (cancel grace expired): forget it as finished and
    /// return its `cancelled` task_done with `error`.
    pub fn abandon_running(&mut self, error: &str) -> Option<TaskDone> {
        let entry = self.running.take()?;
        let done = done(&entry.task.task_id, TaskStatus::Cancelled, Some(error));
        self.retire(entry.task.task_id);
        Some(done)
    }

    /// The driver died: the running task (if any) is requeued at the front with attempt+1
    /// when it allowed redelivery and has attempts left (whatever the capacity: it was
    /// already accepted), or failed with `reason` as its error (which says `max_attempts
    /// reached` when the attempts ran out).
    pub fn driver_lost(&mut self, reason: &str) -> Option<LostOutcome> {
        let mut entry = self.running.take()?;
        if entry.redeliver && entry.task.attempt >= entry.max_attempts {
            let reason = format!(
                "{reason}; max_attempts reached ({} of {})",
                entry.task.attempt, entry.max_attempts
            );
            let done = done(&entry.task.task_id, TaskStatus::Failed, Some(&reason));
            self.retire(entry.task.task_id);
            return Some(LostOutcome::Failed(done));
        }
        if entry.redeliver {
            entry.task.attempt = entry.task.attempt.saturating_add(1);
            let outcome = LostOutcome::Requeued {
                task_id: entry.task.task_id.clone(),
                attempt: entry.task.attempt,
            };
            // Still in `active`: it stays a known id.
            self.queue.push_front(entry);
            Some(outcome)
        } else {
            let done = done(&entry.task.task_id, TaskStatus::Failed, Some(reason));
            self.retire(entry.task.task_id);
            Some(LostOutcome::Failed(done))
        }
    }

    /// The shim exits: ends the running task and every queued one, returning their
    /// shim-made `task_done`s (running first, then in queue order).
    pub fn end_all(&mut self, status: TaskStatus, error: &str) -> Vec<TaskDone> {
        let mut entries: Vec<Entry> = self.running.take().into_iter().collect();
        entries.extend(self.queue.drain(..));
        let mut dones = Vec::with_capacity(entries.len());
        for entry in entries {
            dones.push(done(&entry.task.task_id, status, Some(error)));
            self.retire(entry.task.task_id);
        }
        dones
    }

    /// Moves an id from active to the bounded finished memory.
    fn retire(&mut self, task_id: String) {
        self.active.remove(&task_id);
        if self.remember == 0 || self.finished_set.contains(&task_id) {
            return;
        }
        while self.finished.len() >= self.remember {
            match self.finished.pop_front() {
                Some(old) => {
                    self.finished_set.remove(&old);
                }
                None => break,
            }
        }
        self.finished_set.insert(task_id.clone());
        self.finished.push_back(task_id);
    }
}

/// A shim-made `task_done`.
fn done(task_id: &str, status: TaskStatus, error: Option<&str>) -> TaskDone {
    TaskDone {
        task_id: task_id.to_owned(),
        status,
        output: None,
        error: error.map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn sub(id: &str) -> SubmitTask {
        SubmitTask {
            id: 1,
            task_id: id.to_owned(),
            input: Value::from(format!("input of {id}")),
            output_schema: None,
            timeout_ms: Some(1000),
            redeliver: false,
            max_attempts: None,
        }
    }

    fn sub_redeliver(id: &str) -> SubmitTask {
        SubmitTask {
            redeliver: true,
            max_attempts: None,
            ..sub(id)
        }
    }

    #[test]
    fn submit_positions_and_full() {
        let mut q = TaskQueue::new(2, 8);
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Accepted { position: 0 });
        assert_eq!(q.submit(sub("b")), SubmitOutcome::Accepted { position: 1 });
        assert_eq!(q.submit(sub("c")), SubmitOutcome::Full);
        assert_eq!(q.queued(), 2);
        // The running task does not count against the capacity.
        assert_eq!(q.start_next().unwrap().task_id, "a");
        assert_eq!(q.submit(sub("c")), SubmitOutcome::Accepted { position: 1 });
        assert_eq!(q.submit(sub("d")), SubmitOutcome::Full);
        // A refused id was not remembered: it may be submitted again later.
        assert!(!q.is_known("d"));
    }

    #[test]
    fn zero_capacity_refuses_everything() {
        let mut q = TaskQueue::new(0, 8);
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Full);
        assert_eq!(q.start_next(), None);
    }

    #[test]
    fn duplicates_queued_running_and_finished() {
        let mut q = TaskQueue::new(4, 8);
        q.submit(sub("a"));
        q.submit(sub("b"));
        assert_eq!(q.submit(sub("b")), SubmitOutcome::Duplicate);
        q.start_next();
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Duplicate);
        assert!(q.finish("a"));
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Duplicate);
        assert_eq!(q.queued(), 1);
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let mut q = TaskQueue::new(4, 3);
        for i in 0..5 {
            let id = format!("t{i}");
            q.submit(sub(&id));
            q.start_next();
            assert!(q.finish(&id));
        }
        // t0, t1 forgotten; t2..t4 remembered.
        assert!(!q.is_known("t0"));
        assert!(!q.is_known("t1"));
        for id in ["t2", "t3", "t4"] {
            assert!(q.is_known(id), "{id}");
            assert_eq!(q.submit(sub(id)), SubmitOutcome::Duplicate);
        }
        assert_eq!(q.finished.len(), 3);
        assert_eq!(q.finished_set.len(), 3);
        assert_eq!(q.submit(sub("t0")), SubmitOutcome::Accepted { position: 0 });
    }

    #[test]
    fn remember_zero_keeps_nothing() {
        let mut q = TaskQueue::new(4, 0);
        q.submit(sub("a"));
        q.start_next();
        assert!(q.finish("a"));
        assert!(!q.is_known("a"));
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Accepted { position: 0 });
    }

    #[test]
    fn start_next_one_at_a_time_in_order() {
        let mut q = TaskQueue::new(4, 8);
        assert_eq!(q.start_next(), None);
        q.submit(sub("a"));
        q.submit(sub("b"));
        let a = q.start_next().unwrap();
        assert_eq!(
            a,
            Task {
                task_id: "a".into(),
                input: Value::from("input of a"),
                output_schema: None,
                timeout_ms: Some(1000),
                attempt: 1,
            }
        );
        assert_eq!(q.running(), Some("a"));
        assert_eq!(q.start_next(), None, "one runs already");
        assert!(q.finish("a"));
        assert_eq!(q.running(), None);
        assert_eq!(q.start_next().unwrap().task_id, "b");
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn finish_of_other_ids_changes_nothing() {
        let mut q = TaskQueue::new(4, 8);
        q.submit(sub("a"));
        q.submit(sub("b"));
        assert!(!q.finish("a"), "not running yet");
        q.start_next();
        assert!(!q.finish("b"), "queued, not running");
        assert!(!q.finish("zzz"));
        assert_eq!(q.running(), Some("a"));
        assert_eq!(q.queued(), 1);
        assert!(q.finish("a"));
        assert!(!q.finish("a"), "already finished");
    }

    #[test]
    fn cancel_queued_running_unknown() {
        let mut q = TaskQueue::new(4, 8);
        q.submit(sub("a"));
        q.submit(sub("b"));
        q.submit(sub("c"));
        q.start_next();
        assert_eq!(q.cancel("a"), CancelOutcome::Running);
        assert_eq!(q.running(), Some("a"));
        assert_eq!(
            q.cancel("b"),
            CancelOutcome::Dequeued(TaskDone {
                task_id: "b".into(),
                status: TaskStatus::Cancelled,
                output: None,
                error: None,
            })
        );
        assert_eq!(q.queued(), 1);
        // Cancelled is finished: a resubmit is a duplicate, a second cancel unknown.
        assert_eq!(q.submit(sub("b")), SubmitOutcome::Duplicate);
        assert_eq!(q.cancel("b"), CancelOutcome::Unknown);
        assert_eq!(q.cancel("nope"), CancelOutcome::Unknown);
        assert!(q.finish("a"));
        assert_eq!(q.start_next().unwrap().task_id, "c");
    }

    #[test]
    fn abandon_running() {
        let mut q = TaskQueue::new(4, 8);
        assert_eq!(q.abandon_running("cancel grace expired"), None);
        q.submit(sub("a"));
        q.submit(sub("b"));
        q.start_next();
        assert_eq!(
            q.abandon_running("cancel grace expired"),
            Some(TaskDone {
                task_id: "a".into(),
                status: TaskStatus::Cancelled,
                output: None,
                error: Some("cancel grace expired".into()),
            })
        );
        assert_eq!(q.running(), None);
        // The driver's late task_done for it is not the running task's.
        assert!(!q.finish("a"));
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Duplicate);
        assert_eq!(q.start_next().unwrap().task_id, "b");
    }

    #[test]
    fn driver_lost_fails_a_task_without_redeliver() {
        let mut q = TaskQueue::new(4, 8);
        assert_eq!(q.driver_lost("driver crashed: code 1"), None);
        q.submit(sub("a"));
        q.start_next();
        assert_eq!(
            q.driver_lost("driver crashed: code 1"),
            Some(LostOutcome::Failed(TaskDone {
                task_id: "a".into(),
                status: TaskStatus::Failed,
                output: None,
                error: Some("driver crashed: code 1".into()),
            }))
        );
        assert_eq!(q.running(), None);
        assert_eq!(q.start_next(), None);
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Duplicate);
    }

    #[test]
    fn driver_lost_requeues_at_the_front_beyond_capacity() {
        let mut q = TaskQueue::new(2, 8);
        q.submit(sub_redeliver("a"));
        q.start_next();
        q.submit(sub("b"));
        q.submit(sub("c"));
        assert_eq!(q.submit(sub("d")), SubmitOutcome::Full);
        assert_eq!(
            q.driver_lost("driver hung: signal 9"),
            Some(LostOutcome::Requeued {
                task_id: "a".into(),
                attempt: 2
            })
        );
        assert_eq!(q.queued(), 3, "requeue ignores the capacity");
        assert_eq!(q.running(), None);
        assert_eq!(q.submit(sub("a")), SubmitOutcome::Duplicate);
        let again = q.start_next().unwrap();
        assert_eq!((again.task_id.as_str(), again.attempt), ("a", 2));
        assert_eq!(again.input, Value::from("input of a"));
        // And again: attempt 3.
        assert_eq!(
            q.driver_lost("driver crashed: code 1"),
            Some(LostOutcome::Requeued {
                task_id: "a".into(),
                attempt: 3
            })
        );
        assert_eq!(q.start_next().unwrap().attempt, 3);
        assert!(q.finish("a"));
        assert_eq!(q.start_next().unwrap().task_id, "b");
    }

    /// A `redeliver` task is delivered at most `max_attempts` times (its own, else the
    /// queue's default); the last loss fails it and says so.
    #[test]
    fn redelivery_stops_at_max_attempts() {
        let lost = |q: &mut TaskQueue| {
            q.start_next();
            q.driver_lost("driver crashed: exit code 1")
        };
        let failed = |attempts: &str| {
            Some(LostOutcome::Failed(TaskDone {
                task_id: "a".into(),
                status: TaskStatus::Failed,
                output: None,
                error: Some(format!(
                    "driver crashed: exit code 1; max_attempts reached ({attempts})"
                )),
            }))
        };
        let requeued = |attempt| {
            Some(LostOutcome::Requeued {
                task_id: "a".into(),
                attempt,
            })
        };
        // The queue's default.
        let mut q = TaskQueue::new(4, 8).with_max_attempts(3);
        q.submit(sub_redeliver("a"));
        assert_eq!(lost(&mut q), requeued(2));
        assert_eq!(lost(&mut q), requeued(3));
        assert_eq!(lost(&mut q), failed("3 of 3"));
        assert_eq!(q.start_next(), None);
        assert_eq!(q.submit(sub_redeliver("a")), SubmitOutcome::Duplicate);
        // The task's own, above or below the default; 1 means no redelivery.
        for (own, requeues) in [(5u32, 4u32), (1, 0)] {
            let mut q = TaskQueue::new(4, 8).with_max_attempts(3);
            q.submit(SubmitTask {
                max_attempts: Some(own),
                ..sub_redeliver("a")
            });
            for attempt in 2..=requeues + 1 {
                assert_eq!(lost(&mut q), requeued(attempt));
            }
            assert_eq!(lost(&mut q), failed(&format!("{own} of {own}")));
        }
        // Without redeliver, max_attempts changes nothing.
        let mut q = TaskQueue::new(4, 8).with_max_attempts(3);
        q.submit(SubmitTask {
            max_attempts: Some(5),
            ..sub("a")
        });
        assert!(matches!(lost(&mut q), Some(LostOutcome::Failed(d))
            if d.error.as_deref() == Some("driver crashed: exit code 1")));
    }

    #[test]
    fn a_requeued_task_can_be_cancelled_while_waiting() {
        let mut q = TaskQueue::new(2, 8);
        q.submit(sub_redeliver("a"));
        q.start_next();
        q.driver_lost("driver crashed: code 1");
        assert!(matches!(q.cancel("a"), CancelOutcome::Dequeued(_)));
        assert_eq!(q.queued(), 0);
        assert!(q.is_known("a"));
    }
}
