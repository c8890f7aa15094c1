//! The auth stage: the verdict of `Authenticator` applied to a request, with the
//! failed-authentication limit in front of it.

use super::{AuthError, Authenticator, FailureLimiter, Identity, API_KEY};
use crate::config::{AuthFailureLimitConfig, AuthMode};
use crate::ctx::UserId;
use crate::http_util::{json_error, Body};
use crate::routing::Routed;
use crate::stage::{run, Annotated, Annotation, Either, Next};
use http::{header, HeaderValue, Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;

/// Authenticate per the route; the identity goes to later stages in the request's
/// context and out to the access log as a response extension (`UserId`).
/// `failures` is shared by every config generation (a reload does not forgive
/// failed logins); `limit` is this generation's `auth.failure_limit`.
///
/// A route without auth, and a request whose token is in the token cache (the
/// usual authenticated request), cost no future of their own: the verdict is made
/// here, and the rest of the pipeline's future is handed over as is (`NoteUser`
/// notes the user on its answer). Only a verification runs in a future of its own.
pub fn auth_stage<'a, B: Send + 'static, N: Next<Routed<B>>>(
    auth: &'a Authenticator,
    failures: &'a FailureLimiter,
    limit: &'a AuthFailureLimitConfig,
    mut r: Routed<B>,
    next: N,
) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
    let rc = &r.route.route.cfg;
    if rc.auth == AuthMode::None {
        return Either::pass(Annotated::new(next.run(r), None::<NoteUser>));
    }
    let now = Instant::now();
    let ip = r.req.ctx().conn.peer.ip();
    // Before any verification: an address over the limit costs no signature check.
    let blocked = failures.blocked(limit, ip, now);
    let cached = auth.authenticate_cached(rc.auth, &rc.roles, r.req.headers(), now);
    if let Some(wait) = blocked {
        // Blocked for its own failures: refused whatever it sends. Blocked only by the
        // overflow window (a table full of locked-out addresses): a token verified
        // before still passes, or an attacker holding the table would lock out every
        // signed-in client it never met.
        let signed_in = matches!(cached, Some(Ok(_))) && !failures.has_window(ip);
        if !signed_in {
            crate::stats::record_auth_failure(&rc.name, "limited");
            return Either::work(refused(too_many_failures(&r.req, wait)));
        }
    }
    match cached {
        Some(result) => match admit(failures, limit, &mut r, result.map(Some)) {
            Ok(user) => Either::pass(Annotated::new(next.run(r), user.map(NoteUser))),
            Err(resp) => Either::work(refused(resp)),
        },
        // Boxed: verification is the unusual case, and its future inline would make
        // every request's pipeline future that much larger.
        None => Either::work(Box::pin(Either::work(authenticated(
            auth, failures, limit, r, next,
        )))),
    }
}

/// The stage's own answer, boxed like a verification (in the same box type, one
/// pointer): inline, a response would make the pass-through future (every
/// request's) that much larger.
fn refused<W>(
    resp: Response<Body>,
) -> std::pin::Pin<Box<Either<std::future::Ready<Response<Body>>, W>>> {
    Box::pin(Either::pass(std::future::ready(resp)))
}

/// A request whose credentials are not in the token cache: verified in a future of
/// its own (a JWKS refresh may be awaited).
async fn authenticated<B: Send + 'static>(
    auth: &Authenticator,
    failures: &FailureLimiter,
    limit: &AuthFailureLimitConfig,
    mut r: Routed<B>,
    next: impl Next<Routed<B>>,
) -> Response<Body> {
    let rc = &r.route.route.cfg;
    let result = auth.authenticate(rc.auth, &rc.roles, r.req.headers()).await;
    match admit(failures, limit, &mut r, result) {
        Ok(user) => {
            let mut resp = run(next, r).await;
            if let Some(user) = user {
                resp.extensions_mut().insert(UserId(user));
            }
            resp
        }
        Err(resp) => resp,
    }
}

/// Apply an authentication verdict to the request: the identity into its context
/// (and returned, if the access log reads it, for the response), or the refusal to
/// answer with.
fn admit<B>(
    failures: &FailureLimiter,
    limit: &AuthFailureLimitConfig,
    r: &mut Routed<B>,
    result: Result<Option<Arc<Identity>>, AuthError>,
) -> Result<Option<Arc<Identity>>, Response<Body>> {
    let rc = &r.route.route.cfg;
    let req = &mut r.req;
    if result.is_ok() && matches!(rc.auth, AuthMode::ApiKey | AuthMode::Either) {
        // The gateway checked the key; upstreams get the identity, never the secret.
        req.headers_mut().remove(API_KEY);
    }
    let e = match result {
        Ok(None) => return Ok(None),
        Ok(Some(id)) => {
            // Noted on the response only for the access log's record.
            let user = req.ctx().log_reads_user.then(|| id.clone());
            req.ctx_mut().identity = Some(id);
            return Ok(user);
        }
        Err(e) => e,
    };
    crate::stats::record_auth_failure(&rc.name, e.reason());
    tracing::debug!(route = %rc.name, error = %e, "auth failed");
    if let AuthError::Invalid(_) = &e {
        // Only wrong credentials are guesses; missing ones or a missing role are not.
        // Counted and judged at once: requests that passed `blocked` together are
        // answered 429 past the limit, here.
        if let Some(wait) = failures.record(limit, req.ctx().conn.peer.ip(), Instant::now()) {
            return Err(too_many_failures(req, wait));
        }
    }
    if let AuthError::Forbidden { user, .. } = e {
        // The access log names who was refused (the client is told nothing more).
        let mut resp = json_error(req, StatusCode::FORBIDDEN, "forbidden", "not allowed");
        if req.ctx().log_reads_user {
            let who = Identity::new(user, Vec::new(), None);
            resp.extensions_mut().insert(UserId(Arc::new(who)));
        }
        return Err(resp);
    }
    // The reason stays in the log: telling a guesser why a token failed helps it.
    let message = match e {
        AuthError::Missing => "missing credentials",
        _ => "invalid credentials",
    };
    let mut resp = json_error(req, StatusCode::UNAUTHORIZED, "unauthorized", message);
    let challenge = match (rc.auth, &e) {
        (AuthMode::ApiKey, _) => "ApiKey realm=\"gateway\"",
        (_, AuthError::Invalid(_)) => "Bearer realm=\"gateway\", error=\"invalid_token\"",
        _ => "Bearer realm=\"gateway\"",
    };
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    Err(resp)
}

/// 429 for an address over the failure limit, with how long it must wait.
fn too_many_failures<B>(req: &crate::ctx::Req<B>, wait: std::time::Duration) -> Response<Body> {
    let mut resp = json_error(
        req,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_auth_failures",
        "too many failed authentications; retry later",
    );
    let secs = wait.as_millis().div_ceil(1000).max(1);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
    resp
}

/// The authenticated user, named on the answer for the access log.
struct NoteUser(Arc<Identity>);

impl Annotation for NoteUser {
    fn apply(self, resp: &mut Response<Body>) {
        resp.extensions_mut().insert(UserId(self.0));
    }
}
