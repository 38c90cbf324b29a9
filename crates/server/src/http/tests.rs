//! The blocking rule of the handlers, observed: a store that does not answer (its lock held,
//! as a long query or a stalled disk holds it) must not stall the requests that need no store.

use std::time::{Duration, Instant};

use crate::config::{ServerConfig, ServiceConfig};

/// How long the store is held; a ping stalled behind it takes about this long.
const HELD: Duration = Duration::from_secs(4);

#[test]
fn a_held_store_does_not_stall_requests_that_need_none() {
    // Two async workers, as on a small machine: a handler that waited on the store on one of
    // them (instead of the blocking pool) would take a worker per request.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A service without clients: no probe or collector loop that could touch the store.
    let mut config = ServerConfig::new(
        dir.path().to_path_buf(),
        [("example".to_owned(), ServiceConfig::new(Vec::new()))].into(),
    );
    config.max_age = Duration::from_secs(864_000);
    let server = runtime.block_on(crate::start(config)).unwrap();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();

    std::thread::scope(|scope| {
        let (held, release) = std::sync::mpsc::channel::<()>();
        let shared = server.shared.clone();
        scope.spawn(move || {
            let _guard = shared.store.hold_for_test();
            held.send(()).unwrap();
            std::thread::sleep(HELD);
        });
        release.recv().unwrap();
        // Requests that wait on the store: more than there are workers.
        let waiting: Vec<_> = (0..8)
            .map(|i| {
                let (http, base) = (http.clone(), base.clone());
                let url = match i % 3 {
                    0 => format!("{base}/jobs"),
                    1 => format!("{base}/jobs/1"),
                    _ => format!("{base}/jobs/1/events"),
                };
                runtime.spawn(async move { http.get(url).send().await.map(|r| r.status()) })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // The ping needs no store: it answers at once while those wait.
        let asked = Instant::now();
        let ping = runtime
            .block_on(http.get(format!("{base}/")).send())
            .unwrap();
        let took = asked.elapsed();
        assert!(ping.status().is_success());
        assert!(
            took < HELD / 2,
            "GET / took {took:?} while the store was held: a handler blocks an async worker"
        );
        // Once the store is free, the waiting requests are answered as usual.
        for request in waiting {
            let status = runtime.block_on(request).unwrap().unwrap();
            assert!(status == 200 || status == 404, "{status}");
        }
    });
    server.shutdown();
}
