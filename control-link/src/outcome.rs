//! [`TaskOutcome`]: how a task ended, with its output checked against the task's
//! `output_schema` (feature `schema`).
//!
//! The shim passes `output_schema` and `output` through untouched; the check happens here, on
//! the control plane's side, so the shim's static binary does not carry a JSON Schema
//! validator. The schema and the output are MessagePack values; they are converted to JSON
//! (maps with string keys; no `bin`, no extension types, no NaN) and checked with the
//! [`jsonschema`] crate, which implements JSON Schema drafts 4, 6, 7, 2019-09 and 2020-12 (the
//! draft is taken from `$schema`, 2020-12 without one). References to other documents are not
//! fetched (no network, no files): a schema must be self-contained (`$ref` within it works).

use std::collections::{HashMap, VecDeque};

use driver_protocol::message::{TaskDone, TaskStatus};
use rmpv::Value;

/// Output schemas remembered per task id by a client, for [`Client::task_outcome`](crate::Client::task_outcome).
const REMEMBERED_SCHEMAS: usize = 4096;

/// How a task ended.
///
/// ```
/// use control_link::protocol::message::{TaskDone, TaskStatus};
/// use control_link::TaskOutcome;
///
/// let schema = rmpv::Value::Map(vec![("type".into(), "integer".into())]);
/// let done = TaskDone {
///     task_id: "t1".into(),
///     status: TaskStatus::Succeeded,
///     output: Some("four".into()),
///     error: None,
/// };
/// match TaskOutcome::check(&done, Some(&schema)) {
///     TaskOutcome::SchemaInvalid { errors, .. } => {
///         assert_eq!(errors[0].instance_path, "");
///         assert!(errors[0].message.contains("integer"), "{}", errors[0].message);
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    /// The task succeeded, and its output matches its schema (or it has none).
    Succeeded {
        /// The output, if any.
        output: Option<Value>,
    },
    /// The task succeeded by the driver's account, but its output does not match the
    /// task's `output_schema` (an absent output is checked as `null`), or the schema itself
    /// cannot be used.
    SchemaInvalid {
        /// The output as the driver sent it.
        output: Option<Value>,
        /// Why: every validation error, in the validator's order.
        errors: Vec<SchemaError>,
    },
    /// The task failed (its output, if any, is not checked).
    Failed {
        /// Why, as the driver or the shim said.
        error: Option<String>,
        /// The output, if any.
        output: Option<Value>,
    },
    /// The task was cancelled.
    Cancelled {
        /// Why, as the driver or the shim said.
        error: Option<String>,
    },
}

/// One reason an output does not match its schema.
///
/// ```
/// let e = control_link::SchemaError { instance_path: "/answer".into(), message: "\"x\" is not of type \"integer\"".into() };
/// assert_eq!(e.to_string(), "/answer: \"x\" is not of type \"integer\"");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// Where in the output, as a JSON Pointer (`""` is the whole output, `/items/0` the
    /// first element of `items`).
    pub instance_path: String,
    /// What is wrong, as the validator words it.
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.instance_path.is_empty() {
            write!(f, "(output): {}", self.message)
        } else {
            write!(f, "{}: {}", self.instance_path, self.message)
        }
    }
}

impl TaskOutcome {
    /// The outcome of `done`, checked against `schema` (the task's `output_schema`) when the
    /// task succeeded. A stateless control plane that stored the schema with the task calls
    /// this; [`Client::task_outcome`](crate::Client::task_outcome) uses the schema the client
    /// itself submitted.
    ///
    /// ```
    /// use control_link::protocol::message::{TaskDone, TaskStatus};
    /// use control_link::TaskOutcome;
    ///
    /// let schema = rmpv::Value::Map(vec![
    ///     ("type".into(), "object".into()),
    ///     ("required".into(), rmpv::Value::Array(vec!["answer".into()])),
    /// ]);
    /// let output = rmpv::Value::Map(vec![("answer".into(), 4.into())]);
    /// let done = TaskDone { task_id: "t".into(), status: TaskStatus::Succeeded, output: Some(output), error: None };
    /// assert!(matches!(TaskOutcome::check(&done, Some(&schema)), TaskOutcome::Succeeded { .. }));
    /// ```
    pub fn check(done: &TaskDone, schema: Option<&Value>) -> TaskOutcome {
        match done.status {
            TaskStatus::Cancelled => TaskOutcome::Cancelled {
                error: done.error.clone(),
            },
            TaskStatus::Failed => TaskOutcome::Failed {
                error: done.error.clone(),
                output: done.output.clone(),
            },
            TaskStatus::Succeeded => match schema.map(|s| validate(s, done.output.as_ref())) {
                Some(Err(errors)) => TaskOutcome::SchemaInvalid {
                    output: done.output.clone(),
                    errors,
                },
                None | Some(Ok(())) => TaskOutcome::Succeeded {
                    output: done.output.clone(),
                },
            },
        }
    }

    /// Whether the task succeeded with an output that matches its schema.
    ///
    /// ```
    /// assert!(control_link::TaskOutcome::Succeeded { output: None }.is_success());
    /// ```
    pub fn is_success(&self) -> bool {
        matches!(self, TaskOutcome::Succeeded { .. })
    }
}

/// Checks `output` (absent = `null`) against `schema`.
fn validate(schema: &Value, output: Option<&Value>) -> Result<(), Vec<SchemaError>> {
    let whole = |message: String| {
        vec![SchemaError {
            instance_path: String::new(),
            message,
        }]
    };
    let schema = to_json(schema).map_err(|e| whole(format!("output_schema: {e}")))?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| whole(format!("output_schema is not a valid JSON Schema: {e}")))?;
    let output = match output {
        Some(v) => to_json(v).map_err(|e| whole(format!("the output has no JSON form: {e}")))?,
        None => serde_json::Value::Null,
    };
    let errors: Vec<SchemaError> = validator
        .iter_errors(&output)
        .map(|e| SchemaError {
            instance_path: e.instance_path().as_str().to_owned(),
            message: e.to_string(),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The JSON form of a MessagePack value, if it has one.
fn to_json(v: &Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match v {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => J::from(u),
            (None, Some(s)) => J::from(s),
            (None, None) => return Err(format!("integer {i} out of range")),
        },
        Value::F32(f) => float(f64::from(*f))?,
        Value::F64(f) => float(*f)?,
        Value::String(s) => match s.as_str() {
            Some(s) => J::String(s.to_owned()),
            None => return Err("a string that is not UTF-8".to_owned()),
        },
        Value::Binary(_) => return Err("binary data (bin)".to_owned()),
        Value::Ext(t, _) => return Err(format!("an extension value (type {t})")),
        Value::Array(a) => J::Array(a.iter().map(to_json).collect::<Result<_, _>>()?),
        Value::Map(m) => {
            let mut out = serde_json::Map::with_capacity(m.len());
            for (k, v) in m {
                let Some(k) = k.as_str() else {
                    return Err(format!("a map key that is not a string: {k}"));
                };
                out.insert(k.to_owned(), to_json(v)?);
            }
            J::Object(out)
        }
    })
}

fn float(f: f64) -> Result<serde_json::Value, String> {
    serde_json::Number::from_f64(f)
        .map(serde_json::Value::Number)
        .ok_or_else(|| format!("the number {f} (JSON has no NaN or infinity)"))
}

/// The schemas of the tasks a client submitted, bounded (the oldest is forgotten first).
#[derive(Debug, Default)]
pub(crate) struct SchemaMemo {
    schemas: HashMap<String, Value>,
    order: VecDeque<String>,
}

impl SchemaMemo {
    pub(crate) fn remember(&mut self, task_id: &str, schema: Value) {
        if self.schemas.insert(task_id.to_owned(), schema).is_none() {
            self.order.push_back(task_id.to_owned());
        }
        while self.order.len() > REMEMBERED_SCHEMAS {
            if let Some(old) = self.order.pop_front() {
                self.schemas.remove(&old);
            }
        }
    }

    pub(crate) fn get(&self, task_id: &str) -> Option<&Value> {
        self.schemas.get(task_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    fn done(status: TaskStatus, output: Option<Value>) -> TaskDone {
        TaskDone {
            task_id: "t".into(),
            status,
            output,
            error: None,
        }
    }

    fn answer_schema() -> Value {
        map(vec![
            ("type", "object".into()),
            ("required", Value::Array(vec!["answer".into()])),
            (
                "properties",
                map(vec![(
                    "answer",
                    map(vec![("type", "integer".into()), ("minimum", 0.into())]),
                )]),
            ),
            ("additionalProperties", false.into()),
        ])
    }

    #[test]
    fn valid_output_passes() {
        let out = map(vec![("answer", 4.into())]);
        let o = TaskOutcome::check(
            &done(TaskStatus::Succeeded, Some(out)),
            Some(&answer_schema()),
        );
        assert!(o.is_success(), "{o:?}");
        // No schema: nothing to check.
        let o = TaskOutcome::check(&done(TaskStatus::Succeeded, Some("x".into())), None);
        assert!(o.is_success());
    }

    #[test]
    fn invalid_output_reports_every_error_with_its_path() {
        let out = map(vec![("answer", (-1).into()), ("extra", true.into())]);
        let o = TaskOutcome::check(
            &done(TaskStatus::Succeeded, Some(out)),
            Some(&answer_schema()),
        );
        let TaskOutcome::SchemaInvalid { errors, .. } = o else {
            panic!("{o:?}")
        };
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| e.instance_path == "/answer" && e.message.contains("minimum")));
        assert!(
            errors.iter().any(|e| e.message.contains("extra")),
            "{errors:?}"
        );
        // An absent output is null.
        let o = TaskOutcome::check(&done(TaskStatus::Succeeded, None), Some(&answer_schema()));
        assert!(matches!(o, TaskOutcome::SchemaInvalid { .. }), "{o:?}");
    }

    #[test]
    fn failed_and_cancelled_tasks_are_not_checked() {
        let o = TaskOutcome::check(&done(TaskStatus::Failed, None), Some(&answer_schema()));
        assert!(matches!(o, TaskOutcome::Failed { .. }));
        let o = TaskOutcome::check(&done(TaskStatus::Cancelled, None), Some(&answer_schema()));
        assert!(matches!(o, TaskOutcome::Cancelled { .. }));
    }

    #[test]
    fn unusable_schemas_and_outputs_are_schema_failures() {
        let bad_schema = map(vec![("type", 17.into())]);
        let o = TaskOutcome::check(
            &done(TaskStatus::Succeeded, Some(1.into())),
            Some(&bad_schema),
        );
        let TaskOutcome::SchemaInvalid { errors, .. } = o else {
            panic!("{o:?}")
        };
        assert!(
            errors[0].message.contains("not a valid JSON Schema"),
            "{errors:?}"
        );
        let bin = Value::Binary(vec![1, 2]);
        let any = map(vec![]);
        let o = TaskOutcome::check(&done(TaskStatus::Succeeded, Some(bin)), Some(&any));
        assert!(matches!(o, TaskOutcome::SchemaInvalid { .. }), "{o:?}");
        let nan = Value::F64(f64::NAN);
        let o = TaskOutcome::check(&done(TaskStatus::Succeeded, Some(nan)), Some(&any));
        assert!(matches!(o, TaskOutcome::SchemaInvalid { .. }), "{o:?}");
    }

    #[test]
    fn local_refs_and_drafts() {
        // 2020-12 `$defs` with a local `$ref`, and draft 7 `definitions`.
        let s = map(vec![
            (
                "$defs",
                map(vec![(
                    "pos",
                    map(vec![
                        ("type", "integer".into()),
                        ("exclusiveMinimum", 0.into()),
                    ]),
                )]),
            ),
            ("type", "array".into()),
            ("items", map(vec![("$ref", "#/$defs/pos".into())])),
        ]);
        let ok = Value::Array(vec![1.into(), 2.into()]);
        let bad = Value::Array(vec![1.into(), 0.into()]);
        assert!(TaskOutcome::check(&done(TaskStatus::Succeeded, Some(ok)), Some(&s)).is_success());
        let o = TaskOutcome::check(&done(TaskStatus::Succeeded, Some(bad)), Some(&s));
        let TaskOutcome::SchemaInvalid { errors, .. } = o else {
            panic!("{o:?}")
        };
        assert_eq!(errors[0].instance_path, "/1");
        let d7 = map(vec![
            ("$schema", "http://json-schema.org/draft-07/schema#".into()),
            (
                "definitions",
                map(vec![("s", map(vec![("type", "string".into())]))]),
            ),
            ("$ref", "#/definitions/s".into()),
        ]);
        assert!(
            TaskOutcome::check(&done(TaskStatus::Succeeded, Some("x".into())), Some(&d7))
                .is_success()
        );
        assert!(
            !TaskOutcome::check(&done(TaskStatus::Succeeded, Some(3.into())), Some(&d7))
                .is_success()
        );
    }

    #[test]
    fn the_memo_is_bounded() {
        let mut m = SchemaMemo::default();
        for i in 0..REMEMBERED_SCHEMAS + 10 {
            m.remember(&format!("t{i}"), Value::Nil);
        }
        assert!(m.get("t0").is_none());
        assert!(m.get(&format!("t{}", REMEMBERED_SCHEMAS + 9)).is_some());
        assert_eq!(m.schemas.len(), REMEMBERED_SCHEMAS);
    }
}
