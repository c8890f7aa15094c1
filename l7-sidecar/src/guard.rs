//! Request-smuggling guard. hyper resolves a request carrying both Content-Length
//! and Transfer-Encoding the RFC way (chunked wins, connection closes) and drops the
//! Content-Length header before the service sees it, so the gateway could not reject
//! such requests on its own. This wrapper watches the raw HTTP/1 header blocks as
//! hyper reads them and raises a per-connection flag the pipeline turns into a 400.

use crate::proxy::Body;
use crate::stack::{json_error, run, ConnInfo, Next, Snapshot};
use http::{header, HeaderValue, Request, Response, StatusCode};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header line we bother scanning; hyper rejects longer header sections.
const MAX_LINE: usize = 64 * 1024;

enum State {
    Headers {
        line: Vec<u8>,
        first: bool,
        cl: Option<u64>,
        te: bool,
    },
    Body(u64),
    /// Chunked body, HTTP/2 or something unparseable: hyper's own checks take over.
    Done,
}

pub struct SmuggleGuard<S> {
    inner: S,
    state: State,
    flag: Arc<AtomicBool>,
}

impl<S> SmuggleGuard<S> {
    pub fn new(inner: S, flag: Arc<AtomicBool>) -> Self {
        SmuggleGuard {
            inner,
            state: State::Headers {
                line: Vec::new(),
                first: true,
                cl: None,
                te: false,
            },
            flag,
        }
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Headers {
                            line: Vec::new(),
                            first: true,
                            cl: None,
                            te: false,
                        };
                    }
                }
                State::Headers { line, .. } => {
                    let Some(pos) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > MAX_LINE {
                            self.state = State::Done;
                        }
                        return;
                    };
                    // A line is only copied when it spans reads; otherwise it is
                    // looked at where it lies. This runs for every header line.
                    if line.is_empty() {
                        self.header_line(&data[..pos]);
                    } else {
                        let mut whole = std::mem::take(line);
                        whole.extend_from_slice(&data[..pos]);
                        self.header_line(&whole);
                        if let State::Headers { line, .. } = &mut self.state {
                            // Keep the buffer's capacity for the next split line.
                            whole.clear();
                            *line = whole;
                        }
                    }
                    data = &data[pos + 1..];
                }
            }
        }
    }

    /// One header-section line, without its `\n`.
    fn header_line(&mut self, raw: &[u8]) {
        let State::Headers { first, cl, te, .. } = &mut self.state else {
            return;
        };
        let text = raw.strip_suffix(b"\r").unwrap_or(raw);
        if *first {
            if text.is_empty() {
                // Stray CRLF between requests is tolerated by HTTP/1.1.
                return;
            }
            *first = false;
            if starts_with_ignore_case(text, b"pri * http/2") {
                self.state = State::Done;
            }
            return;
        }
        if text.is_empty() {
            let next = match (*cl, *te) {
                (Some(_), true) => {
                    self.flag.store(true, Ordering::SeqCst);
                    State::Done
                }
                (_, true) => State::Done,
                (Some(0) | None, false) => State::Headers {
                    line: Vec::new(),
                    first: true,
                    cl: None,
                    te: false,
                },
                (Some(n), false) => State::Body(n),
            };
            self.state = next;
            return;
        }
        if let Some(colon) = text.iter().position(|b| *b == b':') {
            let name = text[..colon].trim_ascii();
            let value = &text[colon + 1..];
            if name.eq_ignore_ascii_case(b"content-length") {
                *cl = Some(
                    std::str::from_utf8(value.trim_ascii())
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                );
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                *te = true;
            }
        }
    }
}

fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl<S: AsyncRead + Unpin> AsyncRead for SmuggleGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            this.scan(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SmuggleGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reject smuggling attempts and header floods before any routing work.
pub async fn hardening_stage<B>(req: Request<B>, next: impl Next<B>) -> Response<Body> {
    let flagged = req
        .extensions()
        .get::<ConnInfo>()
        .is_some_and(|c| c.smuggled.load(Ordering::SeqCst));
    let both = req.headers().contains_key(header::CONTENT_LENGTH)
        && req.headers().contains_key(header::TRANSFER_ENCODING);
    if both || flagged {
        let mut r = json_error(
            &req,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "both Content-Length and Transfer-Encoding",
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let max = req
        .extensions()
        .get::<Snapshot>()
        .map_or(usize::MAX, |s| s.0.cfg.server.max_headers);
    if req.headers().len() > max {
        return json_error(
            &req,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            "too many headers",
        );
    }
    run(next, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagged(input: &[u8], split: usize) -> bool {
        let flag = Arc::new(AtomicBool::new(false));
        let mut g = SmuggleGuard::new((), flag.clone());
        let (a, b) = input.split_at(split.min(input.len()));
        g.scan(a);
        g.scan(b);
        flag.load(Ordering::SeqCst)
    }

    #[test]
    fn detects_cl_and_te_in_any_request_of_a_keepalive_stream() {
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let ok = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcdGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in [0, 7, 30, 60, 200] {
            assert!(flagged(bad, split), "split {split}");
            assert!(!flagged(ok, split), "split {split}");
        }
        // The second request on the connection smuggles.
        let second = [&ok[..], &bad[..]].concat();
        assert!(flagged(&second, 45));
        // A body that merely contains the words is skipped by its Content-Length.
        let body = b"POST / HTTP/1.1\r\nContent-Length: 38\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x";
        assert!(!flagged(body, 10));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), split in 0usize..2048) {
            let _ = flagged(&data, split);
        }
    }
}
