//! Routing, versioning, 404/405 and path rewriting over real HTTP.
mod common;
use common::*;

#[tokio::test]
async fn versions_route_by_path_and_header_side_by_side() {
    let (v1, v2) = (upstream("users-v1").await, upstream("users-v2").await);
    let cfg = format!(
        r#"{}
        {}
        {}
        [[routes]]
        name = "users-v1"
        path = "/v1/users"
        pool = "v1"
        strip_prefix = "/v1"
        [[routes]]
        name = "users-v2"
        path = "/v2/users"
        pool = "v2"
        strip_prefix = "/v2"
        [[routes]]
        name = "users-by-header"
        path = "/users"
        headers = {{ "X-Version" = "2" }}
        pool = "v2"
        [[routes]]
        name = "users-default"
        path = "/users"
        pool = "v1"
        "#,
        listener("public"),
        pool("v1", &[&v1], ""),
        pool("v2", &[&v2], "")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let b = base(&gw);
    let r = get(&c, &format!("{b}/v1/users/7?x=1"), &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["service"].as_str()),
        (200, Some("users-v1"))
    );
    assert_eq!(v1.last().uri, "/users/7?x=1", "prefix stripped, query kept");
    let r = get(&c, &format!("{b}/v2/users/7"), &[]).await;
    assert_eq!(r.json()["service"], "users-v2");
    let r = get(&c, &format!("{b}/users/7"), &[("X-Version", "2")]).await;
    assert_eq!(r.json()["service"], "users-v2", "header selects v2");
    let r = get(&c, &format!("{b}/users/7"), &[]).await;
    assert_eq!(
        r.json()["service"],
        "users-v1",
        "no header: default version"
    );
}

#[tokio::test]
async fn unknown_path_is_json_404_and_wrong_method_is_405() {
    let up = upstream("users").await;
    let cfg = format!(
        r#"{}
        {}
        [[routes]]
        name = "user"
        path = "/api/users/{{id}}"
        path_match = "template"
        methods = ["GET", "PUT"]
        rewrite = "/internal/user/{{id}}"
        pool = "users"
        [[routes]]
        name = "exact"
        path = "/api/users/me"
        path_match = "exact"
        pool = "users"
        "#,
        listener("public"),
        pool("users", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let b = base(&gw);
    let r = get(&c, &format!("{b}/nope"), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let r = send(&c, "DELETE", &format!("{b}/api/users/42"), &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"], "method_not_allowed");
    assert_eq!(r.header("allow").as_deref(), Some("GET, PUT"));
    let r = get(&c, &format!("{b}/api/users/42"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().uri, "/internal/user/42", "template rewrite");
    let r = send(&c, "DELETE", &format!("{b}/api/users/me"), &[], "").await;
    assert_eq!(
        r.status, 200,
        "exact route beats the template and allows any method"
    );
    assert_eq!(up.last().uri, "/api/users/me");
}
