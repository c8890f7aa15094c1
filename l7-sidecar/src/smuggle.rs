//! The request-smuggling detector: hyper reads a request carrying both
//! `Content-Length` and `Transfer-Encoding` as chunked and drops the `Content-Length`
//! before the service sees it (hyper 1.x `proto/h1/role.rs`), so the pipeline alone
//! cannot refuse such requests. `SmuggleGuard` watches the raw HTTP/1 bytes as hyper
//! reads them, follows the message framing the way hyper does (heads, sized bodies,
//! chunked bodies with extensions and trailers) and records the index of the first
//! request on the connection that had both; `guard::hardening_stage` answers that
//! request, and any later one, with 400. `guard_frames_like_hyper` runs random
//! keep-alive streams through hyper and the guard together to show they agree on where
//! every request starts. A leaf module: it knows nothing of the pipeline.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest line kept for parsing; hyper rejects longer header sections, and for
/// chunk-size and trailer lines only the start (or emptiness) matters.
const MAX_LINE: usize = 64 * 1024;

/// hyper's smallest field limit: a head with fewer field lines is never refused for
/// their number, so only counts from here on are published (`Smuggled::head_fields`)
/// and the usual request costs no shared write for it.
pub const MANY_FIELDS: u32 = 100;

/// What the guard learned about one connection, shared with the pipeline.
#[derive(Debug)]
pub struct Smuggled {
    /// Index + 1 of the first request with both CL and TE (0: none).
    first_bad: AtomicU64,
    /// Request heads completed so far.
    heads: AtomicU64,
    /// 1 + the number of the request head being read (its first byte arrived, its end
    /// not yet); 0 when none is. The connection's watchdog cuts a head that takes
    /// longer than `server.header_read_timeout_ms` (hyper's own header timer costs a
    /// timer and an extra poll of the connection per request).
    reading_head: AtomicU64,
    /// Field lines of the latest request head once they reach `MANY_FIELDS`, else 0:
    /// hyper reports too many fields and a too-large head as one error, and the
    /// access log tells them apart by this count (`observe::ParserRejection`).
    head_fields: AtomicU64,
}

impl Default for Smuggled {
    fn default() -> Self {
        Smuggled {
            first_bad: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            reading_head: AtomicU64::new(0),
            head_fields: AtomicU64::new(0),
        }
    }
}

impl Smuggled {
    fn mark(&self, index: u64) {
        let _ = self
            .first_bad
            .compare_exchange(0, index + 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether request `index` (0-based, in arrival order) or an earlier one smuggled.
    pub fn flagged(&self, index: u64) -> bool {
        let bad = self.first_bad.load(Ordering::SeqCst);
        bad != 0 && index + 1 >= bad
    }

    /// Whether any request of the connection smuggled.
    pub fn any(&self) -> bool {
        self.first_bad.load(Ordering::SeqCst) != 0
    }

    /// Request heads the guard has seen complete.
    #[inline]
    pub fn heads(&self) -> u64 {
        self.heads.load(Ordering::SeqCst)
    }

    /// Field lines of the latest request head, if at least `MANY_FIELDS` (else 0).
    pub fn head_fields(&self) -> u64 {
        self.head_fields.load(Ordering::Relaxed)
    }

    /// The number (0-based) of the HTTP/1 request head being read, if one is: its
    /// first byte has arrived, its empty line not yet.
    #[inline]
    pub fn head_in_progress(&self) -> Option<u64> {
        self.reading_head.load(Ordering::Relaxed).checked_sub(1)
    }
}

enum State {
    /// A line of a request head (`first`: the request line is still to come).
    Head {
        first: bool,
        cl: Option<u64>,
        te: bool,
    },
    /// Bytes of a sized body still to come.
    Body(u64),
    ChunkSize,
    /// Chunk data plus its CRLF still to come.
    ChunkData(u64),
    Trailers,
    /// HTTP/2, or a framing hyper will refuse (it closes the connection).
    Done,
}

const FRESH: State = State::Head {
    first: true,
    cl: None,
    te: false,
};

pub struct SmuggleGuard<S> {
    inner: S,
    state: State,
    /// A line split across reads.
    line: Vec<u8>,
    flag: Arc<Smuggled>,
    /// The head being read (`State::Head`) has had its first byte.
    head_started: bool,
    /// Field lines of the head being read.
    fields: u32,
    /// `flag.head_fields` holds a count (of this head or an earlier one).
    published: bool,
    /// Bytes read (and scanned) already, handed out again before reading more:
    /// the server's protocol sniffing reads a connection's first bytes itself.
    replay: Option<bytes::Bytes>,
}

impl<S> SmuggleGuard<S> {
    pub fn new(inner: S, flag: Arc<Smuggled>) -> Self {
        SmuggleGuard {
            inner,
            state: FRESH,
            line: Vec::new(),
            flag,
            head_started: false,
            fields: 0,
            published: false,
            replay: None,
        }
    }

    /// Hand `bytes` (read through this guard, so scanned already) out again on the
    /// next reads, before anything more is read from the connection.
    pub fn replay(&mut self, bytes: &[u8]) {
        self.replay = (!bytes.is_empty()).then(|| bytes::Bytes::copy_from_slice(bytes));
    }

    /// Feed bytes as if hyper had read them (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn scan_for_test(&mut self, data: &[u8]) {
        self.scan(data);
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Body(left) | State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = match self.state {
                            State::ChunkData(_) => State::ChunkSize,
                            _ => FRESH,
                        };
                    }
                }
                State::Head { first: true, .. } if !self.head_started => {
                    // The first byte of a head (a stray CRLF before it counts: hyper's
                    // timer runs then too).
                    self.head_started = true;
                    let number = self.flag.heads.load(Ordering::Relaxed);
                    self.flag.reading_head.store(number + 1, Ordering::Relaxed);
                }
                _ => {
                    let Some(pos) = memchr::memchr(b'\n', data) else {
                        let room = MAX_LINE.saturating_sub(self.line.len());
                        self.line.extend_from_slice(&data[..data.len().min(room)]);
                        return;
                    };
                    // A line is only copied when it spans reads; otherwise it is
                    // looked at where it lies. This runs for every header line.
                    if self.line.is_empty() {
                        self.on_line(&data[..pos]);
                    } else {
                        let mut whole = std::mem::take(&mut self.line);
                        let room = MAX_LINE.saturating_sub(whole.len());
                        whole.extend_from_slice(&data[..pos.min(room)]);
                        self.on_line(&whole);
                        // Keep the buffer's capacity for the next split line.
                        whole.clear();
                        self.line = whole;
                    }
                    data = &data[pos + 1..];
                }
            }
        }
    }

    fn end_head(&mut self) {
        self.head_started = false;
        self.flag.reading_head.store(0, Ordering::Relaxed);
    }

    /// One complete line, without its `\n`.
    fn on_line(&mut self, raw: &[u8]) {
        let text = raw.strip_suffix(b"\r").unwrap_or(raw);
        match &mut self.state {
            State::Head { .. } => self.head_line(text),
            State::ChunkSize => {
                // hyper: hex digits, then optional whitespace / `;extension`.
                let digits = text.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                let size = std::str::from_utf8(&text[..digits])
                    .ok()
                    .and_then(|d| u64::from_str_radix(d, 16).ok());
                self.state = match size {
                    Some(0) => State::Trailers,
                    Some(n) => n.checked_add(2).map_or(State::Done, State::ChunkData),
                    None => State::Done,
                };
            }
            State::Trailers => {
                if text.is_empty() {
                    self.state = FRESH;
                }
            }
            State::Body(_) | State::ChunkData(_) | State::Done => {}
        }
    }

    fn head_line(&mut self, text: &[u8]) {
        let State::Head { first, cl, te } = &mut self.state else {
            return;
        };
        if *first {
            if text.is_empty() {
                // Stray CRLF between requests is tolerated by HTTP/1.1 (and httparse).
                return;
            }
            *first = false;
            self.fields = 0;
            if self.published {
                self.published = false;
                self.flag.head_fields.store(0, Ordering::Relaxed);
            }
            // Only a connection's very first line can be the HTTP/2 preface; later
            // it is a (bad) HTTP/1 request and must not switch the guard off.
            if self.flag.heads() == 0 && starts_with_ignore_case(text, b"pri * http/2") {
                // HTTP/2 has no request heads of this kind: nothing is being read.
                self.end_head();
                self.state = State::Done;
            }
            return;
        }
        if !text.is_empty() {
            self.fields = self.fields.saturating_add(1);
            if self.fields >= MANY_FIELDS {
                self.published = true;
                self.flag.head_fields.store(u64::from(self.fields), Ordering::Relaxed);
            }
        }
        if text.is_empty() {
            let (cl, te) = (*cl, *te);
            self.end_head();
            let index = self.flag.heads.fetch_add(1, Ordering::SeqCst);
            self.state = match (cl, te) {
                (cl, true) => {
                    if cl.is_some() {
                        self.flag.mark(index);
                    }
                    State::ChunkSize
                }
                (Some(0) | None, false) => FRESH,
                (Some(n), false) => State::Body(n),
            };
            return;
        }
        // Only a name starting with `c` or `t` can be one of the two: most lines
        // (Host, Accept, User-Agent...) are not looked at further.
        let lead = text.trim_ascii_start().first().map(u8::to_ascii_lowercase);
        if !matches!(lead, Some(b'c' | b't')) {
            return;
        }
        if let Some(colon) = memchr::memchr(b':', text) {
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
        if let Some(pre) = &mut self.replay {
            let n = pre.len().min(buf.remaining());
            buf.put_slice(&pre.split_to(n));
            if pre.is_empty() {
                self.replay = None;
            }
            return Poll::Ready(Ok(()));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in two reads; which request indices were flagged, and heads seen.
    fn scan(input: &[u8], split: usize) -> (Vec<u64>, u64) {
        let flag = Arc::new(Smuggled::default());
        let mut g = SmuggleGuard::new((), flag.clone());
        let (a, b) = input.split_at(split.min(input.len()));
        g.scan(a);
        g.scan(b);
        let flagged = (0..8).filter(|i| flag.flagged(*i)).collect();
        (flagged, flag.heads())
    }

    fn flagged(input: &[u8], split: usize) -> bool {
        !scan(input, split).0.is_empty()
    }

    #[test]
    fn detects_cl_and_te_in_any_request_of_a_keepalive_stream() {
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let ok = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcdGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in [0, 7, 30, 60, 200] {
            assert!(flagged(bad, split), "split {split}");
            assert!(!flagged(ok, split), "split {split}");
        }
        // The third request on the connection smuggles; the two before it do not.
        let second = [&ok[..], &bad[..]].concat();
        assert_eq!(scan(&second, 45), (vec![2, 3, 4, 5, 6, 7], 3));
        // Names in any case, with whitespace around them (the guard trims what hyper
        // would refuse anyway), are found past the first-letter filter; other names
        // starting with the same letters are not taken for them.
        for head in [
            &b"POST / HTTP/1.1\r\ncontent-LENGTH: 4\r\nTRANSFER-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\n\tContent-Length : 4\r\n Transfer-Encoding:chunked\r\n\r\n0\r\n\r\n",
        ] {
            for split in [0, 20, 40, 200] {
                assert!(flagged(head, split), "{:?} split {split}", String::from_utf8_lossy(head));
            }
        }
        let lookalikes = b"POST / HTTP/1.1\r\nContent-Type: x\r\nTE: trailers\r\nContent-Length: 2\r\nTransfer: chunked\r\n\r\nab";
        assert_eq!(scan(lookalikes, 30), (vec![], 1));
        // A body that merely contains the words is skipped by its Content-Length.
        let body = b"POST / HTTP/1.1\r\nContent-Length: 38\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x";
        assert!(!flagged(body, 10));
    }

    #[test]
    fn knows_when_a_request_head_is_being_read() {
        let flag = Arc::new(Smuggled::default());
        let mut g = SmuggleGuard::new((), flag.clone());
        assert_eq!(flag.head_in_progress(), None, "nothing read yet");
        g.scan(b"GE");
        assert_eq!(flag.head_in_progress(), Some(0), "from the first byte");
        g.scan(b"T / HTTP/1.1\r\nHost: x\r\n");
        assert_eq!(flag.head_in_progress(), Some(0));
        g.scan(b"\r\n");
        assert_eq!(flag.head_in_progress(), None, "head complete");
        g.scan(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab");
        assert_eq!(flag.head_in_progress(), None, "a body is no head");
        g.scan(b"cG");
        assert_eq!(flag.head_in_progress(), Some(2), "the third request's head");

        let h2 = Arc::new(Smuggled::default());
        let mut g = SmuggleGuard::new((), h2.clone());
        g.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00");
        assert_eq!(h2.head_in_progress(), None, "HTTP/2 reads no such heads");
    }

    /// The latest head's field count is published from `MANY_FIELDS` lines on (for
    /// the parser-rejection log reason) and cleared by the next head.
    #[test]
    fn counts_the_fields_of_a_head_with_many() {
        let flag = Arc::new(Smuggled::default());
        let mut g = SmuggleGuard::new((), flag.clone());
        g.scan(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(flag.head_fields(), 0, "a usual head publishes nothing");
        let many: String = (0..120).map(|i| format!("X-{i}: v\r\n")).collect();
        g.scan(b"GET / HTTP/1.1\r\n");
        g.scan(many.as_bytes());
        assert_eq!(flag.head_fields(), 120, "counted before the head ends");
        g.scan(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n");
        assert_eq!(flag.head_fields(), 0, "cleared by the next head");
    }

    #[test]
    fn follows_chunked_bodies_to_the_next_request() {
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: Content-Length: 1\r\n\r\n";
        let bad =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        let stream = [&chunked[..], &bad[..]].concat();
        for split in [0, 20, 50, 60, 75, 90, 200] {
            assert_eq!(scan(&stream, split).0.first(), Some(&1), "split {split}");
            assert_eq!(scan(&stream, split).1, 2, "split {split}");
        }
        // A later HTTP/2 preface does not switch the guard off.
        let pri = b"GET / HTTP/1.1\r\n\r\nPRI * HTTP/2.0\r\n\r\n";
        let stream = [&pri[..], &bad[..]].concat();
        assert_eq!(scan(&stream, 0).1, 3);
    }

    /// The guard and hyper must agree on where each request starts: random keep-alive
    /// streams (sized, chunked with extensions and trailers, bodiless, stray CRLFs),
    /// cut into random reads, are served by hyper through the guard, and every request
    /// hyper hands the service must be one the guard counted and did not flag.
    fn served_by_hyper(stream: Vec<u8>, cuts: Vec<usize>) -> (u64, u64, bool) {
        use hyper_util::rt::TokioIo;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 20);
            let flag = Arc::new(Smuggled::default());
            let guard = SmuggleGuard::new(server, flag.clone());
            let served = Arc::new(AtomicU64::new(0));
            let any_flagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (s2, f2, a2) = (served.clone(), flag.clone(), any_flagged.clone());
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let i = s2.fetch_add(1, Ordering::SeqCst);
                    if f2.flagged(i) || f2.heads() < i + 1 {
                        a2.store(true, Ordering::SeqCst);
                    }
                    async move {
                        use http_body_util::BodyExt as _;
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    }
                });
            let conn = tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(guard), svc),
            );
            let (mut rd, mut wr) = tokio::io::split(client);
            let reader = tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut sink).await;
            });
            let mut at = 0;
            for c in cuts.into_iter().chain([stream.len()]) {
                let c = c.clamp(at, stream.len());
                let _ = tokio::io::AsyncWriteExt::write_all(&mut wr, &stream[at..c]).await;
                tokio::task::yield_now().await;
                at = c;
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
            reader.abort();
            (
                served.load(Ordering::SeqCst),
                flag.heads(),
                any_flagged.load(Ordering::SeqCst),
            )
        })
    }

    fn request(kind: u8, body: &[u8], chunk: usize) -> Vec<u8> {
        let mut r = Vec::new();
        match kind % 4 {
            0 => r.extend_from_slice(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"),
            1 => {
                r.extend_from_slice(
                    format!(
                        "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                r.extend_from_slice(body);
            }
            k => {
                r.extend_from_slice(
                    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                for part in body.chunks(chunk.max(1)) {
                    let ext = if k == 3 { ";name=\"v\"" } else { "" };
                    r.extend_from_slice(format!("{:x}{ext}\r\n", part.len()).as_bytes());
                    r.extend_from_slice(part);
                    r.extend_from_slice(b"\r\n");
                }
                r.extend_from_slice(b"0\r\n");
                if k == 3 {
                    r.extend_from_slice(b"X-Trailer: Content-Length: 5\r\n");
                }
                r.extend_from_slice(b"\r\n");
            }
        }
        if kind & 4 != 0 {
            r.extend_from_slice(b"\r\n");
        }
        r
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn guard_frames_like_hyper(
            reqs in proptest::collection::vec((0u8..8, proptest::collection::vec(proptest::num::u8::ANY, 0..40), 1usize..16), 1..6),
            cuts in proptest::collection::vec(0usize..600, 0..6),
        ) {
            let mut stream = Vec::new();
            for (kind, body, chunk) in &reqs {
                stream.extend_from_slice(&request(*kind, body, *chunk));
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let (served, heads, flagged) = served_by_hyper(stream, cuts);
            proptest::prop_assert_eq!(served, reqs.len() as u64);
            proptest::prop_assert_eq!(heads, served);
            proptest::prop_assert!(!flagged);
        }

        #[test]
        fn never_panics_on_any_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), split in 0usize..2048) {
            let _ = flagged(&data, split);
        }
    }
}
