#![no_main]
//! Any request body: the upload is refused with a 4xx and leaves nothing, or stored whole
//! within its staging directory.
use axum::extract::{FromRequest, Multipart, Request};
use jobrelay_common::upload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let request = Request::builder()
            .method("POST")
            .header("content-type", "multipart/form-data; boundary=b")
            .body(axum::body::Body::from(data.to_vec()))
            .unwrap();
        let multipart = Multipart::from_request(request, &()).await.unwrap();
        match upload::receive(multipart, root.path(), 1 << 20).await {
            Ok(received) => {
                for name in &received.files {
                    assert!(received.staging.path().join(name).starts_with(received.staging.path()));
                }
            }
            Err(e) => assert!(e.status().is_client_error(), "{e}"),
        }
    });
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
});
