//! The web dashboard: static assets embedded in the binary (nothing is fetched from the network at
//! run time), served at `/` and `/assets/<file>`; the pages talk to the JSON API and its event
//! streams ([docs/dashboard.md]).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The embedded files: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
];

/// `GET /`: the dashboard's page.
pub async fn index() -> Response {
    asset_named("index.html")
}

/// `GET /assets/{file}`.
pub async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    asset_named(&file)
}

fn asset_named(name: &str) -> Response {
    match ASSETS.iter().find(|(n, ..)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                // The assets change with the binary only; a page reload after an upgrade gets
                // them again.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
