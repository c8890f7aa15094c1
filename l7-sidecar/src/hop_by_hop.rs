//! The hop-by-hop header fields (RFC 9110 §7.6.1 and the legacy ones), which never
//! travel past one connection. A leaf module: the request side (`http_util`) and the
//! response trailers (`body::trailers`) both filter them.

use http::{header, HeaderName};

/// `static`, not `const`: a const array would be built (and dropped) at every use.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
