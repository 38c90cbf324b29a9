//! What this client has (cores, memory, GPUs: detected, or given by flags) and what each
//! payload is given: its request as the server sent it with `/submit`, the GPU ids it is
//! assigned (distinct for payloads running at once), and the environment that tells the
//! payload (`JOBRELAY_CORES`, `JOBRELAY_MEMORY_MB`, `JOBRELAY_GPUS`, `CUDA_VISIBLE_DEVICES`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use jobrelay_common::resources::{
    parse_count, parse_memory_mb, parse_seconds, Request, CORES_FIELD, GPUS_FIELD, MEMORY_FIELD,
    WALLTIME_FIELD,
};
use tokio::sync::Notify;

/// Cores this machine gives us: std's count honours the affinity mask and a cgroup v2
/// `cpu.max` quota (rounded up).
pub fn detected_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Memory this machine gives us, MiB: `MemTotal` of `/proc/meminfo`, or less when our
/// cgroup v2 has a lower `memory.max`.
pub fn detected_memory_mb() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total_mb(&text))
        .unwrap_or(0);
    match cgroup_memory_max_mb() {
        Some(limit) if total == 0 || limit < total => limit,
        _ => total,
    }
}

fn mem_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn cgroup_memory_max_mb() -> Option<u64> {
    // Where the cgroup2 tree is mounted (not always /sys/fs/cgroup: /sys/fs/cgroup/unified on
    // a hybrid host) and our place in it, as the payloads' cgroups find them.
    let file = crate::cgroup::own_cgroup_dir().ok()?.join("memory.max");
    let text = std::fs::read_to_string(file).ok()?;
    text.trim().parse::<u64>().ok().map(|bytes| bytes >> 20)
}

/// The request the server sent with `/submit` (`cores`, `memory` MiB, `gpus`, `walltime`
/// seconds; the readable forms are taken too), `None` when it sent none (a server that does
/// not know resources, or a job that asked for nothing).
pub fn request_from_fields(fields: &BTreeMap<String, String>) -> Result<Option<Request>, String> {
    let field = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    if [CORES_FIELD, MEMORY_FIELD, GPUS_FIELD, WALLTIME_FIELD]
        .iter()
        .all(|name| field(name).is_none())
    {
        return Ok(None);
    }
    Ok(Some(Request {
        cores: field(CORES_FIELD)
            .map(|t| parse_count("cores", t))
            .transpose()?
            .unwrap_or(1)
            .max(1),
        memory_mb: field(MEMORY_FIELD).map(parse_memory_mb).transpose()?,
        gpus: field(GPUS_FIELD)
            .map(|t| parse_count("gpus", t))
            .transpose()?
            .unwrap_or(0),
        walltime_s: field(WALLTIME_FIELD)
            .map(parse_seconds)
            .transpose()?
            .filter(|s| *s > 0),
    }))
}

/// What programs print when an allocation fails, as the tail of a payload's stderr shows it
/// under RLIMIT_AS (bash, coreutils, Python, C++, Rust, glibc's `strerror(ENOMEM)`).
const OUT_OF_MEMORY_SIGNS: [&str; 6] = [
    "cannot allocate",
    "memory exhausted",
    "memoryerror",
    "bad_alloc",
    "memory allocation of",
    "out of memory",
];

/// Whether the end of the payload's stderr (its last 8 KiB) says an allocation failed: with
/// a memory limit in force, that limit ended it. The file is opened as every file of a work
/// directory is ([`jobrelay_common::workfile`]): a link or FIFO in its place reads as no.
pub fn stderr_says_out_of_memory(dir: &std::path::Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let tail = || -> Option<String> {
        let root = jobrelay_common::workfile::open_dir(dir).ok()?;
        let name = std::path::Path::new(jobrelay_common::protocol::STDERR_FILE);
        let mut file = jobrelay_common::workfile::open_regular(&root, name).ok()??;
        let len = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
        let mut bytes = Vec::new();
        file.take(8192).read_to_end(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).to_ascii_lowercase())
    };
    tail().is_some_and(|text| OUT_OF_MEMORY_SIGNS.iter().any(|sign| text.contains(sign)))
}

/// What a payload was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allotment {
    pub cores: u32,
    pub memory_mb: Option<u64>,
    pub gpu_ids: Vec<u32>,
}

impl Allotment {
    /// The payload's environment: what it may use. `JOBRELAY_MEMORY_MB` only with a memory
    /// request; `CUDA_VISIBLE_DEVICES` always (empty without GPUs, so a payload does not see
    /// GPUs it was not given).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("JOBRELAY_CORES".to_owned(), self.cores.to_string()),
            ("JOBRELAY_GPUS".to_owned(), self.gpu_ids.len().to_string()),
            (
                "CUDA_VISIBLE_DEVICES".to_owned(),
                self.gpu_ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        if let Some(mb) = self.memory_mb {
            env.push(("JOBRELAY_MEMORY_MB".to_owned(), mb.to_string()));
        }
        env
    }
}

/// The client's GPUs and which are free. A payload takes its GPUs before it starts and
/// gives them back when its task ends, so payloads running at once never share one.
pub struct GpuPool {
    free: Mutex<Vec<u32>>,
    total: usize,
    freed: Notify,
}

/// GPUs taken by one payload, given back on drop.
pub struct GpuLease {
    pool: Arc<GpuPool>,
    ids: Vec<u32>,
}

impl GpuLease {
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut free = self.pool.free.lock().unwrap();
        free.append(&mut self.ids);
        free.sort_unstable();
        drop(free);
        self.pool.freed.notify_waiters();
    }
}

impl GpuPool {
    pub fn new(ids: Vec<u32>) -> Self {
        GpuPool {
            total: ids.len(),
            free: Mutex::new(ids),
            freed: Notify::new(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Takes back the GPUs `ids` that a payload followed again after a restart still holds,
    /// so that no new payload is given them while it runs. Ids this client no longer has, or
    /// that are not free, are left out of the lease (only what it took is given back).
    pub fn claim(self: &Arc<Self>, ids: &[u32]) -> GpuLease {
        let mut free = self.free.lock().unwrap();
        let mut taken = Vec::new();
        for id in ids {
            if let Some(at) = free.iter().position(|f| f == id) {
                taken.push(free.remove(at));
            }
        }
        GpuLease {
            pool: self.clone(),
            ids: taken,
        }
    }

    /// Takes `n` GPUs (the lowest free ids), waiting until that many are free; `Err` when
    /// the client has fewer than `n` in all.
    pub async fn take(self: &Arc<Self>, n: usize) -> Result<GpuLease, String> {
        if n > self.total {
            return Err(format!("asks for {n} GPUs; this client has {}", self.total));
        }
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut free = self.free.lock().unwrap();
                if free.len() >= n {
                    let ids = free.drain(..n).collect();
                    return Ok(GpuLease {
                        pool: self.clone(),
                        ids,
                    });
                }
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload followed again after a restart keeps its GPUs: a new one is given the others,
    /// and they come back only when its lease ends.
    #[tokio::test]
    async fn gpus_of_a_payload_followed_again_are_not_given_out_twice() {
        let pool = Arc::new(GpuPool::new(vec![0, 1]));
        let adopted = pool.claim(&[0, 7]);
        assert_eq!(
            adopted.ids(),
            [0],
            "an id the client does not have is left out"
        );
        let next = pool.take(1).await.unwrap();
        assert_eq!(next.ids(), [1]);
        drop(adopted);
        assert_eq!(pool.take(1).await.unwrap().ids(), [0]);
    }

    #[test]
    fn the_environment_says_what_was_given() {
        let a = Allotment {
            cores: 4,
            memory_mb: Some(2048),
            gpu_ids: vec![1, 3],
        };
        let env: BTreeMap<_, _> = a.env().into_iter().collect();
        assert_eq!(env["JOBRELAY_CORES"], "4");
        assert_eq!(env["JOBRELAY_MEMORY_MB"], "2048");
        assert_eq!(env["JOBRELAY_GPUS"], "2");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "1,3");
    }

    #[test]
    fn fields_become_a_request_only_when_given() {
        let fields = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(request_from_fields(&fields(&[("key", "k")])), Ok(None));
        assert_eq!(
            request_from_fields(&fields(&[("cores", "4"), ("walltime", "90m")])),
            Ok(Some(Request {
                cores: 4,
                memory_mb: None,
                gpus: 0,
                walltime_s: Some(5400),
            }))
        );
        assert!(request_from_fields(&fields(&[("memory", "lots")])).is_err());
    }

    #[test]
    fn an_allocation_failure_is_read_from_the_end_of_stderr() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!stderr_says_out_of_memory(dir.path()), "no stderr yet");
        let stderr = dir.path().join(jobrelay_common::protocol::STDERR_FILE);
        std::fs::write(&stderr, "Traceback ...\nValueError: bad input\n").unwrap();
        assert!(!stderr_says_out_of_memory(dir.path()));
        let mut text = "x".repeat(20_000);
        text.push_str("\nbash: xrealloc: cannot allocate 205172736 bytes\n");
        std::fs::write(&stderr, text).unwrap();
        assert!(stderr_says_out_of_memory(dir.path()));
        std::fs::write(&stderr, "MemoryError\n").unwrap();
        assert!(stderr_says_out_of_memory(dir.path()));
    }

    #[test]
    fn meminfo_is_read_in_mib() {
        assert_eq!(
            mem_total_mb("MemTotal:       16314480 kB\nMemFree: 1 kB\n"),
            Some(15932)
        );
    }

    #[tokio::test]
    async fn concurrent_payloads_get_distinct_gpus_and_wait_for_them() {
        let pool = Arc::new(GpuPool::new(vec![0, 1]));
        let a = pool.take(1).await.unwrap();
        let b = pool.take(1).await.unwrap();
        assert_ne!(a.ids(), b.ids());
        assert!(pool.take(3).await.is_err(), "more than the client has");
        let waiting = pool.take(1);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "none free: it waits"
        );
        let freed = a.ids().to_vec();
        drop(a);
        let c = waiting.await.unwrap();
        assert_eq!(c.ids(), freed);
    }
}
