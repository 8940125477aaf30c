//! The handshake's messages and its two sides as pure state machines.
//!
//! ```text
//! initiator                                   responder
//!   Hi { auth?, nonce_i }            ──▶
//!                                    ◀──  Hi { auth?, nonce_r, proof_r }   (or Refuse)
//!   Proof { proof_i } + Hello        ──▶      (Hello read only after the proof checks)
//!                                    ◀──  Hello                            (or Refuse)
//! ```
//!
//! With a cluster [`Secret`], each side proves it holds it with an HMAC-SHA256 over both
//! fresh nonces under a label of its role, so a proof can be neither replayed on another
//! connection nor reflected back. The responder proves first and the initiator second, and
//! both before any hello (engine id, segments, rkeys, QPs, layout) is sent. A side without the
//! secret, or with another one, is refused with a coded [`Refusal`] and has learnt nothing but
//! the responder's nonce. Without a secret on either side the same four messages flow with
//! empty proofs. Confidentiality is not a goal: the hellos and the data move in the clear.
//!
//! Every message has the [`PREAMBLE_LEN`]-byte preamble (magic, version, kind, body length)
//! and a cap on its body by kind ([`max_body`]); before the initiator has proven itself the
//! responder accepts nothing longer than [`MAX_SMALL_BODY`].

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::*;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Largest body of a `Hi`, `Proof` or `Refuse` message.
pub const MAX_SMALL_BODY: usize = 512;
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest refusal text sent.
const MAX_REFUSAL_TEXT: usize = 256;

/// Handshake message kinds (the preamble's kind field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgKind {
    /// Nonce (and, from the responder, its proof).
    Hi = 1,
    /// The initiator's proof.
    Proof = 2,
    /// A [`Hello`](super::Hello): who the engine is and what it offers.
    Hello = 3,
    /// The other side refuses the connection, with a [`RefuseCode`].
    Refuse = 4,
}

impl MsgKind {
    pub(crate) fn from_u16(v: u16) -> Result<Self, WireError> {
        Ok(match v {
            1 => MsgKind::Hi,
            2 => MsgKind::Proof,
            3 => MsgKind::Hello,
            4 => MsgKind::Refuse,
            other => {
                return Err(WireError::Malformed {
                    what: "preamble",
                    detail: format!("unknown message kind {other}"),
                });
            }
        })
    }
}

/// The largest body a message of `kind` may announce.
pub fn max_body(kind: MsgKind) -> usize {
    match kind {
        MsgKind::Hello => MAX_HELLO_BODY,
        MsgKind::Hi | MsgKind::Proof | MsgKind::Refuse => MAX_SMALL_BODY,
    }
}

/// Why a side refused the handshake (a [`MsgKind::Refuse`] message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefuseCode {
    /// The responder requires the cluster secret and the initiator has none.
    AuthRequired = 1,
    /// A proof did not check: the two sides hold different secrets.
    AuthFailed = 2,
    /// The initiator holds a secret and the responder proved none.
    PeerUnauthenticated = 3,
    /// Too many connections (in their handshake, or from this peer).
    Busy = 4,
    /// A message broke the protocol.
    Malformed = 5,
}

impl RefuseCode {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => RefuseCode::AuthRequired,
            2 => RefuseCode::AuthFailed,
            3 => RefuseCode::PeerUnauthenticated,
            4 => RefuseCode::Busy,
            _ => RefuseCode::Malformed,
        }
    }

    /// Whether the refusal is about authentication.
    pub fn is_auth(self) -> bool {
        matches!(
            self,
            RefuseCode::AuthRequired | RefuseCode::AuthFailed | RefuseCode::PeerUnauthenticated
        )
    }
}

/// A cluster secret: every engine of a deployment holds the same one. Its `Debug` never shows
/// the bytes.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret of at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Secret, String> {
        let b = bytes.as_ref();
        if b.len() < MIN_SECRET_LEN {
            return Err(format!(
                "a secret needs at least {MIN_SECRET_LEN} bytes, got {}",
                b.len()
            ));
        }
        Ok(Secret(b.into()))
    }

    /// The secret in a file's contents, without a trailing newline.
    pub fn from_file_contents(bytes: &[u8]) -> Result<Secret, String> {
        let mut b = bytes;
        while let [rest @ .., b'\n' | b'\r'] = b {
            b = rest;
        }
        Secret::new(b)
    }

    fn mac(
        &self,
        label: &[u8],
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
    ) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(nonce_i);
        m.update(nonce_r);
        m
    }

    /// The proof of the side `role` over both nonces.
    pub fn prove(
        &self,
        role: Role,
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(role.label(), nonce_i, nonce_r)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the proof of `role` over both nonces (compared in constant time).
    pub fn check(
        &self,
        role: Role,
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.mac(role.label(), nonce_i, nonce_r)
            .verify_slice(proof)
            .is_ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Secret {}

/// A side of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Initiator,
    /// The side that accepted.
    Responder,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Initiator => b"kvtransfer handshake v3: initiator",
            Role::Responder => b"kvtransfer handshake v3: responder",
        }
    }
}

/// Encodes a preamble for a `kind` message of `body_len` bytes.
pub(crate) fn preamble(kind: MsgKind, body_len: usize) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    p[8..12].copy_from_slice(&saturate_u32(body_len).to_le_bytes());
    p
}

fn message(kind: MsgKind, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PREAMBLE_LEN + body.len());
    m.extend_from_slice(&preamble(kind, body.len()));
    m.extend_from_slice(body);
    m
}

/// A `Hi`: the sender's nonce, whether it holds a secret, and (from the responder) its proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hi {
    /// The sender holds a cluster secret.
    pub auth: bool,
    /// Its fresh nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The responder's proof (empty from the initiator, or without a secret).
    pub proof: Vec<u8>,
}

/// Encodes a `Hi` message (preamble included).
pub fn encode_hi(hi: &Hi) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + NONCE_LEN + hi.proof.len());
    body.push(u8::from(hi.auth));
    body.extend_from_slice(&hi.nonce);
    body.push(hi.proof.len().min(PROOF_LEN) as u8);
    body.extend_from_slice(&hi.proof[..hi.proof.len().min(PROOF_LEN)]);
    message(MsgKind::Hi, &body)
}

/// Decodes a `Hi` body.
pub fn decode_hi(body: &[u8]) -> Result<Hi, WireError> {
    let mut r = Reader::new(body);
    let auth = match r.u8("hi flags")? {
        0 => false,
        1 => true,
        f => {
            return Err(WireError::Malformed {
                what: "hi",
                detail: format!("flags {f:#04x}"),
            });
        }
    };
    let nonce = r.array::<NONCE_LEN>("hi nonce")?;
    let proof = read_proof(&mut r, "hi proof")?;
    r.finish("hi")?;
    Ok(Hi { auth, nonce, proof })
}

fn read_proof(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, WireError> {
    let n = r.u8(what)? as usize;
    if n != 0 && n != PROOF_LEN {
        return Err(WireError::Malformed {
            what,
            detail: format!("{n} bytes (0 or {PROOF_LEN})"),
        });
    }
    Ok(r.bytes(n, what)?.to_vec())
}

/// Encodes a `Proof` message (empty without a secret).
pub fn encode_proof(proof: &[u8]) -> Vec<u8> {
    let n = proof.len().min(PROOF_LEN);
    let mut body = Vec::with_capacity(1 + n);
    body.push(n as u8);
    body.extend_from_slice(&proof[..n]);
    message(MsgKind::Proof, &body)
}

/// Decodes a `Proof` body.
pub fn decode_proof(body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut r = Reader::new(body);
    let proof = read_proof(&mut r, "proof")?;
    r.finish("proof")?;
    Ok(proof)
}

/// A refusal: its code and a short text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as a code.
    pub code: RefuseCode,
    /// Why, in words (at most 256 bytes are sent).
    pub text: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.text, self.code)
    }
}

/// Encodes a `Refuse` message.
pub fn encode_refusal(r: &Refusal) -> Vec<u8> {
    let mut end = r.text.len().min(MAX_REFUSAL_TEXT);
    while !r.text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &r.text.as_bytes()[..end];
    let mut body = Vec::with_capacity(4 + text.len());
    body.extend_from_slice(&(r.code as u16).to_le_bytes());
    body.extend_from_slice(&(text.len() as u16).to_le_bytes());
    body.extend_from_slice(text);
    message(MsgKind::Refuse, &body)
}

/// Decodes a `Refuse` body (an unknown code reads as [`RefuseCode::Malformed`]).
pub fn decode_refusal(body: &[u8]) -> Result<Refusal, WireError> {
    let mut r = Reader::new(body);
    let code = RefuseCode::from_u16(r.u16("refusal code")?);
    let n = r.u16("refusal text length")? as usize;
    let text = String::from_utf8_lossy(r.bytes(n, "refusal text")?).into_owned();
    r.finish("refusal")?;
    Ok(Refusal { code, text })
}

/// A whole handshake message found in a buffer: its kind, its body and the bytes it took.
pub type Message<'a> = (MsgKind, &'a [u8], usize);

/// The next whole message at the start of `buf`, if all of it is there: its kind, its body
/// and the bytes it took. A preamble that is wrong, of a kind not in `expect`, or announcing
/// more than `max` (or the kind's cap) is an error as soon as its 12 bytes are in: nothing is
/// ever sized by a length field before the bytes arrive.
pub fn next_message<'a>(
    buf: &'a [u8],
    expect: &[MsgKind],
    max: usize,
) -> Result<Option<Message<'a>>, WireError> {
    let Some(pre) = buf.first_chunk::<PREAMBLE_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = decode_preamble(pre)?;
    if !expect.contains(&kind) {
        return Err(WireError::Malformed {
            what: "handshake",
            detail: format!("a {kind:?} message where {expect:?} was expected"),
        });
    }
    check_max(
        "handshake message",
        len as u64,
        max.min(max_body(kind)) as u64,
    )?;
    let end = PREAMBLE_LEN + len;
    Ok((buf.len() >= end).then(|| (kind, &buf[PREAMBLE_LEN..end], end)))
}

/// Why a handshake did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's bytes broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer refused the connection.
    #[error("the peer refused the connection: {0}")]
    Refused(Refusal),
    /// This side refused the peer (the refusal to send is in [`Step::Refuse`] or was sent).
    #[error("{0}")]
    Refusing(Refusal),
}

impl HandshakeError {
    /// The refusal behind the error, either way, if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            HandshakeError::Refused(r) | HandshakeError::Refusing(r) => Some(r),
            HandshakeError::Wire(_) => None,
        }
    }
}

/// What a side does next.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes and read the next message.
    Send(Vec<u8>),
    /// (Responder) the initiator's hello is in: answer it with [`Responder::answer`].
    Answer(Hello),
    /// Send these bytes (a refusal), then close: the handshake failed with the error.
    Refuse(Vec<u8>, HandshakeError),
    /// (Initiator) the handshake is complete; the responder's hello.
    Done(Hello),
}

/// The connecting side.
#[derive(Debug)]
pub struct Initiator {
    secret: Option<Secret>,
    nonce: [u8; NONCE_LEN],
    hello: Option<Hello>,
    expect: &'static [MsgKind],
}

impl Initiator {
    /// Starts a handshake that will send `hello` once the responder has proven itself; returns
    /// the first bytes to send.
    pub fn start(secret: Option<Secret>, nonce: [u8; NONCE_LEN], hello: Hello) -> (Self, Vec<u8>) {
        let hi = encode_hi(&Hi {
            auth: secret.is_some(),
            nonce,
            proof: Vec::new(),
        });
        let me = Initiator {
            secret,
            nonce,
            hello: Some(hello),
            expect: &[MsgKind::Hi, MsgKind::Refuse],
        };
        (me, hi)
    }

    /// The kinds the next message may be (for [`next_message`]).
    pub fn expects(&self) -> &'static [MsgKind] {
        self.expect
    }

    /// Takes the next message from the responder.
    pub fn on_message(&mut self, kind: MsgKind, body: &[u8]) -> Result<Step, HandshakeError> {
        if !self.expect.contains(&kind) {
            return Err(WireError::Malformed {
                what: "handshake",
                detail: format!("an unexpected {kind:?}"),
            }
            .into());
        }
        match kind {
            MsgKind::Refuse => Err(HandshakeError::Refused(decode_refusal(body)?)),
            MsgKind::Hi => {
                let hi = decode_hi(body)?;
                let proof = match (&self.secret, hi.auth) {
                    (Some(s), true) => {
                        if !s.check(Role::Responder, &self.nonce, &hi.nonce, &hi.proof) {
                            return Ok(refuse(
                                RefuseCode::AuthFailed,
                                "the peer's proof of the cluster secret does not check: it holds another secret",
                            ));
                        }
                        s.prove(Role::Initiator, &self.nonce, &hi.nonce).to_vec()
                    }
                    (Some(_), false) => {
                        return Ok(refuse(
                            RefuseCode::PeerUnauthenticated,
                            "the peer holds no cluster secret and this engine requires one",
                        ));
                    }
                    (None, _) => Vec::new(),
                };
                let hello = self.hello.take().expect("sent once");
                let mut out = encode_proof(&proof);
                out.extend_from_slice(&encode_hello(&hello));
                self.expect = &[MsgKind::Hello, MsgKind::Refuse];
                Ok(Step::Send(out))
            }
            MsgKind::Hello => {
                self.expect = &[];
                Ok(Step::Done(decode_hello_body(body)?))
            }
            MsgKind::Proof => unreachable!("never expected"),
        }
    }
}

/// The accepting side.
#[derive(Debug)]
pub struct Responder {
    secret: Option<Secret>,
    nonce: [u8; NONCE_LEN],
    theirs: [u8; NONCE_LEN],
    expect: &'static [MsgKind],
}

impl Responder {
    /// Waits for the initiator's `Hi`.
    pub fn new(secret: Option<Secret>, nonce: [u8; NONCE_LEN]) -> Self {
        Responder {
            secret,
            nonce,
            theirs: [0; NONCE_LEN],
            expect: &[MsgKind::Hi],
        }
    }

    /// The kinds the next message may be (for [`next_message`]).
    pub fn expects(&self) -> &'static [MsgKind] {
        self.expect
    }

    /// Whether the initiator has proven itself (or no secret is needed): from here on its
    /// hello, up to [`MAX_HELLO_BODY`], may be read.
    pub fn trusted(&self) -> bool {
        self.expect == [MsgKind::Hello]
    }

    /// Takes the next message from the initiator.
    pub fn on_message(&mut self, kind: MsgKind, body: &[u8]) -> Result<Step, HandshakeError> {
        if !self.expect.contains(&kind) {
            return Ok(refuse(
                RefuseCode::Malformed,
                &format!("an unexpected {kind:?} message"),
            ));
        }
        match kind {
            MsgKind::Hi => {
                let hi = match decode_hi(body) {
                    Ok(h) if h.proof.is_empty() => h,
                    Ok(_) => {
                        return Ok(refuse(
                            RefuseCode::Malformed,
                            "an initiator's hi carries no proof",
                        ));
                    }
                    Err(e) => return Ok(refuse(RefuseCode::Malformed, &e.to_string())),
                };
                let proof = match (&self.secret, hi.auth) {
                    (Some(s), _) => s.prove(Role::Responder, &hi.nonce, &self.nonce).to_vec(),
                    (None, _) => Vec::new(),
                };
                if self.secret.is_some() && !hi.auth {
                    return Ok(refuse(
                        RefuseCode::AuthRequired,
                        "this engine requires the cluster secret (KVT_SECRET or KVT_SECRET_FILE)",
                    ));
                }
                self.theirs = hi.nonce;
                self.expect = &[MsgKind::Proof, MsgKind::Refuse];
                Ok(Step::Send(encode_hi(&Hi {
                    auth: self.secret.is_some(),
                    nonce: self.nonce,
                    proof,
                })))
            }
            MsgKind::Refuse => Err(HandshakeError::Refused(decode_refusal(body)?)),
            MsgKind::Proof => {
                let proof = match decode_proof(body) {
                    Ok(p) => p,
                    Err(e) => return Ok(refuse(RefuseCode::Malformed, &e.to_string())),
                };
                if let Some(s) = &self.secret
                    && !s.check(Role::Initiator, &self.theirs, &self.nonce, &proof)
                {
                    return Ok(refuse(
                        RefuseCode::AuthFailed,
                        "the proof of the cluster secret does not check: the two engines hold different secrets",
                    ));
                }
                self.expect = &[MsgKind::Hello];
                Ok(Step::Send(Vec::new()))
            }
            MsgKind::Hello => match decode_hello_body(body) {
                Ok(h) => {
                    self.expect = &[];
                    Ok(Step::Answer(h))
                }
                Err(e) => Ok(refuse(RefuseCode::Malformed, &e.to_string())),
            },
        }
    }

    /// The bytes that answer the initiator's hello with ours.
    pub fn answer(&self, hello: &Hello) -> Vec<u8> {
        encode_hello(hello)
    }
}

/// A refusal step: the bytes to send and the error it ends in.
pub fn refuse(code: RefuseCode, text: &str) -> Step {
    let r = Refusal {
        code,
        text: text.to_string(),
    };
    Step::Refuse(encode_refusal(&r), HandshakeError::Refusing(r))
}
