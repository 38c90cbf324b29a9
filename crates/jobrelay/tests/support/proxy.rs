//! A small TCP fault proxy for the partition tests: put it between the server and a client
//! (the server's service file names the proxy's address) and switch its mode at any time.
//!
//! It runs on its own thread with its own runtime, so a test's runtime blocking (or a
//! current-thread test runtime) never stalls the link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Close every open connection and accept new ones only to close them at once.
    Drop,
    /// Keep connections open but forward nothing (a black hole past every timeout).
    Stall,
    /// Forward every chunk after this delay (a slow link).
    Delay(Duration),
    /// Cut a connection once it has carried `after` bytes towards the client (request
    /// bodies: uploads to the client), at most `times` times, then forward as `Pass`.
    CutUp { after: u64, times: u32 },
    /// Same for bytes coming back from the client (responses: result downloads).
    CutDown { after: u64, times: u32 },
    /// Forward requests whole, but close a connection that carried a request starting with
    /// `request` (say `b"POST /submit"`) instead of forwarding its answer, at most `times`
    /// times: the client did the work, the caller never learns it.
    LoseAnswer { request: &'static [u8], times: u32 },
}

struct State {
    mode: Mode,
    /// Bumped by `Drop` so every open connection closes.
    generation: u64,
}

/// A running proxy; stops (and closes its connections) when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Connections cut by `CutUp`/`CutDown` so far.
    cuts: Arc<AtomicU64>,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Pass,
            generation: 0,
        }));
        let cuts = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (st, cu, ac) = (state.clone(), cuts.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((inbound, _)) = listener.accept().await else {
                            continue;
                        };
                        ac.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(connection(inbound, target, st.clone(), cu.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime ends every connection task.
        });
        FaultProxy {
            addr,
            state,
            cuts,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://ADDR` of the proxy, to give the server as the client's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        let mut state = self.state.lock().unwrap();
        if mode == Mode::Drop {
            state.generation += 1;
        }
        state.mode = mode;
    }

    pub fn mode(&self) -> Mode {
        self.state.lock().unwrap().mode
    }

    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn connection(
    inbound: TcpStream,
    target: SocketAddr,
    state: Arc<Mutex<State>>,
    cuts: Arc<AtomicU64>,
) {
    let generation = {
        let s = state.lock().unwrap();
        if s.mode == Mode::Drop {
            return; // closed at once
        }
        s.generation
    };
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // Set once a request this connection carried matches a `LoseAnswer` mode.
    let marked = std::sync::atomic::AtomicBool::new(false);
    let up = pump(in_read, out_write, true, generation, &state, &cuts, &marked);
    let down = pump(
        out_read, in_write, false, generation, &state, &cuts, &marked,
    );
    // Either direction ending (EOF, error, a cut) ends the connection: both halves drop.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies one direction chunk by chunk, consulting the mode before each chunk. Returns when
/// the connection must end.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    upwards: bool,
    generation: u64,
    state: &Mutex<State>,
    cuts: &AtomicU64,
    marked: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut carried: u64 = 0;
    loop {
        // A read that waits for the peer still notices a Drop within 100 ms.
        let n = loop {
            if state.lock().unwrap().generation != generation {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(Ok(n)) => break n,
                Err(_) => continue,
            }
        };
        let chunk = &buf[..n];
        // Decide what to do with this chunk; Stall waits (holding it) until the mode changes.
        loop {
            let mode = {
                let s = state.lock().unwrap();
                if s.generation != generation {
                    return;
                }
                s.mode
            };
            match mode {
                Mode::Stall => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Mode::Drop => return,
                Mode::Delay(d) => tokio::time::sleep(d).await,
                Mode::CutUp { .. } | Mode::CutDown { .. } => {
                    if let Some(keep) = cut_here(state, upwards, carried, chunk.len()) {
                        let _ = to.write_all(&chunk[..keep]).await;
                        cuts.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                Mode::LoseAnswer { request, .. } if upwards && chunk.starts_with(request) => {
                    marked.store(true, Ordering::Relaxed);
                }
                Mode::LoseAnswer { .. }
                    if !upwards && marked.load(Ordering::Relaxed) && lose_here(state) =>
                {
                    cuts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ => {}
            }
            break;
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
        carried += chunk.len() as u64;
    }
}

/// Uses one of a `LoseAnswer` mode's losses, if any is left.
fn lose_here(state: &Mutex<State>) -> bool {
    let mut s = state.lock().unwrap();
    let Mode::LoseAnswer { times, .. } = &mut s.mode else {
        return false;
    };
    if *times == 0 {
        return false;
    }
    *times -= 1;
    if *times == 0 {
        s.mode = Mode::Pass;
    }
    true
}

/// Whether this chunk crosses the cut threshold of the current mode in this direction; if so,
/// uses one of the mode's cuts and returns how many bytes of the chunk still go through.
fn cut_here(state: &Mutex<State>, upwards: bool, carried: u64, len: usize) -> Option<usize> {
    let mut s = state.lock().unwrap();
    let (after, times) = match &mut s.mode {
        Mode::CutUp { after, times } if upwards => (*after, times),
        Mode::CutDown { after, times } if !upwards => (*after, times),
        _ => return None,
    };
    if carried + len as u64 <= after || *times == 0 {
        return None;
    }
    *times -= 1;
    if *times == 0 {
        s.mode = Mode::Pass;
    }
    Some((after.saturating_sub(carried) as usize).min(len))
}
