//! Peers that misbehave: garbage, silence, malformed frames, lies about
//! sequence numbers. Each is cut off with an error; the listener keeps
//! serving honest peers. Plus certificate rotation without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dwcp_transport::frame::{Decoder, Frame};
use dwcp_transport::identity::{init_ca, issue_node};
use dwcp_transport::{Chunk, Class, Listener, NodeIdentity, Session, Streams, TransportConfig};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tmp");
        init_ca(&dir.path().join("ca"), Duration::from_secs(86400)).expect("ca");
        for n in ["alpha", "beta"] {
            issue_node(
                &dir.path().join("ca"),
                n,
                &dir.path().join(n),
                Duration::from_secs(3600),
            )
            .expect("issue");
        }
        Pki { dir }
    }
    fn id(&self, n: &str) -> Arc<NodeIdentity> {
        NodeIdentity::load(&self.dir.path().join(n)).expect("identity")
    }
}

fn cfg() -> TransportConfig {
    TransportConfig {
        streams: Streams::Fixed(2),
        handshake_timeout: Duration::from_secs(1),
        window_bytes: 4 << 20,
        ..TransportConfig::default()
    }
}

async fn listener(pki: &Pki) -> Listener {
    Listener::bind("127.0.0.1:0".parse().expect("addr"), &pki.id("beta"), cfg())
        .await
        .expect("bind")
}

/// An honest transfer still works (the listener survived).
async fn honest_transfer(pki: &Pki, l: &Listener) {
    let s = Session::connect(l.local_addr(), &pki.id("alpha"), Some("beta"), cfg())
        .await
        .expect("connect");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expect = data.clone();
    let recv = async {
        // Transfers left behind by misbehaving peers come first; skip them.
        let mut inc = loop {
            let inc = l.accept().await.expect("incoming");
            if inc.name == "honest" {
                break inc;
            }
        };
        let mut got = Vec::new();
        loop {
            match inc.chunks.recv().await {
                Some(Chunk::Data(d)) => got.extend_from_slice(&d),
                Some(Chunk::Done { bytes, .. }) => {
                    assert_eq!(bytes as usize, got.len());
                    return got;
                }
                None => panic!("transfer abandoned"),
            }
        }
    };
    let send = s.send(
        "honest",
        Class::Migration,
        data.len() as u64,
        &data[..],
        |_| {},
    );
    let (got, rep) = tokio::join!(recv, send);
    let rep = rep.expect("sent");
    assert_eq!(got, expect);
    assert_eq!(rep.bytes, expect.len() as u64);
    s.close();
}

/// A TLS connection with a valid certificate, for sending raw frames.
async fn raw_tls(pki: &Pki, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = pki
        .id("alpha")
        .client_config(Some("beta"))
        .expect("client config");
    let tcp = TcpStream::connect(addr).await.expect("tcp");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("beta").expect("name"), tcp)
        .await
        .expect("tls")
}

/// Reads until the server closes; returns any Close reason it sent.
async fn closed_with(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> Option<String> {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 65536];
    let mut reason = None;
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dec.push(&buf[..n]);
                    while let Ok(Some(f)) = dec.next_frame() {
                        if let Frame::Close { reason: r } = f {
                            reason = Some(r);
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server must close the connection");
    reason
}

fn frame(f: Frame) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

#[tokio::test]
async fn garbage_and_silent_peers_are_cut_off() {
    let pki = Pki::new();
    let l = listener(&pki).await;
    // Not TLS at all.
    let mut t = TcpStream::connect(l.local_addr()).await.expect("tcp");
    t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match t.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "garbage peer not cut off");
    // Slowloris: connects, says nothing; cut off after the handshake timeout.
    let mut t = TcpStream::connect(l.local_addr()).await.expect("tcp");
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "silent peer not cut off: {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    honest_transfer(&pki, &l).await;
}

#[tokio::test]
async fn malformed_and_lying_frames_close_the_connection() {
    let pki = Pki::new();
    let l = listener(&pki).await;
    let hello = frame(Frame::Hello {
        session: [9; 16],
        conn: 0,
    });
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad magic",
            b"\x00\x01\x02\x03\x04\x05\x06\x07".to_vec(),
            "magic",
        ),
        (
            "oversized",
            vec![0xA4, 0x57, 4, 0, 0x7f, 0xff, 0xff, 0xff],
            "over the limit",
        ),
        (
            "data for a transfer never opened",
            frame(Frame::Data {
                transfer: 5,
                seq: 0,
                fin: false,
                payload: vec![1; 10],
            }),
            "never opened",
        ),
        (
            "sequence far beyond the window",
            [
                frame(Frame::Open {
                    transfer: 1,
                    class: 1,
                    size_hint: 0,
                    name: "x".into(),
                }),
                frame(Frame::Data {
                    transfer: 1,
                    seq: 1_000_000,
                    fin: false,
                    payload: vec![0; 1 << 20],
                }),
                frame(Frame::Data {
                    transfer: 1,
                    seq: 2_000_000,
                    fin: false,
                    payload: vec![0; 1 << 20],
                }),
                frame(Frame::Data {
                    transfer: 1,
                    seq: 3_000_000,
                    fin: false,
                    payload: vec![0; 1 << 20],
                }),
                frame(Frame::Data {
                    transfer: 1,
                    seq: 4_000_000,
                    fin: false,
                    payload: vec![0; 1 << 20],
                }),
                frame(Frame::Data {
                    transfer: 1,
                    seq: 5_000_000,
                    fin: false,
                    payload: vec![0; 1 << 20],
                }),
            ]
            .concat(),
            "beyond the window",
        ),
        (
            "unknown class",
            frame(Frame::Open {
                transfer: 1,
                class: 77,
                size_hint: 0,
                name: "x".into(),
            }),
            "unknown class",
        ),
        (
            "a frame only a receiver sends",
            frame(Frame::Ack {
                transfer: 1,
                next_seq: 3,
            }),
            "unexpected ack",
        ),
    ];
    for (i, (what, bytes, want)) in cases.into_iter().enumerate() {
        let mut s = raw_tls(&pki, l.local_addr()).await;
        let mut h = hello.clone();
        h[8] = i as u8; // a session of its own
        s.write_all(&h).await.expect("hello");
        let _ = s.write_all(&bytes).await;
        let _ = s.flush().await;
        let reason = closed_with(&mut s).await.unwrap_or_default();
        assert!(reason.contains(want), "{what}: closed with {reason:?}");
    }
    // A Data frame before the Hello is refused too.
    let mut s = raw_tls(&pki, l.local_addr()).await;
    s.write_all(&frame(Frame::Ack {
        transfer: 0,
        next_seq: 0,
    }))
    .await
    .expect("write");
    closed_with(&mut s).await;
    honest_transfer(&pki, &l).await;
}

#[tokio::test]
async fn certificate_rotation_needs_no_restart() {
    let pki = Pki::new();
    let beta = pki.id("beta");
    let l = Listener::bind("127.0.0.1:0".parse().expect("addr"), &beta, cfg())
        .await
        .expect("bind");
    let before = beta.not_after().expect("expiry");
    honest_transfer(&pki, &l).await;
    // Reissue beta's certificate in place with a longer life.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    issue_node(
        &pki.dir.path().join("ca"),
        "beta",
        &pki.dir.path().join("beta"),
        Duration::from_secs(7200),
    )
    .expect("reissue");
    honest_transfer(&pki, &l).await;
    let after = beta.not_after().expect("expiry");
    assert!(
        after > before + Duration::from_secs(3000),
        "the new certificate was not picked up"
    );
}

/// Padding (what a connection's first write after an idle spell starts
/// with) is taken and ignored, anywhere between frames.
#[tokio::test]
async fn padding_is_ignored() {
    let pki = Pki::new();
    let l = listener(&pki).await;
    let mut s = raw_tls(&pki, l.local_addr()).await;
    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let mut out = frame(Frame::Hello {
        session: [3; 16],
        conn: 0,
    });
    for f in [
        Frame::Pad { len: 3000 },
        Frame::Open {
            transfer: 1,
            class: 1,
            size_hint: payload.len() as u64,
            name: "padded".into(),
        },
        Frame::Pad { len: 0 },
        Frame::Data {
            transfer: 1,
            seq: 0,
            fin: true,
            payload: payload.clone(),
        },
    ] {
        out.extend(frame(f));
    }
    s.write_all(&out).await.expect("write");
    s.flush().await.expect("flush");
    let mut inc = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the transfer must open")
        .expect("incoming");
    assert_eq!(inc.name, "padded");
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inc.chunks.recv())
            .await
            .expect("the transfer must complete")
        {
            Some(Chunk::Data(d)) => got.extend_from_slice(&d),
            Some(Chunk::Done { .. }) => break,
            None => panic!("the transfer was abandoned: padding refused?"),
        }
    }
    assert_eq!(got, payload);
}
