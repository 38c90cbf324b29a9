//! Wire types of the client protocol (the seed contract plus jobrelay's extensions).
//!
//! Every field beyond `id`, `status` and `loc` is optional when parsing, so that a server can
//! read the records of a client that speaks only the seed contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// State of a payload on a client. Spelled on the wire exactly as the variants are named.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadStatus {
    Prepared,
    Running,
    Completed,
    Failed,
    Invalid,
    Killed,
    Cleaned,
    /// A status string this version does not know (a newer or foreign peer).
    #[serde(other)]
    Unknown,
}

impl PayloadStatus {
    /// True once the payload will never run again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            PayloadStatus::Completed
                | PayloadStatus::Failed
                | PayloadStatus::Invalid
                | PayloadStatus::Killed
                | PayloadStatus::Cleaned
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadStatus::Prepared => "Prepared",
            PayloadStatus::Running => "Running",
            PayloadStatus::Completed => "Completed",
            PayloadStatus::Failed => "Failed",
            PayloadStatus::Invalid => "Invalid",
            PayloadStatus::Killed => "Killed",
            PayloadStatus::Cleaned => "Cleaned",
            PayloadStatus::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for PayloadStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payload record returned by `POST /submit` and `GET /retrieve/{id}`.
///
/// `id`, `status`, `loc`, `pid`, `killed` and `input` are the fields deployed servers of the
/// protocol parse; the others are jobrelay's additions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PayloadRecord {
    pub id: u64,
    pub status: PayloadStatus,
    pub loc: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub killed: bool,
    /// File name to content in the seed's peers; jobrelay always sends `{}` (inputs stay on disk).
    #[serde(default)]
    pub input: BTreeMap<String, serde_json::Value>,
    /// Exit code of `run.sh`, once it has exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that ended `run.sh`, when it was killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Human explanation of a final state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Idempotency key the submission carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Identity of the client's data directory: changes only if that directory is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Unix time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Id of the Slurm job running this payload, when the client hands its payloads to Slurm
    /// (`--executor slurm`). Set once `sbatch` accepted it; a Prepared record that has one is
    /// queued in Slurm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job_id: Option<u64>,
    /// What the server asked for this payload (cores, memory, GPUs, walltime), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<crate::resources::Request>,
    /// The GPUs the client gave the payload (its `CUDA_VISIBLE_DEVICES`), while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_ids: Vec<u32>,
}

/// One state change of a payload, as delivered by the change feed `GET /events`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PayloadEvent {
    /// Position in the feed of this client process; strictly increasing, starting at 1.
    pub seq: u64,
    pub id: u64,
    pub status: PayloadStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Answer of `GET /events?after=SEQ&wait=SECONDS`.
///
/// `instance` changes whenever the client process restarts, and sequence numbers start again
/// with it. When `instance` differs from the one the caller saw, or `truncated` is true (the
/// events after `after` are no longer all kept), the caller must reconcile by asking
/// `/retrieve/{id}` for each payload it cares about, then continue from `next`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EventsPage {
    pub instance: String,
    pub node: String,
    /// Pass this as `after` in the next call.
    pub next: u64,
    pub truncated: bool,
    pub events: Vec<PayloadEvent>,
}

/// Answer of `GET /info`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClientInfo {
    pub name: String,
    pub version: String,
    /// Stable identity of the client's data directory.
    pub node: String,
    /// Identity of the running process; changes at every restart.
    pub instance: String,
    /// Payloads that may run at once.
    pub slots: usize,
    pub running: usize,
    pub prepared: usize,
    /// Extensions this client supports, e.g. `events`, `key`, `release`.
    pub features: Vec<String>,
    /// Cores, memory and GPUs payloads may share; absent from clients that do not say (the
    /// server then counts only slots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<crate::resources::Capacity>,
    /// Where its payloads run: `local` or `slurm`; absent from clients that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// How a job's `memory` is enforced, in words: `cgroup v2 memory.max`, `cgroup v1 memory
    /// controller`, `RLIMIT_AS only: <why>` (jobrelay clients; absent from others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limits: Option<String>,
}

/// Body of every error answer of the client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

/// Name of the file in a work directory that receives `run.sh`'s standard output.
pub const STDOUT_FILE: &str = ".jobrelay.stdout";
/// Name of the file in a work directory that receives `run.sh`'s standard error.
pub const STDERR_FILE: &str = ".jobrelay.stderr";
/// The script every job must contain.
pub const RUN_SCRIPT: &str = "run.sh";

/// Header of a ZIP answer of `/retrieve` and `/retrieve_partial` carrying the payload's
/// idempotency key (feature `result_key`), so a server knows whose run the ZIP is.
pub const RESULT_KEY_HEADER: &str = "x-jobrelay-key";
/// Header of the same answers carrying the client's node.
pub const RESULT_NODE_HEADER: &str = "x-jobrelay-node";
