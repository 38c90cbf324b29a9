//! Loopback addresses for tests that need a port fixed before a process starts, or a raw
//! socket to a process started on port 0.

use std::net::SocketAddr;

/// A port free right now (bound and released): for a client that must come back on the port
/// the server knows it by.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The socket address of an `http://host:port` URL.
pub fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}
