//! The device link's TLS stream, on rustls's unbuffered API (issue 8).
//!
//! `tokio_rustls` drives a buffered `rustls::ServerConnection`, which keeps
//! a 4 KiB record buffer allocated for the connection's whole life, idle
//! or not: a quarter of what an idle device link cost. Here the buffers
//! are ours: TLS bytes read from the socket are kept only while they hold
//! a partial record, plaintext only until the link read it, and outgoing
//! TLS bytes only until the socket took them. Between frames an idle link
//! holds none of them; a read uses a stack buffer.
//!
//! The protocol is rustls's own (the same `ServerConfig`, handshake, alerts,
//! key updates and close_notify); this module only moves bytes between
//! the socket and [`UnbufferedServerConnection`] and exposes the result as
//! [`AsyncRead`] + [`AsyncWrite`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most TLS bytes held from the device at once during the handshake: one
/// handshake message of rustls's limit (64 KiB) split over records, plus a
/// record header's worth of slack.
const MAX_INCOMING_HANDSHAKE: usize = 0x1_0000 + 2 * 0x4805;
/// Most TLS bytes held from the device at once after the handshake: one
/// record (RFC 8446 §5.2: at most 2^14 + 256 bytes of ciphertext, plus the
/// 5-byte header; rustls refuses longer ones). Between frames the buffer
/// holds less than one record, since every whole record is processed
/// before more is read.
const MAX_INCOMING_TRAFFIC: usize = 0x4805;
/// Bytes read from the socket per read (on the stack).
const READ_CHUNK: usize = 4096;

/// Where the connection stands after processing what was received.
enum Status {
    /// The handshake needs more bytes from the device.
    NeedData,
    /// Application data may be read and written.
    Traffic,
    /// Both sides closed.
    Closed,
}

/// A device link's mutual-TLS stream.
pub struct DeviceTls {
    conn: UnbufferedServerConnection,
    tcp: TcpStream,
    /// Received TLS bytes not yet processed (a partial record at most).
    incoming: Vec<u8>,
    /// TLS bytes to send; the first `outgoing_sent` are sent.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    /// Decrypted bytes; the first `plain_read` were read.
    plain: Vec<u8>,
    plain_read: usize,
    /// The device sent close_notify or ended the TCP stream.
    eof: bool,
    /// Our close_notify is queued.
    closing: bool,
    /// rustls reported an error. Its unbuffered API does not remember that
    /// itself: processing again would parse the same bad bytes once more
    /// (and queue a second fatal alert), so nothing reaches rustls after it.
    failed: bool,
    /// The fatal alert after `failed` was taken from rustls (once only).
    alerted: bool,
}

/// Appends the TLS bytes rustls has to send (handshake messages, alerts)
/// to `out`, sized by rustls's own answer; on failure `out` is unchanged.
fn encode_into<Data>(out: &mut Vec<u8>, encode: &mut rustls::unbuffered::EncodeTlsData<'_, Data>) -> Result<(), EncodeError> {
    let start = out.len();
    let written = match encode.encode(&mut []) {
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(start + required_size, 0);
            encode.encode(&mut out[start..])
        }
        other => other,
    };
    out.truncate(start + *written.as_ref().unwrap_or(&0));
    written.map(|_| ())
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs the server side of the TLS handshake on `tcp` (the caller bounds
/// it in time). On failure the alert rustls chose is sent, best effort.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Box<DeviceTls>> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut tls = Box::new(DeviceTls {
        conn,
        tcp,
        incoming: Vec::new(),
        outgoing: Vec::new(),
        outgoing_sent: 0,
        plain: Vec::new(),
        plain_read: 0,
        eof: false,
        closing: false,
        failed: false,
        alerted: false,
    });
    loop {
        match tls.process() {
            Ok(Status::NeedData) => {
                std::future::poll_fn(|cx| tls.poll_send(cx)).await?;
                if std::future::poll_fn(|cx| tls.poll_fill(cx)).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the device closed the connection in the handshake"));
                }
            }
            Ok(Status::Traffic) => {
                std::future::poll_fn(|cx| tls.poll_send(cx)).await?;
                return Ok(tls);
            }
            Ok(Status::Closed) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the device closed the connection in the handshake"))
            }
            Err(e) => {
                tls.queue_alert();
                let _ = std::future::poll_fn(|cx| tls.poll_send(cx)).await;
                return Err(e);
            }
        }
    }
}

impl DeviceTls {
    /// The device's certificate chain, as verified in the handshake.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Processes the received bytes until rustls needs more of them or
    /// application data may flow: handshake and post-handshake records are
    /// answered into `outgoing`, application data goes to `plain`.
    fn process(&mut self) -> io::Result<Status> {
        if self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the TLS connection failed"));
        }
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut self.incoming);
            let outcome = match state {
                Err(e) => Some(Err(invalid(e))),
                Ok(ConnectionState::ReadTraffic(mut read)) => {
                    let mut failed = None;
                    while let Some(record) = read.next_record() {
                        match record {
                            // rustls's contract: a record's own discard adds to the status's.
                            Ok(record) => {
                                discard += record.discard;
                                self.plain.extend_from_slice(record.payload);
                            }
                            Err(e) => {
                                failed = Some(Err(invalid(e)));
                                break;
                            }
                        }
                    }
                    failed
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.outgoing, &mut encode).err().map(|e| Err(io::Error::other(e)))
                }
                // The bytes are in `outgoing` and leave in order before
                // anything encoded later.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Ok(Status::NeedData)),
                Ok(ConnectionState::WriteTraffic(_)) => Some(Ok(Status::Traffic)),
                Ok(ConnectionState::PeerClosed) => {
                    self.eof = true;
                    None
                }
                Ok(ConnectionState::Closed) => {
                    self.eof = true;
                    Some(Ok(Status::Closed))
                }
                // Early data is not enabled in the device port's config.
                Ok(_) => Some(Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected TLS state"))),
            };
            self.discard(discard);
            if let Some(outcome) = outcome {
                if outcome.is_err() {
                    self.failed = true;
                }
                return outcome;
            }
        }
    }

    /// After a TLS error: encodes the fatal alert rustls queued, if any.
    /// rustls hands a queued message out before it parses anything, so
    /// exactly one more call gets the alert; it is never called again
    /// (`failed`, `alerted`), as a further call would parse the bad bytes
    /// again.
    fn queue_alert(&mut self) {
        self.failed = true;
        if std::mem::replace(&mut self.alerted, true) {
            return;
        }
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = encode_into(&mut self.outgoing, &mut encode);
        }
        self.discard(discard);
    }

    /// Drops processed bytes; an empty buffer is freed, not kept.
    fn discard(&mut self, n: usize) {
        if n >= self.incoming.len() {
            self.incoming = Vec::new();
        } else if n > 0 {
            self.incoming.drain(..n);
        }
    }

    /// Reads what the socket has; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let limit = if self.conn.is_handshaking() { MAX_INCOMING_HANDSHAKE } else { MAX_INCOMING_TRAFFIC };
        if self.incoming.len() >= limit {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS record larger than allowed")));
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let mut chunk = [0u8; READ_CHUNK];
            let room = READ_CHUNK.min(limit - self.incoming.len());
            match self.tcp.try_read(&mut chunk[..room]) {
                Ok(n) => {
                    // Exactly what is needed: doubling would let a stalled
                    // peer hold twice the limit.
                    self.incoming.reserve_exact(n);
                    self.incoming.extend_from_slice(&chunk[..n]);
                    return Poll::Ready(Ok(n));
                }
                // Readiness was cleared: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `outgoing` to the socket, then frees it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.outgoing_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_sent += n;
        }
        self.outgoing = Vec::new();
        self.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Encrypts with the connection's current state into `outgoing`:
    /// application data, or a close_notify.
    fn encrypt(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        match self.process()? {
            Status::Traffic => {}
            Status::NeedData | Status::Closed => return Err(io::Error::new(io::ErrorKind::NotConnected, "the TLS connection cannot send")),
        }
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        let result = match state {
            Ok(ConnectionState::WriteTraffic(mut write)) => {
                let start = self.outgoing.len();
                let mut attempt = |buf: &mut [u8]| match data {
                    Some(data) => write.encrypt(data, buf),
                    None => write.queue_close_notify(buf),
                };
                let written = match attempt(&mut []) {
                    Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        self.outgoing.resize(start + required_size, 0);
                        attempt(&mut self.outgoing[start..])
                    }
                    other => other,
                };
                match written {
                    Ok(n) => {
                        self.outgoing.truncate(start + n);
                        Ok(())
                    }
                    Err(e) => {
                        self.outgoing.truncate(start);
                        Err(io::Error::other(e))
                    }
                }
            }
            Ok(_) => Err(io::Error::new(io::ErrorKind::NotConnected, "the TLS connection cannot send")),
            Err(e) => Err(invalid(e)),
        };
        self.discard(discard);
        result
    }
}

impl AsyncRead for DeviceTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_read < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_read);
                buf.put_slice(&this.plain[this.plain_read..this.plain_read + n]);
                this.plain_read += n;
                if this.plain_read == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.process() {
                this.queue_alert();
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            // Answers to what was processed (a key update, an alert) go
            // out without holding up the read.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if this.plain.is_empty() && !this.eof && ready!(this.poll_fill(cx))? == 0 {
                // The TCP stream ended without close_notify.
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the device closed the connection without close_notify")));
            }
        }
    }
}

impl AsyncWrite for DeviceTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What is queued goes first, so `outgoing` stays one write long.
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.encrypt(Some(data))?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // After a TLS error only the alert (if any) and the TCP close go out.
        if !this.closing && !this.failed {
            this.closing = true;
            this.encrypt(None)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_pki::{CertifiedKey, Validity};
    use hearth_proto::ids::DeviceId;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Regression (issue 8): `tokio_rustls` kept a 4 KiB record buffer per
    /// link for its whole life. Here a link that exchanged data and went
    /// quiet holds no TLS or plaintext buffer, and mutual TLS still works.
    #[tokio::test]
    async fn an_idle_link_holds_no_buffers_and_mutual_tls_works() {
        let (config, client, id) = device_and_cloud();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let device = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = hearth_pki::server_name("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap();
            tls.write_all(b"hello").await.unwrap();
            tls.flush().await.unwrap();
            let mut answer = vec![0u8; 10_000];
            tls.read_exact(&mut answer).await.unwrap();
            assert!(answer.iter().all(|&b| b == 7));
            // The cloud's close_notify is a clean end of stream.
            assert_eq!(tls.read(&mut [0u8; 1]).await.unwrap(), 0);
        });

        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = accept(config, tcp).await.unwrap();
        let chain = tls.peer_certificates().unwrap();
        assert_eq!(hearth_pki::device_identity(&chain[0]).unwrap().0, id);
        let mut hello = [0u8; 5];
        tls.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        // Larger than one read and one record.
        tls.write_all(&[7u8; 10_000]).await.unwrap();
        tls.flush().await.unwrap();
        assert_eq!(
            (tls.incoming.capacity(), tls.plain.capacity(), tls.outgoing.capacity()),
            (0, 0, 0),
            "an idle link keeps no buffer"
        );
        tls.shutdown().await.unwrap();
        device.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_without_a_device_certificate_is_refused() {
        let ca = hearth_pki::generate_ca("test cloud CA", Validity::days(1)).unwrap();
        let manufacturer = hearth_pki::generate_ca("test manufacturer", Validity::days(1)).unwrap();
        let server = hearth_pki::issue_server_cert(&ca, &["localhost".to_owned()], Validity::days(1)).unwrap();
        let config = Arc::new(hearth_pki::server_config(&server, Some(&manufacturer.cert_pem), &[]).unwrap());
        let client = Arc::new(hearth_pki::client_config(&ca.cert_pem, None).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let device = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = hearth_pki::server_name("localhost").unwrap();
            // TLS 1.3: the client finishes first and learns of the refusal
            // from the server's alert on its next read.
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await?;
            tls.read(&mut [0u8; 1]).await
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let err = accept(config, tcp).await.err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let seen = device.await.unwrap().unwrap_err();
        assert!(seen.to_string().contains("CertificateRequired") || seen.to_string().contains("certificate"), "the client hears why: {seen}");
    }

    /// A cloud config, and a device's client config with a valid certificate
    /// for the returned id.
    fn device_and_cloud() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>, DeviceId) {
        let ca = hearth_pki::generate_ca("test cloud CA", Validity::days(1)).unwrap();
        let manufacturer = hearth_pki::generate_ca("test manufacturer", Validity::days(1)).unwrap();
        let server = hearth_pki::issue_server_cert(&ca, &["localhost".to_owned()], Validity::days(1)).unwrap();
        let config = Arc::new(hearth_pki::server_config(&server, Some(&manufacturer.cert_pem), &[]).unwrap());
        let id = DeviceId::random();
        let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let csr = hearth_pki::device_csr(&key, &id).unwrap();
        let identity = CertifiedKey {
            cert_pem: hearth_pki::sign_device_csr(&manufacturer, &csr, &id, Validity::days(1)).unwrap(),
            key_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        };
        (config, Arc::new(hearth_pki::client_config(&ca.cert_pem, Some(&identity)).unwrap()), id)
    }

    /// Security review (issue 8): after a bad record rustls's unbuffered
    /// API must not be run again on the same bytes (a second fatal alert
    /// trips a debug assertion in rustls, i.e. a panic in this test build).
    /// Garbage before the handshake gets an error and at most an alert.
    #[tokio::test]
    async fn garbage_before_the_handshake_is_an_error_not_a_panic() {
        let (config, _, _) = device_and_cloud();
        for garbage in [&[0x17u8, 0x03, 0x03, 0xff, 0xff][..], &[0x00, 0x03, 0x03, 0x00, 0x01, 0x00], &[0x16, 0x03, 0x01, 0x00, 0x04, 1, 2, 3, 4]] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let peer = tokio::spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                tcp.write_all(garbage).await.unwrap();
                let mut answer = Vec::new();
                let _ = tcp.read_to_end(&mut answer).await;
                answer
            });
            let (tcp, _) = listener.accept().await.unwrap();
            let err = accept(config.clone(), tcp).await.err().expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            let answer = peer.await.unwrap();
            // Nothing, or one alert record (content type 21).
            assert!(answer.is_empty() || answer[0] == 0x15, "{answer:02x?}");
            assert!(answer.len() < 64, "one alert at most: {answer:02x?}");
        }
    }

    /// A record that does not decrypt after the handshake ends the link
    /// with an error; later reads, writes and the shutdown do not touch
    /// rustls again (no panic, no second alert).
    #[tokio::test]
    async fn a_corrupt_record_after_the_handshake_fails_the_link_once() {
        let (config, client, _) = device_and_cloud();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let device = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = hearth_pki::server_name("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap();
            tls.write_all(b"hi").await.unwrap();
            tls.flush().await.unwrap();
            let mut ok = [0u8; 2];
            tls.read_exact(&mut ok).await.unwrap();
            // Application data with a wrong tag, straight onto the socket.
            let mut junk = vec![0x17, 0x03, 0x03, 0x00, 0x20];
            junk.extend_from_slice(&[0x5a; 32]);
            tls.get_mut().0.write_all(&junk).await.unwrap();
            let _ = tls.read(&mut [0u8; 16]).await;
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = accept(config, tcp).await.unwrap();
        let mut hi = [0u8; 2];
        tls.read_exact(&mut hi).await.unwrap();
        tls.write_all(b"ok").await.unwrap();
        tls.flush().await.unwrap();
        let err = tls.read(&mut [0u8; 16]).await.expect_err("the corrupt record fails the read");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(tls.failed);
        assert!(tls.read(&mut [0u8; 16]).await.is_err());
        assert!(tls.write_all(b"more").await.is_err());
        let _ = tls.shutdown().await;
        device.await.unwrap();
    }

    /// After the handshake at most one record is held from the device.
    #[test]
    fn the_traffic_limit_is_one_record() {
        // RFC 8446 §5.2: 2^14 + 256 bytes of ciphertext and a 5-byte header.
        const { assert!(MAX_INCOMING_TRAFFIC >= (1 << 14) + 256 + 5) };
        const { assert!(MAX_INCOMING_TRAFFIC + READ_CHUNK < MAX_INCOMING_HANDSHAKE) };
    }
}
