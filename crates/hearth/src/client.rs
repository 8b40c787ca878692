//! The controller's connection to the cloud: HTTPS JSON calls and the
//! WebSocket link, both over TLS 1.3 trusting only the cloud CA from the
//! controller's configuration (never the system roots).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long any single API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body the CLI will read.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// An API endpoint.
#[derive(Clone)]
pub struct Cloud {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

/// A failed API call, with the server's explanation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `error` field of the body, or a description.
    pub message: String,
    /// The whole body.
    pub body: Value,
}

impl Cloud {
    /// Parses `https://host[:port]` and prepares a TLS client trusting `ca_pem` only.
    pub fn new(url: &str, ca_pem: &str, token: Option<String>) -> Result<Self> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("cloud URL must start with https:// (got {url:?})"))?
            .trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            bail!("cloud URL must be https://HOST[:PORT] without a path (got {url:?})");
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().with_context(|| format!("bad port in {url:?}"))?),
            None => (rest.to_owned(), 443),
        };
        let tls = hearth_pki::client_config(ca_pem, None).context("loading the cloud CA")?;
        let server_name = hearth_pki::server_name(&host)?;
        Ok(Self { host, port, server_name, tls: Arc::new(tls), token })
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot reach the cloud at {}:{}", self.host, self.port))?;
        TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS with {} failed (is --ca the cloud's CA?)", self.host))
    }

    /// Calls the API; a non-2xx answer becomes an [`ApiError`].
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, body))
            .await
            .map_err(|_| anyhow!("the cloud did not answer within {} s", CALL_TIMEOUT.as_secs()))?
    }

    async fn call_inner(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends when the response is read; its error, if any, surfaces there.
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port));
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v)?)
            }
            None => Bytes::new(),
        };
        let resp = sender.send_request(req.body(Full::new(payload))?).await.context("sending the request")?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer: {e}"))?
            .to_bytes();
        let value: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("the cloud answered {status}"));
            return Err(ApiError { status, message, body: value }.into());
        }
        Ok(value)
    }

    /// Opens the controller WebSocket link.
    pub async fn link(&self) -> Result<tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = self.connect().await?;
        let url = format!("wss://{}:{}/api/v1/link", self.host, self.port);
        let mut req = url.into_client_request()?;
        let token = self.token.as_deref().context("not logged in; run `hearth login`")?;
        req.headers_mut().insert(hyper::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::client_async(req, stream))
            .await
            .map_err(|_| anyhow!("the cloud did not accept the link in time"))?
            .context("opening the live link")?;
        Ok(ws)
    }
}
