//! A minimal blocking HTTP/1.1 GET client for `http://` URLs.
//!
//! Enough for the conformance CLI against repositories served on
//! 127.0.0.1: one request per connection (`Connection: close`), bodies
//! delimited by `Content-Length`, chunked encoding, or connection close.
//! The byte limit is enforced while reading: a server sending endless data
//! is cut off one byte past the limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::client::Fetcher;
use crate::FetchError;

/// Largest status line plus headers accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Blocking fetcher over `std::net::TcpStream`.
#[derive(Debug, Clone)]
pub struct HttpFetcher {
    /// Connect, read and write timeout.
    pub timeout: Duration,
}

impl Default for HttpFetcher {
    fn default() -> Self {
        HttpFetcher { timeout: Duration::from_secs(30) }
    }
}

fn transport(e: impl std::fmt::Display) -> FetchError {
    FetchError::Transport(e.to_string())
}

impl Fetcher for HttpFetcher {
    fn fetch(&mut self, url: &str, max_len: u64) -> Result<Vec<u8>, FetchError> {
        let mut body = Vec::new();
        self.fetch_to(url, max_len, &mut body)?;
        Ok(body)
    }

    fn fetch_to(&mut self, url: &str, max_len: u64, out: &mut dyn Write) -> Result<u64, FetchError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| FetchError::Transport(format!("only http:// URLs are supported: {url}")))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        let sock = std::net::ToSocketAddrs::to_socket_addrs(&addr).map_err(transport)?.next().ok_or_else(|| transport("no address"))?;
        let stream = TcpStream::connect_timeout(&sock, self.timeout).map_err(transport)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(transport)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(transport)?;
        get(stream, authority, path, max_len, out)
    }
}

/// One HTTP/1.1 GET of `path` over an open `stream` (plain TCP, or TLS
/// that the caller has set up and verified), with the body written to
/// `out` and cut off past `max_len` bytes. Timeouts are the stream's.
///
/// # Errors
/// [`FetchError::NotFound`] for 403/404, [`FetchError::Status`] for other
/// non-200 answers, [`FetchError::TooLong`] past the limit,
/// [`FetchError::Transport`] for a malformed or truncated answer.
pub fn get<S: Read + Write>(mut stream: S, authority: &str, path: &str, max_len: u64, out: &mut dyn Write) -> Result<u64, FetchError> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: hearth-tuf\r\nAccept-Encoding: identity\r\n\r\n").map_err(transport)?;
    stream.flush().map_err(transport)?;
    let mut reader = BufReader::new(stream);

    let mut head_len = 0usize;
    let mut line = String::new();
    let mut read_line = |reader: &mut BufReader<S>, line: &mut String| -> Result<(), FetchError> {
        line.clear();
        let n = reader.by_ref().take((MAX_HEAD - head_len) as u64).read_line(line).map_err(transport)?;
        head_len += n;
        if n == 0 || !line.ends_with('\n') {
            return Err(transport("truncated or oversized response head"));
        }
        Ok(())
    };
    read_line(&mut reader, &mut line)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| transport(format!("bad status line {line:?}")))?;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    loop {
        read_line(&mut reader, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                content_length = Some(value.parse().map_err(|_| transport("bad content-length"))?);
            } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    match status {
        200 => {}
        403 | 404 => return Err(FetchError::NotFound(status)),
        s => return Err(FetchError::Status(s)),
    }
    if content_length.is_some_and(|l| l > max_len) {
        return Err(FetchError::TooLong(max_len));
    }
    let mut total: u64 = 0;
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.by_ref().take(1024).read_line(&mut size_line).map_err(transport)?;
            let size = u64::from_str_radix(size_line.trim().split(';').next().unwrap_or("").trim(), 16).map_err(|_| transport("bad chunk size"))?;
            if size == 0 {
                break;
            }
            if total + size > max_len {
                return Err(FetchError::TooLong(max_len));
            }
            let n = copy_limited(&mut reader, size, out)?;
            total += n;
            if n < size {
                return Err(transport("truncated chunk"));
            }
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).map_err(transport)?;
        }
    } else {
        // Without a length the body runs to connection close: read at
        // most one byte past the limit to tell "exactly max" from "more".
        let want = content_length.unwrap_or(max_len + 1).min(max_len + 1);
        total = copy_limited(&mut reader, want, out)?;
        if total > max_len {
            return Err(FetchError::TooLong(max_len));
        }
        if content_length.is_some_and(|l| total < l) {
            return Err(transport("connection closed before content-length bytes"));
        }
    }
    Ok(total)
}

fn copy_limited(reader: &mut impl Read, n: u64, out: &mut dyn Write) -> Result<u64, FetchError> {
    std::io::copy(&mut reader.take(n), out).map_err(transport)
}
