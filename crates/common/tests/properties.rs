//! Property tests of the hostile-input surface, run by `cargo test` (the cargo-fuzz targets in
//! `fuzz/` explore the same functions without a time limit). A small deterministic generator
//! instead of a property-testing crate: no new dependency, and a failure prints its seed.
//! `JOBRELAY_PROPTEST_CASES` sets the number of cases (default 2,000 per property);
//! `JOBRELAY_PROPTEST_SEED` replays one seed.

use std::path::{Component, Path};

use axum::extract::{FromRequest, Multipart, Request};
use jobrelay_common::filename::{validate, NameSet, MAX_NAME_BYTES};
use jobrelay_common::upload;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Bytes biased towards what breaks parsers: separators, dots, NUL, controls, quotes,
    /// CR/LF, high bytes, and pieces of multipart framing.
    fn nasty_bytes(&mut self, max: usize) -> Vec<u8> {
        const PIECES: &[&[u8]] = &[
            b"/",
            b"..",
            b".",
            b"\0",
            b"\\",
            b"\r\n",
            b"\"",
            b"\xff",
            b"\xc3\xa9",
            b"\x1b",
            b"a",
            b"run.sh",
            b"--",
            b"; name=",
            b"filename=",
            b"%2e",
            b" ",
            b"\x7f",
            b"\xed\xa0\x80",
        ];
        let mut out = Vec::new();
        let len = self.below(max + 1);
        while out.len() < len {
            if self.below(3) == 0 {
                out.push(self.next() as u8);
            } else {
                out.extend_from_slice(PIECES[self.below(PIECES.len())]);
            }
        }
        out
    }
}

fn cases() -> u64 {
    std::env::var("JOBRELAY_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn seeds() -> Vec<u64> {
    match std::env::var("JOBRELAY_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (0..cases()).collect(),
    }
}

/// An accepted name is relative, has only normal components, no NUL, backslash or control
/// character, fits the limits, and joined to a root stays below it.
fn check_accepted(name: &str, path: &Path) {
    assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES, "{name:?}");
    assert!(!name.contains('\0') && !name.contains('\\'), "{name:?}");
    assert!(!name.chars().any(char::is_control), "{name:?}");
    assert!(path.is_relative(), "{name:?}");
    for component in path.components() {
        assert!(
            matches!(component, Component::Normal(_)),
            "{name:?}: {component:?}"
        );
    }
    let root = Path::new("/work/dir");
    assert!(root.join(path).starts_with(root), "{name:?}");
}

#[test]
fn file_names_that_pass_cannot_escape_or_confuse() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let bytes = rng.nasty_bytes(300);
        let Ok(name) = std::str::from_utf8(&bytes) else {
            continue; // names reach validate as &str; invalid UTF-8 is refused before
        };
        if let Ok(path) = validate(name) {
            check_accepted(name, &path);
        }
    }
}

#[test]
fn names_arriving_as_field_names_pass_the_same_rules() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let field = rng.nasty_bytes(60);
        let Ok(field) = std::str::from_utf8(&field) else {
            continue;
        };
        // Half the cases end the field with the filename, so the field name is the one used.
        let file_name = if rng.below(2) == 0 {
            field.rsplit('/').next().unwrap_or_default().to_owned()
        } else {
            String::from_utf8_lossy(&rng.nasty_bytes(20)).into_owned()
        };
        let name = upload::stored_name(field, &file_name);
        assert!(
            name == field || name == file_name,
            "seed {seed}: {name:?} from {field:?} / {file_name:?}"
        );
        if let Ok(path) = NameSet::default().admit(name) {
            check_accepted(name, &path);
        }
    }
}

#[test]
fn a_name_set_never_admits_a_repeat_or_a_file_directory_clash() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let mut set = NameSet::default();
        let mut admitted: Vec<String> = Vec::new();
        for _ in 0..rng.below(12) {
            // Short names from a tiny alphabet, so that collisions are common.
            let parts: Vec<&str> = (0..1 + rng.below(3))
                .map(|_| ["a", "b", "c", ".", ""][rng.below(5)])
                .collect();
            let name = parts.join("/");
            if set.admit(&name).is_ok() {
                for other in &admitted {
                    assert_ne!(other, &name, "seed {seed}: admitted twice");
                    assert!(
                        !name.starts_with(&format!("{other}/"))
                            && !other.starts_with(&format!("{name}/")),
                        "seed {seed}: {other:?} and {name:?} clash"
                    );
                }
                admitted.push(name);
            }
        }
    }
}

const BOUNDARY: &str = "propboundary";

fn valid_body(rng: &mut Rng) -> Vec<u8> {
    let mut body = Vec::new();
    for n in 0..1 + rng.below(4) {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        if rng.below(4) == 0 {
            body.extend_from_slice(b"Content-Disposition: form-data; name=\"key\"\r\n\r\nk1\r\n");
            continue;
        }
        // The field name: ours ("file"), the reference server's (the relative path, sometimes
        // hostile), or whatever a web form calls it.
        let file_name = format!("f{n}.txt");
        body.extend_from_slice(b"Content-Disposition: form-data; ");
        match rng.below(6) {
            0 => body.extend_from_slice(b"name=\"file\""),
            1 => {
                body.extend_from_slice(format!("name=\"d{}/{file_name}\"", rng.below(2)).as_bytes())
            }
            2 => {
                body.extend_from_slice(b"name=\"");
                body.extend(rng.nasty_bytes(40));
                body.extend_from_slice(file_name.as_bytes());
                body.extend_from_slice(b"\"");
            }
            // reqwest's extended form (the reference server's /submit), sometimes hostile.
            3 => body.extend_from_slice(
                format!("name*=utf-8''d{}%2F{file_name}", rng.below(2)).as_bytes(),
            ),
            4 => {
                body.extend_from_slice(b"name*=utf-8''");
                body.extend(rng.nasty_bytes(40));
                body.extend_from_slice(b"%2F..%2F");
                body.extend_from_slice(file_name.as_bytes());
            }
            _ => {
                body.extend_from_slice(b"name=\"");
                body.extend(rng.nasty_bytes(20));
                body.extend_from_slice(b"\"");
            }
        }
        body.extend_from_slice(b"; filename=\"");
        if rng.below(3) == 0 {
            body.extend(rng.nasty_bytes(40));
        } else {
            body.extend_from_slice(file_name.as_bytes());
        }
        body.extend_from_slice(b"\"\r\n\r\n");
        body.extend(rng.nasty_bytes(200));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// Flips, cuts, duplicates or splices bytes of a body.
fn mutate(rng: &mut Rng, mut body: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.below(4) {
        if body.is_empty() {
            break;
        }
        let at = rng.below(body.len());
        match rng.below(5) {
            0 => body[at] = rng.next() as u8,
            1 => body.truncate(at),
            2 => {
                let piece = rng.nasty_bytes(20);
                body.splice(at..at, piece);
            }
            3 => {
                let end = (at + rng.below(64)).min(body.len());
                let copy = body[at..end].to_vec();
                body.splice(at..at, copy);
            }
            _ => {
                let end = (at + rng.below(64)).min(body.len());
                body.drain(at..end);
            }
        }
    }
    body
}

#[test]
fn any_multipart_body_is_stored_within_its_directory_or_refused_leaving_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    // A multipart body takes ~1 ms; a fifth of the cases keeps the suite quick.
    for seed in seeds().into_iter().take((cases() / 5).max(1) as usize) {
        let mut rng = Rng(seed);
        let body = valid_body(&mut rng);
        let body = mutate(&mut rng, body);
        let limit = [64, 1000, 1 << 20][rng.below(3)];
        let result = runtime.block_on(async {
            let request = Request::builder()
                .method("POST")
                .uri("/upload")
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .body(axum::body::Body::from(body.clone()))
                .unwrap();
            let multipart = Multipart::from_request(request, &()).await.unwrap();
            upload::receive(multipart, root.path(), limit).await
        });
        match result {
            Ok(upload) => {
                assert!(upload.total_bytes <= limit, "seed {seed}");
                for name in &upload.files {
                    let path =
                        validate(name).unwrap_or_else(|e| panic!("seed {seed}: {name:?}: {e}"));
                    check_accepted(name, &path);
                    assert!(
                        upload.staging.path().join(&path).is_file(),
                        "seed {seed}: {name:?}"
                    );
                }
                drop(upload); // not persisted: removed
            }
            Err(e) => {
                let status = e.status().as_u16();
                assert!(
                    (400..500).contains(&status),
                    "seed {seed}: {status} {e} for {:?}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert!(left.is_empty(), "seed {seed}: {} entries left", left.len());
    }
}

/// The server's receiver that keeps small uploads in memory takes and refuses exactly what
/// the staging one does, with the same names, fields, sizes and bytes: held in memory when
/// the files total at most its bound, else in a staging directory (spilled at the first byte
/// past it); either way nothing is left once the upload is dropped.
#[test]
fn keeping_small_uploads_in_memory_changes_nothing_but_where_they_are() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let request = |body: &Vec<u8>| {
        Request::builder()
            .method("POST")
            .uri("/upload")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(axum::body::Body::from(body.clone()))
            .unwrap()
    };
    for seed in seeds().into_iter().take((cases() / 5).max(1) as usize) {
        let mut rng = Rng(seed);
        let body = valid_body(&mut rng);
        let body = if rng.below(2) == 0 {
            mutate(&mut rng, body)
        } else {
            body
        };
        let limit = [64, 1000, 1 << 20][rng.below(3)];
        let bound = [0, 10, 100, 1 << 20][rng.below(4)];
        let (staged, kept) = runtime.block_on(async {
            let multipart = Multipart::from_request(request(&body), &()).await.unwrap();
            let staged = upload::receive(multipart, root.path(), limit).await;
            let multipart = Multipart::from_request(request(&body), &()).await.unwrap();
            let kept =
                upload::receive_keeping_small(multipart, root.path(), limit, usize::MAX, bound)
                    .await;
            (staged, kept)
        });
        match (staged, kept) {
            (Ok(staged), Ok(kept)) => {
                assert_eq!(kept.files, staged.files, "seed {seed}");
                assert_eq!(kept.fields, staged.fields, "seed {seed}");
                assert_eq!(kept.total_bytes, staged.total_bytes, "seed {seed}");
                let expected: Vec<Vec<u8>> = staged
                    .files
                    .iter()
                    .map(|name| std::fs::read(staged.staging.path().join(name)).unwrap())
                    .collect();
                let got: Vec<Vec<u8>> = match &kept.contents {
                    upload::Contents::InMemory(contents) => {
                        assert!(kept.total_bytes <= bound, "seed {seed}");
                        contents.iter().map(|b| b.to_vec()).collect()
                    }
                    upload::Contents::Staged(dir) => {
                        assert!(kept.total_bytes > bound, "seed {seed}");
                        kept.files
                            .iter()
                            .map(|name| std::fs::read(dir.path().join(name)).unwrap())
                            .collect()
                    }
                };
                assert!(got == expected, "seed {seed}: the bytes differ");
            }
            (Err(staged), Err(kept)) => {
                assert_eq!(
                    kept.status(),
                    staged.status(),
                    "seed {seed}: {kept} / {staged}"
                );
            }
            (staged, kept) => panic!("seed {seed}: {staged:?} but {kept:?}"),
        }
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert!(left.is_empty(), "seed {seed}: {} entries left", left.len());
    }
}
