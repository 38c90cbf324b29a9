//! Property test of the payload-record loader: whatever lies in `payloads/` (garbage, cut or
//! mutated records, in files of their own or in page files, extreme ids) the store opens without panicking, or refuses with its clear
//! error when its id counter is behind a record (never hands out an old id). `JOBRELAY_PROPTEST_CASES` sets the number of cases (default 300).

use jobrelay_client::record_pages::SLOT;
use jobrelay_client::store::PayloadStore;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const IDS: &[&str] = &[
    "1",
    "0",
    "7",
    "18446744073709551615",
    "18446744073709551614",
    "-1",
    "1e3",
    "\"5\"",
    "null",
];
const STATUSES: &[&str] = &[
    "Prepared",
    "Running",
    "Completed",
    "Failed",
    "Invalid",
    "Killed",
    "Cleaned",
    "Bogus",
    "",
];

fn record(rng: &mut Rng) -> Vec<u8> {
    let id = IDS[rng.below(IDS.len())];
    let status = STATUSES[rng.below(STATUSES.len())];
    let mut text = format!(
        "{{\"id\":{id},\"status\":\"{status}\",\"loc\":\"/nowhere/{id}\",\"pid\":{},\"killed\":false,\"input\":{{}},\"key\":\"k{}\"}}",
        rng.below(100000),
        rng.below(3)
    )
    .into_bytes();
    match rng.below(4) {
        0 => text.truncate(rng.below(text.len())),
        1 => {
            let at = rng.below(text.len());
            text[at] = rng.next() as u8;
        }
        _ => {}
    }
    text
}

#[test]
fn any_records_directory_opens_and_ids_stay_fresh() {
    let cases: u64 = std::env::var("JOBRELAY_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(|n: u64| n / 5)
        .unwrap_or(300);
    for seed in 0..cases {
        let mut rng = Rng(seed);
        let dir = tempfile::tempdir().unwrap();
        let payloads = dir.path().join("payloads");
        std::fs::create_dir_all(&payloads).unwrap();
        for n in 0..rng.below(6) {
            let name = match rng.below(7) {
                0 => format!("{n}.json.tmp"),
                1 => format!("x{n}.json"),
                // Page files (`record_pages`): slots of records (whole, cut or mangled), at
                // times a hole, a page cut short, or a page named by no number.
                2 | 3 => {
                    let mut page = Vec::new();
                    for _ in 0..=rng.below(3) {
                        let mut slot = match rng.below(4) {
                            0 => Vec::new(),
                            _ => record(&mut rng),
                        };
                        slot.resize(SLOT, if rng.below(2) == 0 { b' ' } else { 0 });
                        page.extend(slot);
                    }
                    if rng.below(4) == 0 {
                        page.truncate(rng.below(page.len()));
                    }
                    let name = match rng.below(5) {
                        0 => "x.page".to_owned(),
                        1 => "18446744073709551615.page".to_owned(),
                        _ => format!("{n}.page"),
                    };
                    std::fs::write(payloads.join(name), page).unwrap();
                    continue;
                }
                _ => format!("{n}.json"),
            };
            std::fs::write(payloads.join(name), record(&mut rng)).unwrap();
        }
        if rng.below(3) == 0 {
            let next = IDS[rng.below(IDS.len())];
            std::fs::write(dir.path().join("next-id"), next).unwrap();
        }
        let opened = std::panic::catch_unwind(|| PayloadStore::open(dir.path()));
        let store = match opened {
            Ok(Ok(store)) => store,
            // A counter behind the records (next-id missing or older) is refused, by design:
            // it would hand out ids those records had.
            Ok(Err(e)) if e.to_string().contains("is behind payload record") => continue,
            Ok(Err(e)) => panic!("seed {seed}: open failed: {e}"),
            Err(_) => panic!(
                "seed {seed}: open panicked on {:?}",
                std::fs::read_dir(&payloads)
                    .unwrap()
                    .map(|e| {
                        let p = e.unwrap().path();
                        (
                            p.clone(),
                            String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>()
            ),
        };
        let _ = store;
    }
}
