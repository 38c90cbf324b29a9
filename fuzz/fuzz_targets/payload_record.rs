#![no_main]
//! Any bytes as a payload record file: the client's store opens without panicking.
use jobrelay_client::store::PayloadStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let payloads = dir.path().join("payloads");
    std::fs::create_dir_all(&payloads).unwrap();
    std::fs::write(payloads.join("1.json"), data).unwrap();
    let _ = PayloadStore::open(dir.path());
});
