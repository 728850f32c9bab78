//! Socket helpers shared by the SDK and the broker.

use bytes::Buf;
use std::io::IoSlice;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Frames handed to one vectored write at most.
const SLICES_MAX: usize = 64;

/// Writes every frame in `frames` with vectored writes (many frames per
/// system call) and flushes, then empties `frames`.
///
/// # Errors
/// The first write error; the connection is then unusable and `frames`
/// holds an unspecified remainder.
pub async fn write_frames<W: AsyncWrite + Unpin, B: Buf>(
    w: &mut W,
    frames: &mut Vec<B>,
) -> std::io::Result<()> {
    let mut at = 0;
    while at < frames.len() {
        let mut slices = [IoSlice::new(&[]); SLICES_MAX];
        let n = frames.len().min(at + SLICES_MAX) - at;
        for (slot, frame) in slices.iter_mut().zip(&frames[at..at + n]) {
            debug_assert_eq!(
                frame.chunk().len(),
                frame.remaining(),
                "a frame is contiguous"
            );
            *slot = IoSlice::new(frame.chunk());
        }
        let mut written = w.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let front = &mut frames[at];
            if written >= front.remaining() {
                written -= front.remaining();
                at += 1;
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    frames.clear();
    // TLS seals records in its session's buffer: out to the socket now.
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn all_frames_arrive_in_order_through_partial_writes() {
        // A tiny duplex buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let expected: Vec<u8> = (0..200u8).collect();
        let mut frames: Vec<Bytes> = expected.chunks(13).map(Bytes::copy_from_slice).collect();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 200];
            b.read_exact(&mut got).await.map(|_| got)
        });
        write_frames(&mut a, &mut frames).await.expect("writes");
        assert!(frames.is_empty());
        assert_eq!(reader.await.expect("joins").expect("reads"), expected);
    }
}
