//! Generated gRPC code for `proto/tandem/v1/coordinator.proto`, and the protocol's constants.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tandem.v1");

/// Bumped on any incompatible change; `Join` is refused on mismatch.
pub const PROTOCOL_VERSION: u32 = 1;

/// Metadata key carrying the job token on every call.
pub const TOKEN_HEADER: &str = "x-tandem-token";

/// Largest message either side accepts (shards and checkpoints are chunked well below it).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Chunk size for shard and checkpoint streams.
pub const CHUNK_BYTES: usize = 1 << 20;
/// HTTP/2 flow-control window per stream (the connection gets twice this): several chunks in
/// flight instead of HTTP/2's default 64 KiB.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
