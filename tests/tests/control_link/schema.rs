//! Task output schemas (control-link's `schema` feature): the echo drivers (Rust and Python)
//! return `input.output` as the output, so one task matches its schema and one does not.

use anyhow::{bail, ensure, Result};
use control_link::protocol::message::Event;
use control_link::{connect, TaskOutcome, TaskSpec};
use rmpv::Value;

use super::{read_until, runtime, within, LinkShim};
use crate::supervisor::Driver;
use crate::support::{in_both_modes, Mode, PATIENCE};

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// `{"answer": integer >= 0, "steps": [string]}`, nothing else.
fn schema() -> Value {
    map(vec![
        (
            "$schema",
            "https://json-schema.org/draft/2020-12/schema".into(),
        ),
        ("type", "object".into()),
        ("required", Value::Array(vec!["answer".into()])),
        (
            "properties",
            map(vec![
                (
                    "answer",
                    map(vec![("type", "integer".into()), ("minimum", 0.into())]),
                ),
                (
                    "steps",
                    map(vec![
                        ("type", "array".into()),
                        ("items", map(vec![("type", "string".into())])),
                    ]),
                ),
            ]),
        ),
        ("additionalProperties", false.into()),
    ])
}

fn task(id: &str, output: Value) -> TaskSpec {
    TaskSpec::new(
        id,
        map(vec![("text", "working".into()), ("output", output)]),
    )
    .output_schema(schema())
}

fn valid_and_invalid(mode: Mode, driver: Driver) -> Result<()> {
    let shim = LinkShim::start_driver(mode, driver, &[])?;
    runtime()?.block_on(async {
        let mut tries = 0;
        let client = loop {
            match within(PATIENCE, "connect", connect(&shim.addr, None)).await? {
                Ok(c) => break c,
                // The socket exists a moment before the shim listens on it.
                Err(e) if tries < 100 => {
                    tries += 1;
                    eprintln!("connect: {e}; again");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut events = client.events()?;
        let good = map(vec![
            ("answer", 4.into()),
            ("steps", Value::Array(vec!["2+2".into()])),
        ]);
        let bad = map(vec![
            ("answer", "four".into()),
            ("steps", Value::Array(vec![2.into()])),
            ("confidence", 0.9.into()),
        ]);
        client.submit_task(task("good", good.clone())).await?;
        client.submit_task(task("bad", bad.clone())).await?;
        // A task without a schema is not checked.
        client
            .submit_task(TaskSpec::new(
                "free",
                map(vec![("output", "anything".into())]),
            ))
            .await?;
        let mut outcomes = std::collections::BTreeMap::new();
        while outcomes.len() < 3 {
            let got =
                read_until(&mut events, PATIENCE, |e| matches!(e, Event::TaskDone(_))).await?;
            let Some((_, Event::TaskDone(done))) = got.last() else {
                bail!("no task_done")
            };
            outcomes.insert(done.task_id.clone(), client.task_outcome(done));
        }
        ensure!(
            outcomes.get("good") == Some(&TaskOutcome::Succeeded { output: Some(good) }),
            "{outcomes:?}"
        );
        ensure!(
            outcomes.get("free")
                == Some(&TaskOutcome::Succeeded {
                    output: Some("anything".into())
                }),
            "{outcomes:?}"
        );
        let Some(TaskOutcome::SchemaInvalid { output, errors }) = outcomes.get("bad") else {
            bail!("{outcomes:?}")
        };
        ensure!(output.as_ref() == Some(&bad), "{output:?}");
        let paths: Vec<&str> = errors.iter().map(|e| e.instance_path.as_str()).collect();
        ensure!(paths.contains(&"/answer"), "{errors:?}");
        ensure!(paths.contains(&"/steps/0"), "{errors:?}");
        ensure!(
            errors.iter().any(|e| e.message.contains("confidence")),
            "no error names the extra property: {errors:?}"
        );
        ensure!(errors.len() == 3, "{errors:?}");
        eprintln!(
            "schema errors ({driver:?}): {}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
        client.close().await;
        Ok(())
    })
}

in_both_modes! {
    fn rust_driver_valid_and_invalid_output(mode: Mode) -> Result<()> {
        valid_and_invalid(mode, Driver::Rust)
    }
}

#[test]
fn python_driver_valid_and_invalid_output() -> Result<()> {
    if !crate::drivers::Driver::python_available() {
        return crate::support::skip("python", "AGENT_SHIM_PYTHON not set", module_path!());
    }
    valid_and_invalid(Mode::Subreaper, Driver::Python)
}
