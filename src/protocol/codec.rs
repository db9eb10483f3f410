//! Frames: a 4-byte big-endian length, then that many bytes. Built on tokio-util's
//! length-delimited codec, with the two failures a caller must be told about kept apart: a frame
//! declared larger than the limit, and a stream that ends inside a frame.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame ({have} of {want} bytes received)")]
    Truncated { have: usize, want: usize },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: usize,
    /// Declared length of the frame whose header has been read and whose body has not.
    pending: Option<usize>,
}

impl FrameCodec {
    pub fn new(max: usize) -> FrameCodec {
        FrameCodec {
            inner: LengthDelimitedCodec::builder()
                .length_field_length(4)
                .big_endian()
                .max_frame_length(max)
                .new_codec(),
            max,
            pending: None,
        }
    }
}

fn declared_len(buf: &BytesMut) -> Option<usize> {
    let head: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(head) as usize)
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if self.pending.is_none() {
            if let Some(len) = declared_len(buf) {
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                self.pending = Some(len);
            }
        }
        let frame = self.inner.decode(buf)?;
        if frame.is_some() {
            self.pending = None;
        }
        Ok(frame)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None => match self.pending {
                Some(want) => Err(FrameError::Truncated {
                    have: buf.len(),
                    want,
                }),
                None if buf.is_empty() => Ok(None),
                None => Err(FrameError::Truncated {
                    have: 0,
                    want: buf.len().max(4),
                }),
            },
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        if item.len() > self.max {
            return Err(FrameError::TooLarge {
                len: item.len(),
                max: self.max,
            });
        }
        Ok(self.inner.encode(item, dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut c = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        c.encode(Bytes::from_static(b"hello"), &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
        assert_eq!(&c.decode(&mut buf).unwrap().unwrap()[..], b"hello");

        let mut big = BytesMut::from(&[0u8, 0, 0, 17][..]);
        assert!(matches!(
            c.decode(&mut big),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        ));

        let mut c = FrameCodec::new(16);
        // A body whose first bytes would read as an over-limit length is still a body.
        let mut split = BytesMut::from(&[0u8, 0, 0, 9, 0xff, 0xff][..]);
        assert!(c.decode(&mut split).unwrap().is_none());
        split.extend_from_slice(&[0xff, 0xff, 1, 2, 3, 4, 5]);
        assert_eq!(c.decode(&mut split).unwrap().unwrap().len(), 9);

        let mut short = BytesMut::from(&[0u8, 0, 0, 9, 1, 2][..]);
        assert!(c.decode(&mut short).unwrap().is_none());
        assert!(matches!(
            c.decode_eof(&mut short),
            Err(FrameError::Truncated { have: 2, want: 9 })
        ));
        assert!(FrameCodec::new(16)
            .decode_eof(&mut BytesMut::new())
            .unwrap()
            .is_none());
    }
}
