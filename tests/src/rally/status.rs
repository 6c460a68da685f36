//! The parts of `rally status --json` and `rally peers --json` the tests rely on.

use serde::Deserialize;
use serde_json::Value;

/// The `control` object of `rally status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlStatus {
    pub connected: bool,
    /// `quic` or `tcp` while connected.
    #[serde(default)]
    pub transport: Option<String>,
}

/// `rally status --json` (fields relied on by the tests; more are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub name: String,
    pub peer_id: String,
    #[serde(default)]
    pub virtual_ip: Option<String>,
    pub control: ControlStatus,
    #[serde(default)]
    pub parties: Vec<Value>,
}

impl Status {
    /// Names of the parties, whether listed as strings or as objects with a `name`.
    pub fn party_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.parties.iter().filter_map(party_name).collect();
        names.sort();
        names
    }
}

/// A party's name from a `parties` entry (`"lan"` or `{"name": "lan", …}`).
fn party_name(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("name").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// One element of `rally peers --json` (fields relied on by the tests; more are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct Peer {
    pub peer_id: String,
    pub name: String,
    pub virtual_ip: String,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub relay: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub latency_ms: Option<f64>,
}
