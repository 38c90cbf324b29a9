//! Pieces shared by the jobrelay server and client: the wire types of the client protocol,
//! the rules for uploaded file names, streaming multipart uploads to disk, streaming ZIP
//! archives of a directory, and small file-system helpers.

pub mod archive;
pub mod auth;
pub mod blocking;
pub mod disposition;
pub mod filename;
pub mod fsutil;
pub mod http;
pub mod logtail;
pub mod protocol;
pub mod resources;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod upload;
pub mod workfile;
