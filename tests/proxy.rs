//! The black-holing TCP proxy of the partition tests (`tests/support/proxy.rs`): data flows
//! while forwarding, a stall stops it both ways while connections stay open, a reset closes
//! them, healing resumes stalled connections with the data held back, and dropping the proxy
//! closes everything.

mod support;

use std::time::Duration;

use support::proxy::{Mode, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// A target server the test controls: each accepted connection's server side.
async fn target() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind target")
}

/// A client connected through `proxy`, with the target's side of the same connection.
async fn pair(proxy: &Proxy, target: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (server, _) = timeout(Duration::from_secs(5), target.accept())
        .await
        .expect("proxy did not connect onwards")
        .expect("accept");
    (client, server)
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("data did not arrive within 5 s")
        .expect("read");
    buf
}

/// Whether nothing at all (neither data nor EOF nor error) arrives within `d`.
async fn silent_for(s: &mut TcpStream, d: Duration) -> bool {
    let mut buf = [0u8; 64];
    timeout(d, s.read(&mut buf)).await.is_err()
}

/// Whether the stream is closed (EOF or reset) within 5 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Data still in flight before the close.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn forwards_both_ways_and_passes_half_close() {
    let t = target().await;
    let proxy = Proxy::start(t.local_addr().unwrap());
    assert_eq!(proxy.mode(), Mode::Forward);
    let (mut c, mut s) = pair(&proxy, &t).await;
    c.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut s, 4).await, b"ping");
    // More than one buffer's worth, both ways.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut sr, mut sw) = s.split();
    let send = async {
        c.write_all(&big).await.unwrap();
    };
    let recv = async {
        let mut got = vec![0u8; big.len()];
        sr.read_exact(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::join!(send, recv);
    assert_eq!(got, big);
    sw.write_all(b"pong").await.unwrap();
    assert_eq!(read_exactly(&mut c, 4).await, b"pong");
    // The client closes its side: the target sees EOF and can still answer.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("EOF not passed on")
        .unwrap();
    assert!(rest.is_empty());
    s.write_all(b"bye").await.unwrap();
    drop(s);
    let mut tail = Vec::new();
    timeout(Duration::from_secs(5), c.read_to_end(&mut tail))
        .await
        .expect("answer after half-close")
        .unwrap();
    assert_eq!(tail, b"bye");
    assert_eq!(proxy.bytes_forwarded(), (4 + 200_000, 4 + 3));
}

#[tokio::test]
async fn stall_forwards_nothing_either_way_and_keeps_connections_open() {
    let t = target().await;
    let proxy = Proxy::start(t.local_addr().unwrap());
    let (mut c, mut s) = pair(&proxy, &t).await;
    c.write_all(b"a").await.unwrap();
    assert_eq!(read_exactly(&mut s, 1).await, b"a");

    proxy.stall();
    assert_eq!(proxy.mode(), Mode::Stall);
    c.write_all(b"from-client").await.unwrap();
    s.write_all(b"from-server").await.unwrap();
    // Neither side gets data, an EOF or an error: the connection looks alive and silent.
    assert!(silent_for(&mut s, Duration::from_millis(700)).await);
    assert!(silent_for(&mut c, Duration::from_millis(100)).await);
    assert_eq!(proxy.open_connections(), 1);
    assert_eq!(proxy.bytes_forwarded(), (1, 0));
    // A new connection is accepted but not connected onwards.
    let mut c2 = TcpStream::connect(proxy.addr())
        .await
        .expect("a stalled proxy still accepts");
    c2.write_all(b"second").await.unwrap();
    assert!(
        timeout(Duration::from_millis(500), t.accept())
            .await
            .is_err(),
        "a connection accepted during the stall reached the target"
    );
    assert!(silent_for(&mut c2, Duration::from_millis(100)).await);
    assert_eq!(proxy.open_connections(), 2);
    assert_eq!(proxy.upstream_connects(), 1);

    // Heal: the held-back data arrives, in order, and the new connection goes through.
    proxy.heal();
    assert_eq!(read_exactly(&mut s, 11).await, b"from-client");
    assert_eq!(read_exactly(&mut c, 11).await, b"from-server");
    let (mut s2, _) = timeout(Duration::from_secs(5), t.accept())
        .await
        .expect("the stalled new connection was not connected after healing")
        .unwrap();
    assert_eq!(read_exactly(&mut s2, 6).await, b"second");
    s2.write_all(b"ok").await.unwrap();
    assert_eq!(read_exactly(&mut c2, 2).await, b"ok");
    c.write_all(b"after").await.unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"after");
}

#[tokio::test]
async fn a_stall_stops_a_large_transfer_midway() {
    let t = target().await;
    let proxy = Proxy::start(t.local_addr().unwrap());
    let (c, mut s) = pair(&proxy, &t).await;
    let big: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
    let writer = {
        let big = big.clone();
        tokio::spawn(async move {
            let mut c = c;
            c.write_all(&big).await.unwrap();
            c
        })
    };
    let mut got = vec![0u8; 100_000];
    timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    proxy.stall();
    // Drain what was already on its way, then nothing more comes.
    let mut all = got;
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(Ok(n)) = timeout(Duration::from_millis(300), s.read(&mut buf)).await {
        assert!(n > 0, "EOF during a stall");
        all.extend_from_slice(&buf[..n]);
    }
    let received = all.len();
    let (to_target, _) = proxy.bytes_forwarded();
    assert!(silent_for(&mut s, Duration::from_millis(500)).await);
    assert_eq!(proxy.bytes_forwarded().0, to_target);
    assert!(
        received < big.len(),
        "the whole transfer got through a stall"
    );
    proxy.heal();
    let mut rest = vec![0u8; big.len() - received];
    timeout(Duration::from_secs(20), s.read_exact(&mut rest))
        .await
        .expect("the transfer did not resume")
        .unwrap();
    all.extend_from_slice(&rest);
    let _ = writer.await.unwrap();
    assert!(
        all == big,
        "the resumed transfer is not the data sent, in order"
    );
}

#[tokio::test]
async fn reset_closes_current_and_new_connections_until_healed() {
    let t = target().await;
    let proxy = Proxy::start(t.local_addr().unwrap());
    let (mut c, mut s) = pair(&proxy, &t).await;
    // A stalled connection is reset too.
    proxy.stall();
    c.write_all(b"x").await.unwrap();
    proxy.reset();
    assert!(closed(&mut c).await, "client side not closed by reset");
    assert!(closed(&mut s).await, "target side not closed by reset");
    // New connections are accepted and closed at once, never reaching the target.
    // (The reset may already arrive while connect() completes.)
    if let Ok(mut c2) = TcpStream::connect(proxy.addr()).await {
        assert!(
            closed(&mut c2).await,
            "new connection not closed during reset"
        );
    }
    assert!(proxy.accepted() >= 2);
    assert!(timeout(Duration::from_millis(300), t.accept())
        .await
        .is_err());
    assert!(support::wait_until(Duration::from_secs(5), || proxy
        .open_connections()
        == 0));
    proxy.heal();
    let (mut c3, mut s3) = pair(&proxy, &t).await;
    c3.write_all(b"back").await.unwrap();
    assert_eq!(read_exactly(&mut s3, 4).await, b"back");
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let t = target().await;
    let proxy = Proxy::start(t.local_addr().unwrap());
    let port = proxy.port();
    let (mut c, mut s) = pair(&proxy, &t).await;
    proxy.stall();
    let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
    drop(proxy);
    assert!(closed(&mut c).await);
    assert!(closed(&mut s).await);
    assert!(closed(&mut c2).await);
    assert!(!support::port_open(port), "listener still open after drop");
}

#[test]
fn works_without_a_runtime_and_switches_from_any_thread() {
    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(t.local_addr().unwrap());
    let mut c = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let (mut s, _) = t.accept().unwrap();
    use std::io::{Read, Write};
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
    std::thread::scope(|sc| {
        sc.spawn(|| proxy.set_mode(Mode::Reset));
    });
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    let r = c.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    if let Err(e) = r {
        assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "not closed");
    }
}
