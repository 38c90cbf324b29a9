//! The user-side CLI of jobrelay: `submit`, `status`, `wait`, `download`, `cancel`, `jobs`.
//! Every command talks HTTP to a server; errors are one line on stderr and a non-zero exit
//! code, and `--json` prints machine-readable output instead of the human one.

pub mod api;
pub mod args;
pub mod commands;
pub mod output;
pub mod progress;
pub mod unpack;

pub use args::{ConnectionOpts, UserCommand};
pub use commands::run;
