//! Length-prefixed frames: a 4-byte big-endian body length, then a postcard body.
//!
//! The reader checks the length against [`MAX_FRAME_LEN`] before allocating, so a hostile
//! peer cannot make us reserve gigabytes with four bytes.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame body accepted or produced (4 MiB).
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a body larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended cleanly between frames.
    #[error("stream closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Transport error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` into a frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Decodes one whole frame from a byte slice: `Ok(None)` if more bytes are needed.
/// Returns the message and the number of bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((decode(&buf[4..4 + len])?, 4 + len)))
}

/// Reads one frame from an async stream.
pub async fn read<T, R>(r: &mut R) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode(&body)
}

/// Writes one frame to an async stream.
pub async fn write<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    fn sample_msg() -> ServerMsg {
        ServerMsg::Samples {
            round: 7,
            samples: vec![SyntheticSample {
                id: 1,
                text: "a fine film".into(),
                label: 1,
            }],
            last: true,
        }
    }

    #[test]
    fn roundtrip() {
        let m = sample_msg();
        let f = encode(&m).unwrap();
        let (back, used): (ServerMsg, usize) = decode_frame(&f).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(used, f.len());
        assert!(
            decode_frame::<ServerMsg>(&f[..f.len() - 1])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut f = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_frame::<ServerMsg>(&f),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        assert!(matches!(
            decode::<ClientMsg>(&[0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        let mut body = postcard::to_stdvec(&sample_msg()).unwrap();
        body.push(0);
        assert!(matches!(
            decode::<ServerMsg>(&body),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn hello_version_is_readable_first() {
        // Hello is variant 0 and its version comes first: byte 0 = tag, then a varint.
        let body = postcard::to_stdvec(&ClientMsg::Hello {
            version: 300,
            info: ClientInfo {
                name: "x".into(),
                slm_arch: "minilm".into(),
                n_private: 1,
            },
        })
        .unwrap();
        assert_eq!(body[0], 0);
        let (v, _): (u16, _) = postcard::take_from_bytes(&body[1..]).unwrap();
        assert_eq!(v, 300);
    }

    #[tokio::test]
    async fn async_read_write() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write(&mut a, &sample_msg()).await.unwrap();
        drop(a);
        let m: ServerMsg = read(&mut b).await.unwrap();
        assert_eq!(m, sample_msg());
        assert!(matches!(
            read::<ServerMsg, _>(&mut b).await,
            Err(FrameError::Closed)
        ));
    }
}
