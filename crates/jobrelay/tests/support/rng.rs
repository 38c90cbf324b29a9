//! Deterministic pseudo-random numbers (xorshift64): a failing run can be replayed from its
//! seed, and the noise they make is what the client's deflate cannot shrink.

/// A small deterministic generator; the seed must not be 0 (xorshift stays at 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `len` pseudo-random bytes, the same on every call: what the client's archive cannot
/// deflate, for tests whose ZIP must carry every byte.
pub fn noise(len: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..len).map(|_| (rng.next() >> 24) as u8).collect()
}
