//! The response body's decoder (RFC 9112 §6–7): Content-Length, chunked (extensions
//! ignored, trailers passed on as a trailers frame) or until close, frame by frame out
//! of the connection's read buffer (data frames are split off it, not copied).

use super::{Framing, H1Error, MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS};
use bytes::Bytes;
use bytes::{Buf, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::Frame;

/// What decoding the buffered bytes gave.
#[derive(Debug)]
pub enum Step {
    Frame(Frame<Bytes>),
    /// Nothing decodable is buffered: read more.
    NeedMore,
    /// The body is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Body bytes left (a Content-Length body).
    Length {
        left: u64,
        want: u64,
    },
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk's data.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: the trailer section up to its empty line.
    Trailers,
    Close,
    Done,
    /// An error was returned: nothing more comes, and the body did not end.
    Failed,
}

/// Decodes one response body from the connection's read buffer.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length { left: n, want: n },
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// Whether the body has ended (successfully).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body's length was known from the head (Content-Length or none).
    pub fn length_known(&self) -> bool {
        matches!(self.state, State::Done | State::Length { .. })
    }

    /// Bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Done => Some(0),
            State::Length { left, .. } => Some(left),
            _ => None,
        }
    }

    /// Take the next frame out of `buf`, if its bytes are there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        let r = self.step(buf);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            match self.state {
                State::Done | State::Failed => return Ok(Step::End),
                State::Length { left, want } => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    let left = left - n;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length { left, want }
                    };
                    return Ok(data(buf, n as usize));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = buf.len();
                    return Ok(data(buf, n));
                }
                State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    self.state = if n == left {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n)
                    };
                    return Ok(data(buf, n as usize));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::ChunkEnd);
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let Some(lf) = memchr::memchr(b'\n', buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(H1Error::ChunkSize);
                        }
                        return Ok(Step::NeedMore);
                    };
                    if lf > MAX_CHUNK_LINE {
                        return Err(H1Error::ChunkSize);
                    }
                    let size = chunk_size(&buf[..=lf])?;
                    buf.advance(lf + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let trailers = trailers(fields)?;
                            buf.advance(len);
                            self.state = State::Done;
                            if let Some(t) = trailers {
                                return Ok(Step::Frame(Frame::trailers(t)));
                            }
                            return Ok(Step::End);
                        }
                        Ok(httparse::Status::Partial) => {
                            if buf.len() > MAX_HEAD {
                                return Err(H1Error::Trailers(format!(
                                    "larger than {MAX_HEAD} bytes"
                                )));
                            }
                            return Ok(Step::NeedMore);
                        }
                        Err(e) => return Err(H1Error::Trailers(e.to_string())),
                    }
                }
            }
        }
    }

    /// The body cannot go on (its connection failed): it never ends.
    pub fn fail(&mut self) {
        self.state = State::Failed;
    }

    /// The backend closed the connection: the end of a close-delimited body, else
    /// the body was cut short.
    pub fn eof(&mut self) -> Result<(), H1Error> {
        let r = match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            State::Length { left, want } => Err(H1Error::ShortBody {
                got: want - left,
                want,
            }),
            State::Failed => Ok(()),
            _ => Err(H1Error::ShortChunked),
        };
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }
}

fn data(buf: &mut BytesMut, n: usize) -> Step {
    Step::Frame(Frame::data(buf.split_to(n).freeze()))
}

/// `chunk-size [ chunk-ext ] CRLF` (with the LF): the size; extensions are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(H1Error::ChunkSize);
    };
    let hex_len = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if hex_len == 0 || hex_len > 16 {
        return Err(H1Error::ChunkSize);
    }
    let mut size = 0u64;
    for &b in &line[..hex_len] {
        // Cannot fail: checked above.
        size = size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
    }
    let rest = &line[hex_len..];
    let after_ws = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map_or(&rest[rest.len()..], |i| &rest[i..]);
    match after_ws {
        [] => Ok(size),
        // An extension: any text but a bare CR (the line ends at the first LF).
        [b';', ext @ ..] if !ext.contains(&b'\r') => Ok(size),
        _ => Err(H1Error::ChunkSize),
    }
}

fn trailers(fields: &[httparse::Header<'_>]) -> Result<Option<HeaderMap>, H1Error> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| H1Error::Trailers(format!("invalid field name {:?}", f.name)))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| H1Error::Trailers(format!("invalid value of {name}")))?;
        map.append(name, value);
    }
    Ok(Some(map))
}
