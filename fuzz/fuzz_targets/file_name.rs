#![no_main]
//! Any name that passes the file-name rules stays a relative path of normal components, and a
//! set of names never admits a repeat or a file/directory clash.
use jobrelay_common::filename::{validate, NameSet};
use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut set = NameSet::default();
    for name in text.split('\n') {
        if let Ok(path) = validate(name) {
            assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
            assert!(Path::new("/w").join(&path).starts_with("/w"));
        }
        let _ = set.admit(name);
    }
});
