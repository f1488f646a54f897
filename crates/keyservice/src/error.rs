//! The error answer of SPEC §7: `{"error":{"code","message","field"?}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// One error answer. `BadRequest` carries the JSON path of the offending member (`field`).
#[derive(Debug)]
pub enum ApiError {
    /// 400 `invalid_request`; nothing was changed.
    BadRequest {
        field: Option<String>,
        message: String,
    },
    /// 401 `unauthorized`: no bearer token.
    Unauthorized,
    /// 403 `forbidden`: a token that is not accepted here.
    Forbidden(String),
    /// 404 `not_found`.
    NotFound(String),
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 409 `conflict`.
    Conflict(String),
    /// 413 `payload_too_large`.
    TooLarge(usize),
    /// 503 `unavailable`.
    Unavailable(String),
    /// 500 `internal`: a database or I/O failure (never bad input).
    Internal(String),
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// A 400 about the request as a whole.
    pub fn bad_body(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: None,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code_and_message(&self) -> (&'static str, String) {
        match self {
            ApiError::BadRequest { message, .. } => ("invalid_request", message.clone()),
            ApiError::Unauthorized => (
                "unauthorized",
                "an Authorization: Bearer token is required".into(),
            ),
            ApiError::Forbidden(m) => ("forbidden", m.clone()),
            ApiError::NotFound(m) => ("not_found", m.clone()),
            ApiError::MethodNotAllowed => (
                "method_not_allowed",
                "method not allowed on this path".into(),
            ),
            ApiError::Conflict(m) => ("conflict", m.clone()),
            ApiError::TooLarge(n) => (
                "payload_too_large",
                format!("the request body is larger than {n} bytes"),
            ),
            ApiError::Unavailable(m) => ("unavailable", m.clone()),
            ApiError::Internal(m) => ("internal", m.clone()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        if let sqlx::Error::Database(d) = &e {
            if d.is_unique_violation() {
                return ApiError::Conflict("an object with that id or key already exists".into());
            }
        }
        ApiError::Internal(format!("database: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (code, message) = self.code_and_message();
        let mut inner = json!({"code": code, "message": message});
        if let (ApiError::BadRequest { field: Some(f), .. }, Some(obj)) =
            (&self, inner.as_object_mut())
        {
            obj.insert("field".into(), json!(f));
        }
        if let ApiError::Internal(m) = &self {
            eprintln!("keygate keyservice: error: {m}");
        }
        let mut resp = (status, axum::Json(json!({ "error": inner }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
