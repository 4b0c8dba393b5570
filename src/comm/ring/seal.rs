//! Sealed frames on ring connections between hosts. Each connection gets its own AES-256-GCM
//! key, derived with HKDF-SHA256 from the job token, both handshake nonces, the generation,
//! the world size and the two ranks; every frame carries a 16-byte tag and its nonce is the
//! frame's sequence number on the connection. So a relay that forwarded the handshake can
//! neither read the floats nor change, drop, replay or reorder a frame unnoticed: the receiver
//! fails the call, which ends the generation like a lost peer.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

use super::READ_PIECE;

/// Bytes of the tag after every frame.
pub(super) const TAG_BYTES: usize = 16;
/// Plaintext bytes per frame (the last frame of a part may be shorter): the receiver's staging
/// piece, so a frame is opened and added while it is in the cache.
pub(super) const FRAME_BYTES: usize = READ_PIECE;

const KEY_INFO: &[u8] = b"tandem-ring/v1/frames";

/// Which ring connections are sealed (`cluster.ring_encryption`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// TCP connections are sealed; a local (Unix-domain) socket is not, as only a process of
    /// the same user is accepted at either end of it.
    #[default]
    Tcp,
    /// Every connection is sealed, local sockets too.
    All,
    /// Nothing is sealed: gradients and weights travel in clear (a warning on every start).
    Off,
}

impl Encryption {
    /// The name in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::Tcp => "tcp",
            Encryption::All => "all",
            Encryption::Off => "off",
        }
    }

    /// Whether a connection of `kind` ("tcp" or "local") is sealed.
    pub(super) fn seals(self, kind: &str) -> bool {
        match self {
            Encryption::Tcp => kind == "tcp",
            Encryption::All => true,
            Encryption::Off => false,
        }
    }
}

impl std::str::FromStr for Encryption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Encryption::Tcp, Encryption::All, Encryption::Off]
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown ring encryption {s:?}: expected tcp, all or off"))
    }
}

/// What both ends of one connection agree on after the handshake.
pub(super) struct Binding<'a> {
    pub(super) token: &'a str,
    pub(super) dial_nonce: [u8; 16],
    pub(super) accept_nonce: [u8; 16],
    pub(super) generation: u64,
    pub(super) world: usize,
    /// The dialling rank (the sender).
    pub(super) from: usize,
    /// The accepting rank (the receiver).
    pub(super) to: usize,
}

impl Binding<'_> {
    fn key(&self) -> LessSafeKey {
        let mut salt_bytes = [0u8; 32];
        salt_bytes[..16].copy_from_slice(&self.dial_nonce);
        salt_bytes[16..].copy_from_slice(&self.accept_nonce);
        let fields = [
            self.generation,
            self.world as u64,
            self.from as u64,
            self.to as u64,
        ]
        .map(u64::to_le_bytes);
        let info = [KEY_INFO, &fields[0], &fields[1], &fields[2], &fields[3]];
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt_bytes).extract(self.token.as_bytes());
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("HKDF-SHA256 yields a 32-byte key");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    /// The sending end's sealer.
    pub(super) fn sealer(&self) -> Sealer {
        Sealer {
            key: self.key(),
            seq: 0,
            out: Vec::new(),
        }
    }

    /// The receiving end's opener.
    pub(super) fn opener(&self) -> Opener {
        Opener {
            key: self.key(),
            seq: 0,
        }
    }
}

/// The nonce of frame `seq`: unique per key, as every connection has its own key.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals what one end sends, frame after frame.
pub(super) struct Sealer {
    key: LessSafeKey,
    seq: u64,
    /// The sealed bytes of the last part, reused.
    out: Vec<u8>,
}

impl Sealer {
    /// Seals `bytes` (one part of a call) as frames of [`FRAME_BYTES`]; returns what to write.
    pub(super) fn seal(&mut self, bytes: &[u8]) -> &[u8] {
        self.out.clear();
        self.out
            .reserve(bytes.len() + bytes.len().div_ceil(FRAME_BYTES) * TAG_BYTES);
        for piece in bytes.chunks(FRAME_BYTES) {
            let start = self.out.len();
            self.out.extend_from_slice(piece);
            let tag = self
                .key
                .seal_in_place_separate_tag(nonce(self.seq), Aad::empty(), &mut self.out[start..])
                .expect("a frame is far below AES-GCM's length limit");
            self.out.extend_from_slice(tag.as_ref());
            self.seq += 1;
        }
        &self.out
    }
}

/// Opens what one end receives, frame after frame.
pub(super) struct Opener {
    key: LessSafeKey,
    seq: u64,
}

impl Opener {
    /// Opens the next frame in place: `frame` is its ciphertext followed by its tag. `Err` when
    /// it was altered, replayed, reordered or sealed with another key.
    pub(super) fn open<'b>(&mut self, frame: &'b mut [u8]) -> Result<&'b [u8], ()> {
        let seq = self.seq;
        self.seq += 1;
        let plain = self
            .key
            .open_in_place(nonce(seq), Aad::empty(), frame)
            .map_err(|_| ())?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(token: &str) -> Binding<'_> {
        Binding {
            token,
            dial_nonce: [1; 16],
            accept_nonce: [2; 16],
            generation: 3,
            world: 4,
            from: 1,
            to: 2,
        }
    }

    /// Frames of one part as the receiver reads them: each piece's bytes and its tag.
    fn frames(sealed: &[u8], len: usize) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut at = 0;
        for piece in (0..len).step_by(FRAME_BYTES) {
            let n = (len - piece).min(FRAME_BYTES) + TAG_BYTES;
            out.push(sealed[at..at + n].to_vec());
            at += n;
        }
        assert_eq!(at, sealed.len());
        out
    }

    #[test]
    fn frames_open_in_order_and_nothing_else_does() {
        let b = binding("job-token-of-sixteen");
        let (mut tx, mut rx) = (b.sealer(), b.opener());
        let data: Vec<u8> = (0..FRAME_BYTES * 2 + 100).map(|i| i as u8).collect();
        let sealed = tx.seal(&data).to_vec();
        assert_eq!(sealed.len(), data.len() + 3 * TAG_BYTES);
        assert!(
            !sealed.windows(64).any(|w| data.windows(64).any(|d| d == w)),
            "no plaintext run survives sealing"
        );
        let mut got = vec![];
        for mut f in frames(&sealed, data.len()) {
            got.extend_from_slice(rx.open(&mut f).unwrap());
        }
        assert_eq!(got, data);

        // One flipped bit, a replayed frame, a swapped pair, another key: all refused.
        let part = tx.seal(&[7u8; 1000]).to_vec();
        let mut flipped = part.clone();
        flipped[10] ^= 1;
        let mut rx2 = b.opener();
        rx2.seq = rx.seq;
        assert!(rx2.open(&mut flipped).is_err());
        let mut ok = part.clone();
        let mut rx3 = b.opener();
        rx3.seq = rx.seq;
        assert_eq!(rx3.open(&mut ok).unwrap(), &[7u8; 1000][..]);
        let mut replay = part.clone();
        assert!(rx3.open(&mut replay).is_err(), "a replayed frame");
        let other = binding("another-job-token!!");
        let mut wrong = part.clone();
        let mut rx4 = other.opener();
        rx4.seq = rx.seq;
        assert!(rx4.open(&mut wrong).is_err(), "another job's key");
        let mut swapped = Binding {
            from: 2,
            to: 1,
            ..binding("job-token-of-sixteen")
        }
        .opener();
        swapped.seq = rx.seq;
        assert!(
            swapped.open(&mut part.clone()).is_err(),
            "the other direction's key"
        );
    }
}
