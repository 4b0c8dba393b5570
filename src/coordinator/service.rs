//! The gRPC handlers: thin — authenticate, check protocol version and generation, convert,
//! call into the job state, map errors to a `Status`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::admission::{check_secret, upload_name_of_stage, UploadCap};
use super::state::{Event, Member, Phase, Shared};
use crate::proto::{self, coordinator_server::Coordinator};
use crate::train::checkpoint::sha256_hex;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A client's string as a status message or a log line quotes it: cut to 64 characters, as a
/// status travels in an HTTP/2 header (which peers limit to 16 KiB).
pub(super) fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

pub struct Service {
    pub(crate) shared: Arc<Shared>,
}

/// SHA-256 of a token: what [`token_matches`] compares.
fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Whether `got` is the token whose digest is `want`, in a time that depends neither on where
/// they differ nor on `got`'s length: both sides are hashed first, then compared in constant
/// time (`subtle`).
fn token_matches(got: &str, want: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(&token_digest(got)[..], &want[..]).into()
}

/// Checks the job token on every call (constant-time comparison).
pub fn auth_interceptor(
    token: String,
    refusals: std::sync::Arc<super::refusals::Refusals>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let want = token_digest(&token);
    move |req: Request<()>| {
        let got = req
            .metadata()
            .get(proto::TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if token_matches(got, &want) {
            Ok(req)
        } else {
            let reason = if got.is_empty() {
                "no job token"
            } else {
                "wrong job token"
            };
            refusals.note(req.remote_addr().map(|a| a.ip()), reason);
            Err(Status::unauthenticated(
                "missing or wrong job token (x-tandem-token)",
            ))
        }
    }
}

impl Service {
    fn check_job(&self, job_id: &str) -> Result<(), Status> {
        if job_id != self.shared.job_id {
            return Err(Status::permission_denied(format!(
                "this coordinator runs job {:?}, not {}",
                self.shared.job_id,
                shown(job_id)
            )));
        }
        Ok(())
    }

    /// An upload comes from the member holding rank 0, under a name of the current stage:
    /// `stageS-stepNNNNNN`, `stageS-best` or `stageS-final` (never another stage's, so the
    /// checkpoints later stages start from cannot be replaced).
    fn check_uploader(&self, c: &proto::CheckpointChunk) -> Result<(), Status> {
        let st = self.shared.state.lock().unwrap();
        let rank0 = st.members.values().find(|m| m.rank == Some(0));
        check_secret(rank0.map_or("", |m| &m.secret), &c.member_secret, 0)?;
        if !upload_name_of_stage(&c.name, st.stage_index) {
            let stage = format!("stage{}-", st.stage_index);
            return Err(Status::permission_denied(format!(
                "checkpoint name {}: uploads in stage {} are named {stage}stepNNNNNN, {stage}best \
                 or {stage}final",
                shown(&c.name),
                st.stage_index
            )));
        }
        Ok(())
    }

    /// The most an upload in the current stage may bring, from the stage's model.
    fn upload_cap(&self) -> UploadCap {
        let stage = self.shared.state.lock().unwrap().stage_index as usize;
        let p = &self.shared.prepared;
        let model = p
            .stages
            .get(stage)
            .and_then(|s| s.model_cfg_json.as_deref())
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_else(|| p.model_cfg.clone());
        UploadCap::for_model(&model)
    }

    fn check_generation(&self, generation: u64) -> Result<(), Status> {
        let current = self.shared.state.lock().unwrap().generation;
        if generation != current {
            return Err(Status::failed_precondition(format!(
                "stale generation {generation}: the current generation is {current}"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    type JoinStream = BoxStream<proto::Directive>;

    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        if r.protocol_version != proto::PROTOCOL_VERSION {
            let reason = format!(
                "protocol version {} (this coordinator speaks {})",
                r.protocol_version,
                proto::PROTOCOL_VERSION
            );
            self.shared.refusals.note(peer, &reason);
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this coordinator speaks version {} (mixed releases?)",
                r.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        if !r.job_id.is_empty() {
            self.check_job(&r.job_id).inspect_err(|_| {
                let reason = format!(
                    "job {} (this coordinator runs {:?})",
                    shown(&r.job_id),
                    self.shared.job_id
                );
                self.shared.refusals.note(peer, &reason);
            })?;
        }
        if r.ring_addr.is_empty() {
            return Err(Status::invalid_argument("ring_addr is empty"));
        }
        let (tx, rx) = mpsc::channel(16);
        let id = {
            let mut st = self.shared.state.lock().unwrap();
            if matches!(st.phase, Phase::Finished | Phase::Failed) {
                return Err(Status::unavailable("the job has ended"));
            }
            let id = st.next_member;
            st.next_member += 1;
            st.members.insert(
                id,
                Member {
                    worker_id: r.worker_id.clone(),
                    ring_addr: r.ring_addr.clone(),
                    tx: tx.clone(),
                    rank: None,
                    last_seen: Instant::now(),
                    phase: "joined".into(),
                    step: 0,
                    secret: String::new(),
                },
            );
            id
        };
        tracing::info!(worker = %r.worker_id, ring = %r.ring_addr, threads = r.threads, device = %r.device, "worker joined");
        let events = self.shared.events.clone();
        let _ = events.send(Event::Joined);
        // The stream's end (worker gone, connection cut) is the member's departure.
        tokio::spawn(async move {
            tx.closed().await;
            let _ = events.send(Event::Left(id));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_progress(
        &self,
        req: Request<proto::ProgressReport>,
    ) -> Result<Response<proto::ProgressAck>, Status> {
        let r = req.into_inner();
        self.check_job(&r.job_id)?;
        self.check_generation(r.generation)?;
        let keep_going = {
            let mut st = self.shared.state.lock().unwrap();
            let Some(m) = st.members.values_mut().find(|m| m.rank == Some(r.rank)) else {
                return Err(Status::failed_precondition(format!(
                    "rank {} is not a member of this generation",
                    r.rank
                )));
            };
            check_secret(&m.secret, &r.member_secret, r.rank)?;
            m.last_seen = Instant::now();
            m.phase = r.phase.clone();
            m.step = r.step;
            if r.rank == 0 && !r.done {
                st.last = Some(r.clone());
                st.note_training(r.stage_index, r.step);
            }
            st.phase == Phase::Running
        };
        if r.rank == 0 && !r.steps.is_empty() {
            if let Some(stage) = self.shared.cfg.stages.get(r.stage_index as usize) {
                let pretrain = stage.kind == crate::config::StageKind::Pretrain;
                let written = self.shared.metrics.lock().unwrap().append(
                    r.stage_index,
                    &stage.name,
                    pretrain,
                    r.generation,
                    &r.steps,
                );
                if let Err(e) = written {
                    tracing::warn!("cannot append to metrics.jsonl: {e}");
                }
            }
        }
        if !r.error.is_empty() {
            let _ = self.shared.events.send(Event::Failed {
                rank: r.rank,
                error: r.error.clone(),
            });
        } else if r.done {
            let _ = self.shared.events.send(Event::Done(Box::new(r)));
        }
        Ok(Response::new(proto::ProgressAck { keep_going }))
    }

    type FetchShardStream = BoxStream<proto::ShardChunk>;

    async fn fetch_shard(
        &self,
        req: Request<proto::FetchShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        let r = req.into_inner();
        self.check_job(&r.job_id)?;
        self.check_generation(r.generation)?;
        let shared = self.shared.clone();
        let bytes =
            tokio::task::spawn_blocking(move || shared.prepared.index.read_shard(r.shard_id))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(Box::pin(tokio_stream::iter(byte_chunks(
            &bytes,
        )))))
    }

    type FetchStageFileStream = BoxStream<proto::ShardChunk>;

    async fn fetch_stage_file(
        &self,
        req: Request<proto::FetchStageFileRequest>,
    ) -> Result<Response<Self::FetchStageFileStream>, Status> {
        let r = req.into_inner();
        self.check_job(&r.job_id)?;
        self.check_generation(r.generation)?;
        let stage = self
            .shared
            .prepared
            .stages
            .get(r.stage_index as usize)
            .ok_or_else(|| Status::not_found(format!("stage {} does not exist", r.stage_index)))?;
        let f = stage
            .files
            .iter()
            .find(|f| f.role == r.role)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "stage {} has no {} file",
                    r.stage_index,
                    shown(&r.role)
                ))
            })?;
        Ok(Response::new(Box::pin(tokio_stream::iter(byte_chunks(
            &f.data,
        )))))
    }

    async fn put_checkpoint(
        &self,
        req: Request<Streaming<proto::CheckpointChunk>>,
    ) -> Result<Response<proto::PutCheckpointResponse>, Status> {
        let mut stream = req.into_inner();
        let mut files: Vec<(String, Vec<u8>)> = vec![];
        let mut hashes: Vec<String> = vec![];
        let mut current: Option<(String, Vec<u8>)> = None;
        let mut name = String::new();
        let mut in_flight = None;
        let (mut cap, mut received) = (UploadCap::default(), 0u64);
        // A stream that stops sending (its worker stalled or vanished) fails after this long
        // instead of holding a waiting rendezvous.
        let idle = Duration::from_secs_f64(self.shared.cfg.cluster.collective_timeout_s);
        loop {
            let next = tokio::time::timeout(idle, stream.next())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "checkpoint upload {}: no data for {:.0} s (collective_timeout_s)",
                        shown(&name),
                        idle.as_secs_f64()
                    ))
                })?;
            let Some(c) = next else { break };
            let c = c?;
            if name.is_empty() {
                self.check_job(&c.job_id)?;
                self.check_generation(c.generation)?;
                self.check_uploader(&c)?;
                cap = self.upload_cap();
                name = c.name.clone();
                in_flight = Some(super::state::UploadGuard::new(self.shared.clone()));
            } else if c.name != name {
                return Err(Status::invalid_argument(
                    "checkpoint name changed within one upload",
                ));
            }
            received += c.data.len() as u64;
            cap.check(received, files.len() + 1, &name)?;
            let cur = current.get_or_insert_with(|| (c.file.clone(), vec![]));
            if cur.0 != c.file {
                return Err(Status::invalid_argument(format!(
                    "file {} started before {} ended",
                    shown(&c.file),
                    shown(&cur.0)
                )));
            }
            cur.1.extend_from_slice(&c.data);
            if c.last_of_file {
                let (f, b) = current.take().expect("set above");
                if sha256_hex(&b) != c.sha256 {
                    return Err(Status::data_loss(format!(
                        "checkpoint {}: file {} arrived corrupted (SHA-256 mismatch)",
                        shown(&name),
                        shown(&f)
                    )));
                }
                files.push((f, b));
                hashes.push(c.sha256);
            }
        }
        if current.is_some() || files.is_empty() {
            return Err(Status::invalid_argument(
                "checkpoint upload ended in the middle of a file",
            ));
        }
        let shared = self.shared.clone();
        let n2 = name.clone();
        // The guard goes with the commit: a cancelled RPC does not end the wait before the
        // checkpoint is on disk (the rendezvous reads the store itself).
        let dir = tokio::task::spawn_blocking(move || {
            let _in_flight = in_flight;
            shared.store.commit_hashed(&n2, &files, &hashes)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(checkpoint = %name, dir = %dir.display(), "checkpoint stored");
        let _ = self.shared.events.send(Event::Checkpoint(name.clone()));
        Ok(Response::new(proto::PutCheckpointResponse {
            stored_as: name,
        }))
    }

    type GetCheckpointStream = BoxStream<proto::CheckpointChunk>;

    async fn get_checkpoint(
        &self,
        req: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<Self::GetCheckpointStream>, Status> {
        let r = req.into_inner();
        self.check_job(&r.job_id)?;
        self.check_generation(r.generation)?;
        let shared = self.shared.clone();
        let name = r.name.clone();
        let files = tokio::task::spawn_blocking(move || shared.store.read(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let chunks = checkpoint_chunks(&r.job_id, r.generation, &r.name, files);
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks.map(Ok)))))
    }

    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        Ok(Response::new(self.shared.status()))
    }
}

/// Splits bytes into stream chunks; the last one carries the SHA-256 of the whole.
fn byte_chunks(bytes: &[u8]) -> Vec<Result<proto::ShardChunk, Status>> {
    let sha = sha256_hex(bytes);
    let n = bytes.len().div_ceil(proto::CHUNK_BYTES).max(1);
    (0..n)
        .map(|i| {
            let lo = i * proto::CHUNK_BYTES;
            let hi = (lo + proto::CHUNK_BYTES).min(bytes.len());
            Ok(proto::ShardChunk {
                data: bytes[lo..hi].to_vec(),
                sha256: if i + 1 == n {
                    sha.clone()
                } else {
                    String::new()
                },
                last: i + 1 == n,
            })
        })
        .collect()
}

/// Splits checkpoint files into stream chunks (used in both directions), lazily: the stream
/// owns the files and cuts each chunk as it is sent, so a checkpoint is not held twice (its
/// files and all their chunks) while it streams.
pub fn checkpoint_chunks(
    job_id: &str,
    generation: u64,
    name: &str,
    files: Vec<(String, Vec<u8>)>,
) -> impl Iterator<Item = proto::CheckpointChunk> + Send + 'static {
    let (job_id, name) = (job_id.to_string(), name.to_string());
    files.into_iter().flat_map(move |(file, bytes)| {
        let sha = sha256_hex(&bytes);
        let n = bytes.len().div_ceil(proto::CHUNK_BYTES).max(1);
        let (job_id, name) = (job_id.clone(), name.clone());
        (0..n).map(move |i| {
            let lo = i * proto::CHUNK_BYTES;
            let hi = (lo + proto::CHUNK_BYTES).min(bytes.len());
            let last = i + 1 == n;
            proto::CheckpointChunk {
                job_id: job_id.clone(),
                generation,
                name: name.clone(),
                file: file.clone(),
                data: bytes[lo..hi].to_vec(),
                sha256: if last { sha.clone() } else { String::new() },
                last_of_file: last,
                member_secret: String::new(),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_itself_whatever_the_length_of_the_guess() {
        let want = token_digest("0123456789abcdef-job-token");
        assert!(token_matches("0123456789abcdef-job-token", &want));
        for wrong in [
            "",
            "0",
            "0123456789abcdef-job-toke",
            "0123456789abcdef-job-tokenX",
            "1123456789abcdef-job-token",
        ] {
            assert!(!token_matches(wrong, &want), "{wrong:?}");
        }
    }

    #[test]
    fn checkpoint_chunks_carry_each_file_whole_and_checked() {
        let big: Vec<u8> = (0..proto::CHUNK_BYTES * 2 + 7).map(|i| i as u8).collect();
        let files = vec![("a".to_string(), big.clone()), ("b".to_string(), vec![])];
        let chunks: Vec<_> = checkpoint_chunks("job", 3, "stage0-final", files).collect();
        assert_eq!(
            chunks.len(),
            3 + 1,
            "three chunks of `a`, one (empty) of `b`"
        );
        let a: Vec<u8> = chunks[..3].iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(a, big);
        for (c, last) in chunks.iter().zip([false, false, true, true]) {
            assert_eq!(c.last_of_file, last);
            assert_eq!(c.sha256.is_empty(), !last);
            assert_eq!((c.job_id.as_str(), c.generation), ("job", 3));
        }
        assert_eq!(chunks[2].sha256, sha256_hex(&big));
        assert_eq!(chunks[3].sha256, sha256_hex(&[]));
    }
}
