//! Batched reads and GSO sends through quinn-udp on a tokio socket, as the agent's data plane
//! drives its socket. (The relay's forwarding thread calls quinn-udp itself under a
//! level-triggered `epoll`, where a short read needs no readiness bookkeeping.)

use std::io::{self, IoSliceMut};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// What one batched read returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Buffers filled (each a datagram or a GRO train), from the first.
    pub count: usize,
    /// The socket's queue ran dry (the batch came back short): its readiness is cleared, and a
    /// datagram arriving since is a new edge for the poller that wakes the reader again.
    pub drained: bool,
}

/// Reads up to `bufs.len()` datagrams or GRO trains (at most [`quinn_udp::BATCH_SIZE`]) with one
/// `recvmmsg`, without waiting. A short batch reports `drained` and clears the readiness, as an
/// empty one does (`count` 0): the reader goes back to waiting without one more read that would
/// find nothing. Errors are the socket's (e.g. an ICMP error for an earlier send).
pub fn recv_batch(
    socket: &UdpSocket,
    state: &UdpSocketState,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> io::Result<Received> {
    let wanted = bufs.len().min(meta.len()).min(quinn_udp::BATCH_SIZE);
    let mut count = 0;
    let read = socket.try_io(Interest::READABLE, || {
        count = state.recv(socket.into(), bufs, meta)?;
        if count < wanted {
            // Reported as "would block" so tokio clears the readiness now.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match read {
        Ok(()) => Ok(Received {
            count,
            drained: false,
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received {
            count,
            drained: true,
        }),
        Err(e) => Err(e),
    }
}

/// Sends `transmit` (one datagram, or a GSO train when it has a `segment_size`), waiting while
/// the socket's send buffer is full. Errors are the socket's; the caller decides whether one
/// matters (a relay or an agent carries on).
pub async fn send(
    socket: &UdpSocket,
    state: &UdpSocketState,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    loop {
        match socket.try_io(Interest::WRITABLE, || state.send(socket.into(), transmit)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiving and a sending socket on loopback, the sender connected to the receiver.
    async fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        tx.connect(rx.local_addr().expect("addr"))
            .await
            .expect("connect");
        (rx, tx)
    }

    #[tokio::test]
    async fn a_short_batch_is_drained_and_a_full_one_is_not() {
        let (rx, tx) = pair().await;
        let state = UdpSocketState::new((&rx).into()).expect("state");
        let mut bufs = vec![vec![0u8; 64]; 4];
        let mut meta = vec![RecvMeta::default(); 4];
        // Different lengths, so GRO (where the kernel applies it) cannot merge them.
        for i in 0..6u8 {
            tx.send(&vec![i; 10 + usize::from(i)]).await.expect("send");
        }
        rx.readable().await.expect("readable");
        let mut iovs: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let first = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((first.count, first.drained), (4, false));
        assert_eq!(meta[0].len, 10);
        let second = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((second.count, second.drained), (2, true));
        assert_eq!(meta[1].len, 15);
        // Empty is drained too; a new datagram makes the socket readable again.
        let third = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((third.count, third.drained), (0, true));
        tx.send(b"again").await.expect("send");
        rx.readable().await.expect("readable again");
        let fourth = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((fourth.count, fourth.drained), (1, true));
    }

    #[tokio::test]
    async fn send_delivers_a_gso_train_as_datagrams() {
        // The receiver has no quinn-udp state, so no UDP_GRO: the train arrives split.
        let (rx, tx) = pair().await;
        let tx_state = UdpSocketState::new((&tx).into()).expect("state");
        let to = rx.local_addr().expect("addr");
        let train = [7u8; 30];
        let segment_size = (tx_state.max_gso_segments() > 1).then_some(10);
        send(
            &tx,
            &tx_state,
            &Transmit {
                destination: to,
                ecn: None,
                contents: &train,
                segment_size,
                src_ip: None,
            },
        )
        .await
        .expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.iter().sum::<usize>() < train.len() {
            got.push(rx.recv(&mut buf).await.expect("recv"));
        }
        let want = if segment_size.is_some() {
            vec![10, 10, 10]
        } else {
            vec![30]
        };
        assert_eq!(got, want);
    }
}
