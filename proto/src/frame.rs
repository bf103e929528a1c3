//! Framing: a 4-byte big-endian length, then one MessagePack [`Message`].
//!
//! ```text
//! +----------------+-----------------------------+
//! | len: u32 (BE)  | rmp-serde(Message), len B   |
//! +----------------+-----------------------------+
//! ```
//!
//! [`FrameCodec::decode`] first checks whether a whole frame is buffered
//! (`Ok(None)`: read more), then rejects a frame longer than the limit
//! before reading it, then decodes. A frame that does not decode is a
//! [`ProtoError::Malformed`]: the connection is closed, nothing is applied.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::message::Message;

/// Default largest frame accepted once a session is authenticated: 8 MiB.
/// Larger entries travel in chunks ([`crate::EntryChunk`]).
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// Largest frame accepted before the peer is authenticated (the handshake):
/// nothing large is read from a peer nobody knows yet.
pub const HANDSHAKE_MAX_FRAME: usize = 256 * 1024;

/// Smallest frame limit a peer may ask for: below it, chunk headers and
/// handshakes would not fit.
pub const MIN_MAX_FRAME: usize = 64 * 1024;

/// Errors of the link protocol. All of them close the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The peer announced a frame larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    /// The bytes are not a message of this protocol.
    #[error("malformed frame: {source}")]
    Malformed {
        #[source]
        source: rmp_serde::decode::Error,
    },
    /// A message could not be encoded.
    #[error("could not encode message")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-delimited MessagePack codec with a frame size limit.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec that accepts frames up to `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// Changes the limit (after the handshake agreed on one).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The current limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(ProtoError::FrameTooLarge { len, max: self.max_frame });
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len);
        rmp_serde::from_slice(&body)
            .map(Some)
            .map_err(|source| ProtoError::Malformed { source })
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let body = rmp_serde::to_vec(&msg)?;
        if body.len() > self.max_frame {
            return Err(ProtoError::FrameTooLarge { len: body.len(), max: self.max_frame });
        }
        dst.reserve(4 + body.len());
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{EntryChunk, WireEntry};
    use proptest::prelude::*;

    fn encoded(msg: Message) -> BytesMut {
        let mut b = BytesMut::new();
        FrameCodec::default().encode(msg, &mut b).unwrap();
        b
    }

    #[test]
    fn a_frame_arriving_byte_by_byte_decodes_once_whole() {
        let full = encoded(Message::Ack { pos: 77 });
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, byte) in full.iter().enumerate() {
            buf.put_u8(*byte);
            let got = codec.decode(&mut buf).unwrap();
            if i + 1 < full.len() {
                assert!(got.is_none(), "decoded early at byte {i}");
            } else {
                assert_eq!(got, Some(Message::Ack { pos: 77 }));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_u32(1_000_000);
        match codec.decode(&mut buf) {
            Err(ProtoError::FrameTooLarge { len: 1_000_000, max: 16 }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.extend_from_slice(&[0xc1, 0xff, 0x00, 0x13, 0x37]);
        assert!(matches!(codec.decode(&mut buf), Err(ProtoError::Malformed { .. })));
    }

    fn any_message() -> impl Strategy<Value = Message> {
        let entry = (any::<u64>(), any::<u32>(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(pos, part, last, body)| WireEntry { pos, part, last, body });
        prop_oneof![
            any::<u64>().prop_map(|pos| Message::Ack { pos }),
            any::<u64>().prop_map(|consumed| Message::Credit { consumed }),
            (any::<i64>(), any::<u64>()).prop_map(|(now_us, log_newest)| Message::Heartbeat { now_us, log_newest }),
            proptest::collection::vec(entry, 0..5).prop_map(Message::Entries),
            (any::<u64>(), any::<u32>(), any::<bool>(), any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 1..300))
                .prop_map(|(pos, part, last, total, offset, data)| Message::Chunk(EntryChunk { pos, part, last, total, offset, data })),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        /// Input from the network: a valid handshake with bytes changed
        /// anywhere after its length is an error or a message, never a panic.
        #[test]
        fn random_bytes_never_panic_the_decoder(changes in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4)) {
            let mut bytes = encoded(Message::Hello(crate::message::tests::sample_hello())).to_vec();
            let body = bytes.len() - 4;
            for (i, b) in changes {
                bytes[4 + i.index(body)] = b;
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameCodec::default().decode(&mut buf);
        }

        /// Whatever is sent arrives as sent, however the stream cuts it:
        /// two frames split at any byte decode to the two messages, in order.
        #[test]
        fn messages_survive_any_split_of_the_stream(a in any_message(), b in any_message(), cut in any::<proptest::sample::Index>()) {
            let mut stream = encoded(a.clone());
            stream.extend_from_slice(&encoded(b.clone()));
            let at = cut.index(stream.len() + 1);
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::from(&stream[..at]);
            let mut got = Vec::new();
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                got.push(m);
            }
            buf.extend_from_slice(&stream[at..]);
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                got.push(m);
            }
            prop_assert_eq!(got, vec![a, b]);
            prop_assert!(buf.is_empty());
        }
    }
}
