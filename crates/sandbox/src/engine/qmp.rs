//! A minimal QMP client (QEMU's JSON monitor) over a socket: commands in, the matching
//! `return`/`error` out, asynchronous events skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub fn connect(stream: UnixStream, timeout: Duration) -> Result<Qmp, String> {
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QEMU closed its monitor".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))
    }

    /// Runs one command; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut cmd = json!({ "execute": command, "arguments": arguments }).to_string();
        cmd.push('\n');
        self.writer.write_all(cmd.as_bytes()).map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(format!("{command}: {}", err.get("desc").and_then(Value::as_str).unwrap_or("error")));
            }
            // An event ({"event": ...}): not the answer.
        }
    }

    /// Polls `query-migrate` until the migration completed (or failed).
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(format!("the migration failed: {why}"));
                }
                _ if Instant::now() > deadline => return Err("the migration did not finish in time".into()),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}
